"""The Recognizer module: preprocessing, eager == scripted == saved/loaded (also in a process
with no captcha_fast Python code), mixed widths, low precision, and an independent reference
(the training CRNN + the pure-Python greedy decoder)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import captcha_fast
from captcha_fast import _reference, export, formats
from captcha_fast.preprocess import collate, load_image, prepare_image
from captcha_fast.recognizer import RECOGNIZER_FORMAT, Recognizer, build_recognizer
from captcha_fast.synth import render, sample_rng
from conftest import TINY_CHARSET as CHARSET, tiny_model as peaky_model


def captchas(texts=("3a7f", "0b1", "c4d5e6"), seed=0):
    """uint8 (3, 50, W) tensors of seeded captchas, widths differ."""
    out = []
    for i, t in enumerate(texts):
        img = render(t, sample_rng(seed, i), height=50)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous())
    return out


@pytest.fixture(scope="module")
def model():
    return peaky_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return export.save_recognizer(model, tmp_path_factory.mktemp("rec") / "model.pt", decoder="greedy")


# ---------------------------------------------------------------- preprocessing


def test_rgba_is_composited_on_white_or_black_and_grey_matches_pil():
    rgba = torch.randint(0, 128, (4, 6, 9), dtype=torch.uint8)  # dark colours: on white
    rgba[3, :, :4] = 0  # fully transparent columns become the background
    x = prepare_image(rgba, 6, 1)
    assert x.shape == (1, 6, 9)
    assert torch.allclose(x[:, :, :4], torch.ones(1, 6, 4))
    rgba[:3] += 128  # light colours: on black
    assert not prepare_image(rgba, 6, 1)[:, :, :4].any()
    rgb = rgba[:3]
    pil = np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L")).astype(np.float32) / 255
    assert np.abs(prepare_image(rgb, 6, 1)[0].numpy() - pil).max() <= 1 / 255 + 1e-6


def test_resize_keeps_aspect_and_minimum_width():
    assert prepare_image(torch.zeros(1, 50, 200, dtype=torch.uint8), 32, 1).shape == (1, 32, 128)
    assert prepare_image(torch.zeros(50, 3, dtype=torch.uint8), 32, 1).shape == (1, 32, 4)
    assert prepare_image(torch.zeros(1, 10, 10), 32, 3).shape == (3, 32, 32)
    u8 = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    torch.testing.assert_close(prepare_image(u8, 32, 1), prepare_image(u8.float() / 255, 32, 1))


def test_collate_pads_right_and_batched_path_matches_per_image():
    same = [torch.randint(0, 256, (3, 50, 120), dtype=torch.uint8) for _ in range(3)]
    batch, widths = collate(same, 32, 1)  # one batched resize
    assert widths.tolist() == [77] * 3
    torch.testing.assert_close(batch, torch.stack([prepare_image(i, 32, 1) for i in same]), atol=1e-6, rtol=0)
    mixed = captchas()
    batch, widths = collate(mixed, 32, 1)
    assert batch.shape[-1] == max(widths.tolist())
    for n, img in enumerate(mixed):
        w = int(widths[n])
        assert torch.equal(batch[n, :, :, :w], prepare_image(img, 32, 1))
        assert not batch[n, :, :, w:].any()


# ---------------------------------------------------------------- the module


def test_recognizer_matches_independent_reference(model):
    """Strings = the training CRNN (eager, unfused) + the pure-Python greedy decoder."""
    imgs = captchas()
    rec = build_recognizer(model, decoder="greedy")
    texts, scores = rec(imgs)
    batch, widths = collate(imgs, 32, 1)
    with torch.no_grad():
        lp, lengths = model(batch, widths)
    want = []
    for n in range(len(imgs)):
        tokens, score = _reference.greedy_decode_reference(lp[: int(lengths[n]), n].tolist())
        want.append("".join(CHARSET[k - 1] for k in tokens))
        assert abs(float(scores[n]) - score) < 1e-3
    assert texts == want
    assert any(texts) and scores.shape == (3,) and scores.dtype == torch.float32


def test_eager_scripted_saved_loaded_agree(model, saved):
    imgs = captchas()
    rec = build_recognizer(model, decoder="greedy")
    want = rec.recognize(imgs, "beam", 8, 3)
    scripted = torch.jit.script(rec)
    for other in (scripted, torch.jit.load(str(saved)), formats.load_recognizer(saved)):
        got = other.recognize(imgs, "beam", 8, 3)
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)  # freezing reorders float ops
    loaded = formats.load_recognizer(saved)
    assert formats.config_of(loaded) == model.config
    assert list(loaded.charset) == list(CHARSET) and loaded.decoder == "greedy"


def test_mixed_width_batch_equals_one_at_a_time(saved):
    rec = formats.load_recognizer(saved)
    imgs = captchas(("12", "abcdef01", "7", "9e9e"))
    texts, scores = rec(imgs)
    for n, img in enumerate(imgs):
        t1, s1 = rec([img])
        assert t1[0] == texts[n]
        torch.testing.assert_close(s1[0], scores[n], atol=1e-4, rtol=1e-5)


def test_low_precision_agrees_with_fp32(saved):
    imgs = captchas(("3a7f", "0b1", "c4d5e6", "ffff", "0"))
    fp32 = formats.load_recognizer(saved, dtype="float32")
    for dtype in ("bfloat16", "float16"):
        low = formats.load_recognizer(saved, dtype=dtype, freeze=False)
        assert getattr(getattr(low.model.convs, "0"), "weight").dtype == formats.resolve_dtype(dtype, torch.device("cpu"))
        (t32, s32), (tl, sl) = fp32(imgs), low(imgs)
        assert tl == t32
        assert not torch.equal(sl, s32)  # really computed differently
        torch.testing.assert_close(sl, s32, atol=0.5, rtol=0.02)


def test_runs_with_only_torch_and_the_library(saved, tmp_path):
    """No captcha_fast Python code in the child: torch.ops.load_library + torch.jit.load."""
    imgs = captchas()
    torch.save(imgs, tmp_path / "imgs.pt")
    want = formats.load_recognizer(saved).recognize(imgs, "beam", 10, 2)[0]
    code = f"""
import json, sys, torch
torch.ops.load_library({captcha_fast.LIBRARY_PATH!r})
rec = torch.jit.load({str(saved)!r})
texts, scores = rec.recognize(torch.load({str(tmp_path / 'imgs.pt')!r}), "beam", 10, 2)
assert not any(m.startswith("captcha_fast") for m in sys.modules), "captcha_fast was imported"
print(json.dumps(texts))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_rgb_model_and_greyscale_input():
    rec = build_recognizer(peaky_model(in_channels=3))
    grey = captchas(("3a7f",))[0][:1]
    (texts, scores), (want, want_scores) = rec([grey, grey.expand(3, -1, -1)]), rec([grey.expand(3, -1, -1)] * 2)
    assert texts == want and texts[0] and texts[0] == texts[1]  # a non-empty read, grey as RGB
    torch.testing.assert_close(scores, want_scores)


def test_scripted_recognizer_rejects_bad_images(model):
    rec = torch.jit.script(build_recognizer(model))
    with pytest.raises(Exception, match="channels"):
        rec([torch.zeros(5, 10, 10, dtype=torch.uint8)])
    with pytest.raises(Exception, match="empty"):
        rec([])
    with pytest.raises(Exception, match="H x W or C x H x W"):
        rec([torch.zeros(10, dtype=torch.uint8)])
    with pytest.raises(Exception, match="empty"):
        rec([torch.zeros(1, 10, 0, dtype=torch.uint8)])


def test_load_rejects_files_that_are_not_recognizers(tmp_path, model):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="garbage.pt.*not a captcha_fast recognizer"):
        formats.load_recognizer(garbage)
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(ValueError, match="other.pt.*not a captcha_fast recognizer"):
        formats.load_recognizer(other)
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    with pytest.raises(ValueError, match="state.pt.*not a captcha_fast recognizer"):
        formats.load_recognizer(state)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        formats.load_recognizer(tmp_path / "missing.pt")


def test_bad_recognizer_arguments(model):
    with pytest.raises(ValueError, match="decoder"):
        Recognizer(model, decoder="viterbi")
    with pytest.raises(ValueError, match="beam_width"):
        Recognizer(model, beam_width=0)


def _half_exact(model):
    """A copy of `model` whose GRU weights are rounded to float16 (a shipped model's are: with_half_weights)."""
    import copy
    exact = copy.deepcopy(model)
    with torch.no_grad():
        for p in exact.rnn.parameters():
            p.copy_(p.half().float())
    return exact


def test_gru_weights_that_float16_holds_are_stored_in_float16_and_load_as_float32(model, tmp_path):
    """model.InferenceGRU's __getstate__/__setstate__: the file is smaller by 2 bytes a GRU weight, every
    parameter loads as float32 (torch.jit.load alone), and reads exactly as before saving, saved again too."""
    exact = _half_exact(model)
    full = export.save_recognizer(model, tmp_path / "full.pt")
    half = export.save_recognizer(exact, tmp_path / "half.pt")
    saved_bytes = full.stat().st_size - half.stat().st_size
    assert saved_bytes == pytest.approx(2 * sum(p.numel() for p in model.rnn.parameters()), rel=0.02)
    before = torch.jit.script(build_recognizer(exact))
    loaded = torch.jit.load(str(half))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    torch.jit.save(loaded, str(tmp_path / "again.pt"))
    assert (tmp_path / "again.pt").stat().st_size == pytest.approx(half.stat().st_size, abs=1000)  # (names of code)
    batch, widths = before.preprocess(captchas())
    for rec in (loaded, torch.jit.load(str(tmp_path / "again.pt"))):
        assert all(torch.equal(v, before.state_dict()[k]) for k, v in rec.state_dict().items())
        # (the interpreter's optimised runs may round a few ulps apart; float16 weights would be ~1e-3 off)
        torch.testing.assert_close(rec.log_probs(batch, widths), before.log_probs(batch, widths), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cpp_example_prints_the_same_strings(model, tmp_path):
    """examples/cpp: build the libtorch program (about a minute) and run it on PPM/PGM files, with a recognizer
    whose GRU weights are stored in float16 (torch::jit::load widens them, as a shipped model's)."""
    import shutil
    from pathlib import Path

    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "recognize"
    subprocess.run(["sh", str(root / "examples/cpp/build.sh"), str(exe)], check=True, capture_output=True,
                   env={**__import__("os").environ, "PYTHON": sys.executable}, timeout=600)
    files = []
    for i, img in enumerate(captchas()):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        files.append(tmp_path / f"{i}.ppm")
        pil.save(files[-1])
    files.append(tmp_path / "grey.pgm")
    Image.fromarray(captchas()[0].permute(1, 2, 0).numpy()).convert("L").save(files[-1])
    saved = export.save_recognizer(_half_exact(model), tmp_path / "half.pt", decoder="greedy")
    out = subprocess.run([str(exe), captcha_fast.LIBRARY_PATH, str(saved), *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = [line.split("\t")[1] for line in out.stdout.strip().splitlines()]
    rec = formats.load_recognizer(saved)
    assert got == rec([load_image(f) for f in files])[0]


def test_format_1_files_are_migrated(model, tmp_path):
    """A recognizer saved before format 2 (method `logits`, no max_width) loads through today's code."""
    rec = build_recognizer(model, decoder="greedy")
    scripted = torch.jit.script(rec)
    scripted.format = 1
    old = tmp_path / "old.pt"
    torch.jit.save(scripted, str(old))
    loaded = formats.load_recognizer(old)
    assert loaded.format == 2 and loaded.max_width == 4096
    imgs = captchas()
    assert loaded(imgs)[0] == rec(imgs)[0]
    scripted.format = RECOGNIZER_FORMAT + 1  # a format a later captcha_fast writes
    torch.jit.save(scripted, str(tmp_path / "future.pt"))
    with pytest.raises(ValueError, match=rf"future.pt' is recognizer format {RECOGNIZER_FORMAT + 1}; this captcha_fast "
                                         rf"reads up to {RECOGNIZER_FORMAT}: "):
        formats.load_recognizer(tmp_path / "future.pt")


def test_training_tensors_are_what_the_recognizer_sees(model, png_folder):
    """The training data path (CaptchaDataset) and Recognizer.preprocess give the same tensors
    for the same files."""
    from captcha_fast.charset import Charset
    from captcha_fast.data import CaptchaDataset, scan_folder

    samples = scan_folder(png_folder)
    ds = CaptchaDataset(samples, Charset(CHARSET), height=32)
    rec = build_recognizer(model)
    for i, s in enumerate(samples):
        want, w = rec.preprocess([load_image(s.path)])
        got = ds[i][0]
        assert got.shape[-1] == int(w[0])
        torch.testing.assert_close(got, want[0], atol=1 / 255 + 1e-6, rtol=0)
