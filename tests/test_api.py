"""captcha_fast.api: predict_batch over every input kind, chunking and order, top-k, precision,
load() of both file kinds, and clear errors for bad input."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captcha_fast import api, export, formats
from captcha_fast.decode import Hypothesis
from captcha_fast.recognizer import Recognizer
from captcha_fast.synth import render, sample_rng

from conftest import tiny_model

TEXTS = ("3a7f", "0b1", "c4d5e6", "ffff", "12", "9")


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path


@pytest.fixture(scope="module")
def pil_images():
    return [render(t, sample_rng(1, i), height=50) for i, t in enumerate(TEXTS)]


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def expected(model_path, pil_images):
    rec = api.load(model_path, device="cpu")
    return [rec([_chw(img)])[0][0] for img in pil_images]  # one at a time


def test_input_kinds_agree(model_path, pil_images, expected, tmp_path):
    tensors = [_chw(img) for img in pil_images]
    paths = []
    for i, img in enumerate(pil_images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    assert api.predict_batch(tensors, model_path) == expected
    assert api.predict_batch(pil_images, model_path) == expected
    assert api.predict_batch(paths, model_path) == expected
    assert api.predict_batch([str(p) for p in paths], model_path) == expected
    assert api.predict_batch([np.asarray(img) for img in pil_images], model_path) == expected
    floats = [t.float() / 255 for t in tensors]
    assert api.predict_batch(floats, model_path) == expected
    rgba = [img.convert("RGBA") for img in pil_images]
    assert api.predict_batch(rgba, model_path) == expected


def test_batch_tensor_equals_list(model_path):
    x = torch.randint(0, 256, (5, 3, 40, 100), dtype=torch.uint8)
    assert api.predict_batch(x, model_path) == api.predict_batch(list(x), model_path, batch_size=1)
    assert api.predict_batch(x.float() / 255, model_path) == api.predict_batch(x, model_path)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_chunks_sorted_by_width_restore_input_order(model_path, pil_images, expected, batch_size):
    assert api.predict_batch(pil_images, model_path, batch_size=batch_size) == expected


def test_top_k_hypotheses(model_path, pil_images, expected):
    hyps = api.predict_batch(pil_images, model_path, top_k=3, beam_width=10)
    assert len(hyps) == len(pil_images)
    for h, best in zip(hyps, expected):
        assert 1 <= len(h) <= 3 and all(isinstance(x, Hypothesis) for x in h)
        assert h[0].text == best
        assert [x.score for x in h] == sorted((x.score for x in h), reverse=True)
        assert len({x.text for x in h}) == len(h)


def test_return_scores(model_path, pil_images, expected):
    hyps = api.predict_batch(pil_images, model_path, decoder="greedy", return_scores=True)
    assert [len(h) for h in hyps] == [1] * len(pil_images)
    assert all(isinstance(h[0].score, float) and h[0].score <= 0 for h in hyps)
    assert [h[0].text for h in api.predict_batch(pil_images, model_path, return_scores=True)] == expected


def test_greedy_decoder_and_amp(model_path, pil_images):
    rec = api.load(model_path)
    greedy = api.predict_batch(pil_images, model_path, decoder="greedy")
    assert greedy == [rec.recognize([_chw(img)], "greedy", 1, 1)[0][0][0] for img in pil_images]
    assert api.predict_batch(pil_images, model_path, amp=True) == api.predict_batch(pil_images, model_path, amp=False)


def test_loaded_model_and_load_cache(model_path, pil_images, expected, monkeypatch, tmp_path):
    rec = api.load(model_path)
    # cached: a call with the file unchanged does not look inside it again (predict_batch loads on every call)
    monkeypatch.setattr(api.formats, "file_kind", lambda path: pytest.fail("the file was read again"))
    assert api.load(model_path) is rec
    assert api.load(str(model_path)) is rec
    monkeypatch.undo()
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(model_path).read_bytes())
    first = api.load(copy)
    os.utime(copy, ns=(0, 10**9))  # a rewritten file (new modification time) is loaded again
    assert api.load(copy) is not first
    assert api.predict_batch(pil_images, rec) == expected
    assert api.predict_batch(pil_images, formats.load_recognizer(model_path, freeze=False)) == expected


@pytest.mark.slow
def test_exported_program_predicts_the_same(model_path, pil_images, expected, tmp_path):
    """torch.export (.pt2): captcha_fast.load takes it; predictions equal (a few seconds to export).
    tests/test_export.py compares the formats in depth."""
    pt2 = export.export_program(model_path, tmp_path / "model.pt2")  # from the saved TorchScript file
    rec = api.load(pt2)
    assert isinstance(rec, formats.ExportedRecognizer) and api.format_of(rec) == "program"
    for bs in (1, 4):
        assert api.predict_batch(pil_images, rec, batch_size=bs) == expected
    scripted = api.load(model_path).recognize([_chw(i) for i in pil_images], "beam", 10, 2)
    got = rec.recognize([_chw(i) for i in pil_images], "beam", 10, 2)
    assert got[0] == scripted[0]
    torch.testing.assert_close(got[1], scripted[1], atol=1e-4, rtol=1e-5)


def test_format_of(model_path):
    assert api.format_of(api.load(model_path)) == "torchscript"
    assert api.format_of(export.build_recognizer(tiny_model())) == "eager"


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_argument_gives_the_same_reads_and_is_restored(model_path, pil_images, expected, threads):
    before = torch.get_num_threads()
    assert api.predict_batch(pil_images, model_path, threads=threads) == expected
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_threads_argument(model_path, threads):
    with pytest.raises(ValueError, match="threads must be None .auto. or an int >= 1"):
        api.predict_batch([torch.zeros(1, 20, 20, dtype=torch.uint8)], model_path, threads=threads)


def test_missing_pretrained_model_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "DEFAULT_MODEL", tmp_path / "pretrained" / "default.pt")
    with pytest.raises(FileNotFoundError, match="default.pt.*missing.*captcha-fast export"):
        api.predict_batch([torch.zeros(1, 20, 20, dtype=torch.uint8)])


def _png(tmp_path, name="ok.png"):
    p = tmp_path / name
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(p)
    return p


@pytest.mark.parametrize("images, error, match", [
    ([], ValueError, "empty"),
    ([torch.zeros(10, dtype=torch.uint8)], ValueError, r"images\[0\].*1-D"),
    ([torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(5, 8, 8, dtype=torch.uint8)], ValueError, r"images\[1\].*channels"),
    ([torch.zeros(1, 8, 0, dtype=torch.uint8)], ValueError, r"images\[0\].*empty"),
    ([torch.full((8, 8), 2.0)], ValueError, r"images\[0\].*\[0, 1\]"),
    ([torch.zeros(8, 8, dtype=torch.int32)], ValueError, r"images\[0\].*dtype"),
    (torch.zeros(1, 8, 8), ValueError, "N x C x H x W"),
    ([3.5], TypeError, r"images\[0\].*float"),
    ("a.png", TypeError, "list"),
])
def test_bad_images_name_the_culprit(model_path, images, error, match):
    with pytest.raises(error, match=match):
        api.predict_batch(images, model_path)


_NUMPY_SHAPES = "a numpy image must be H x W or H x W x C with C = 1 (grey), 3 (RGB) or 4 (RGBA), got shape "
_NUMPY_DTYPES = "a numpy image must be uint8, or float16, float32 or float64 with values in [0, 1], got dtype "


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((3, 50, 200), np.uint8), ValueError, _NUMPY_SHAPES + "(3, 50, 200); numpy images are height x width "
     "x channels (PIL's and OpenCV's order): for a channels-first array, pass a.transpose(1, 2, 0)"),
    (np.zeros((50, 200, 2), np.uint8), ValueError, _NUMPY_SHAPES + "(50, 200, 2)"),
    (np.zeros((0, 0), np.uint8), ValueError, "the numpy image is empty, shape (0, 0)"),
    (np.zeros((0, 40, 3), np.float32), ValueError, "the numpy image is empty, shape (0, 40, 3)"),
    (np.zeros((20, 40), bool), TypeError, _NUMPY_DTYPES + "bool"),
    (np.zeros((20, 40, 3), np.int32), TypeError, _NUMPY_DTYPES + "int32"),
    (np.full((20, 40), 2.0), ValueError, "a float image must hold values in [0, 1], got [2, 2]"),
])
def test_bad_numpy_images_are_named_as_given(model_path, image, error, message):
    """A numpy image is H x W [x C]: its error quotes the caller's shape and dtype, in numpy's terms,
    not those of the C x H x W tensor it would become."""
    with pytest.raises(error) as e:
        api.predict_batch([np.zeros((20, 40, 3), np.uint8), image], model_path)
    assert str(e.value) == "images[1]: " + message


def test_bad_files_name_the_culprit(model_path, tmp_path):
    ok = _png(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(ok.read_bytes()[:60])
    with pytest.raises(ValueError, match="notes.png.*not a readable image"):
        api.predict_batch([ok, text], model_path)
    with pytest.raises(ValueError, match="truncated.png.*not a readable image"):
        api.predict_batch([ok, truncated], model_path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        api.predict_batch([tmp_path / "nope.png"], model_path)
    with pytest.raises(ValueError, match="ok.png.*not a captcha_fast recognizer"):
        api.predict_batch([ok], ok)  # an image given as the model


def test_undecodable_bytes_and_folders_are_named_as_given(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"^images\[1\] \(3 bytes\) is not a readable image") as e:
        api.predict_batch([_png(tmp_path), b"abc"], model_path)
    assert "object at 0x" not in str(e.value)  # not PIL's repr of the BytesIO it was handed
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file: pass the image files in it"):
        api.predict_batch([tmp_path], model_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_is_read_as_its_image(tmp_path, png_folder):
    """A path that is a pipe (`captcha-fast predict <(curl -s URL)`) reads as the file it streams (the
    shipped model: a read, not ""); an empty device is named as not an image."""
    import threading

    png = png_folder / "3a7f.png"
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(png.read_bytes()), daemon=True)
    writer.start()
    try:
        got, want = api.predict_batch([fifo, png])
    finally:
        writer.join(timeout=10)
    assert got == want and want != "", (got, want)
    with pytest.raises(ValueError, match=r"^'/dev/null' is not a readable image \(not in an image format PIL knows\)$"):
        api.predict_batch(["/dev/null"])


def test_cuda_where_torch_has_none_says_so(model_path, monkeypatch):
    """Every way of asking for CUDA fails in the one device check, saying CUDA is not available (not
    that the model file is damaged, as torch.jit.load's failure read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = [torch.zeros(1, 20, 20, dtype=torch.uint8)]
    for call in (lambda: api.load(model_path, device="cuda"), lambda: api.default_model(device="cuda"),
                 lambda: api.predict_batch(images, device="cuda"),
                 lambda: api.predict_batch(images, model_path, device="cuda:0")):
        with pytest.raises(RuntimeError, match=r"device 'cuda(:0)?': CUDA is not available here \(torch "
                                               + re.escape(torch.__version__) + r".*\): use device='cpu'"):
            call()


def test_a_bad_device_names_the_argument_and_its_values(model_path):
    for device in ("foo", "mps", "cuda:x"):
        with pytest.raises(ValueError, match=r"^device must be 'cpu', 'cuda' or 'cuda:N' \(N: a GPU's index\), "
                                             f"got '{device}'$"):
            api.load(model_path, device=device)


def test_a_run_folder_or_a_checkpoint_given_as_the_model_says_what_to_load(model_path, tmp_path):
    from captcha_fast.checkpoint import save_checkpoint

    def raises(error, *parts):  # the message holds these, in order (paths quoted literally)
        return pytest.raises(error, match=".*".join(re.escape(p) for p in parts))

    run = tmp_path / "run"
    run.mkdir()
    model = tiny_model()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, run / "best.ckpt")
    with raises(IsADirectoryError, f"'{run}' is a training run's folder, without a recognizer",
                f"`captcha-fast export {run} --out {run / 'model.pt'}`"):
        api.load(run)
    with raises(ValueError, f"'{run / 'best.ckpt'}' is a training checkpoint, not a recognizer: write a recognizer "
                            f"from it with `captcha-fast export {run / 'best.ckpt'} --out {run / 'model.pt'}`"):
        api.load(run / "best.ckpt")
    export.save_recognizer(model, run / "model.pt")
    model_pt = run / "model.pt"
    with raises(IsADirectoryError, f"'{run}' is a folder, not a recognizer file: its recognizer is '{model_pt}'"):
        api.predict_batch([torch.zeros(1, 20, 20, dtype=torch.uint8)], run)
    with raises(ValueError, f"is a training checkpoint, not a recognizer: use its run's recognizer '{model_pt}'"):
        api.load(run / "best.ckpt")
    with raises(IsADirectoryError, f"'{tmp_path}' is a folder, not a recognizer file (.pt or .pt2)"):
        api.load(tmp_path)
    assert api.predict_batch([torch.zeros(1, 20, 20, dtype=torch.uint8)], run / "model.pt")  # the file it names


def test_bad_arguments(model_path):
    imgs = [torch.zeros(1, 20, 20, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="decoder"):
        api.predict_batch(imgs, model_path, decoder="viterbi")
    with pytest.raises(ValueError, match="top_k"):
        api.predict_batch(imgs, model_path, decoder="greedy", top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        api.predict_batch(imgs, model_path, beam_width=2, top_k=3)
    with pytest.raises(ValueError, match="batch_size"):
        api.predict_batch(imgs, model_path, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        api.predict_batch(imgs, 42)


def test_too_wide_an_image_is_refused_by_name_without_the_work(model_path):
    """A 100000 x 1 strip is 3.2 million px wide at height 32: refused before any resize."""
    import time

    t0 = time.perf_counter()
    # its advice is to crop (predict_batch, predict and serve have no max_width to raise)
    with pytest.raises(ValueError, match=r"images\[1\]: a 100000 x 1 image \(width x height\) is 3200000 px wide.*"
                                         r"max_width = 4096: crop it to its text line$"):
        api.predict_batch([torch.zeros(1, 20, 20, dtype=torch.uint8), torch.zeros(1, 1, 100000, dtype=torch.uint8)],
                          model_path)
    assert time.perf_counter() - t0 < 10
    rec = formats.load_recognizer(model_path, freeze=False)
    rec.max_width = 8  # configurable per recognizer; the scripted module raises torch.jit.Error
    with pytest.raises(Exception, match="above max_width = 8"):
        rec([torch.zeros(1, 32, 40, dtype=torch.uint8)])


# ----------------------------------------------------------------------------- errors inside a chunk

@pytest.fixture(scope="module")
def nan_model_path(tmp_path_factory):
    """A saved TorchScript recognizer whose model emits NaN log-probs (a NaN classifier bias), as a
    model overflowing in fp16 would: the decoding op inside the script refuses the chunk's first
    sequence, by its number in the chunk."""
    model = tiny_model()
    model.classifier.bias.data[1] = float("nan")
    return export.save_recognizer(model, tmp_path_factory.mktemp("nan") / "nan.pt")


def test_an_error_inside_the_scripted_recognizer_names_the_users_image(nan_model_path, pil_images, tmp_path):
    """Raised inside the TorchScript recognizer, on a chunk of images sorted by width: the error
    names the image by its index in the user's list (or its path), with the message itself -- not
    the TorchScript interpreter's banner."""
    images = [_chw(img) for img in pil_images]  # the narrowest, first in the sorted chunks, is TEXTS[5] = "9"
    with pytest.raises(RuntimeError, match=r"log_probs of images\[5\] contain NaN") as e:
        api.predict_batch(images, nan_model_path, batch_size=2)
    assert "TorchScript" not in str(e.value) and "sequence" not in str(e.value)
    paths = []
    for i, img in enumerate(pil_images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    with pytest.raises(RuntimeError, match=r"log_probs of '[^']*5\.png' contain NaN"):
        api.predict_batch(paths, nan_model_path, batch_size=2)


class _NaNForBlackImages(Recognizer):
    """An eager recognizer whose model "fails" (NaN log-probs) on all-black images, as a CUDA model
    overflowing in fp16 would: the decoding op refuses that sequence by its number in the chunk."""

    def log_probs(self, batch, widths):
        log_probs, lengths = super().log_probs(batch, widths)
        black = batch.flatten(1).amax(1) == 0
        log_probs[:, black] = float("nan")
        return log_probs, lengths


def test_a_decoding_error_inside_a_sorted_chunk_names_the_users_image(pil_images):
    rec = _NaNForBlackImages(tiny_model()).eval()
    images = [_chw(img) for img in pil_images[:4]] + [torch.zeros(3, 50, 1000, dtype=torch.uint8)]
    for decoder in ("beam", "greedy"):
        with pytest.raises(RuntimeError, match=r"log_probs of images\[4\] contain NaN") as e:
            api.predict_batch(images, rec, decoder=decoder, batch_size=2)  # the black image: sequence 0 of its chunk
        assert "sequence" not in str(e.value)


# ----------------------------------------------------------------------------- known length and alphabet

def _reference_reads(rec, images, min_length, max_length, allowed):
    """The exact prefix beam search of captcha_fast._reference over the recognizer's own log-probs,
    held to the constraints: the best label per image."""
    from captcha_fast._reference import prefix_beam_search

    charset = list(rec.charset)
    mask = [True] + [c in allowed for c in charset] if allowed is not None else None
    batch, widths = rec.preprocess(images)
    with torch.no_grad():
        log_probs, lengths = rec.log_probs(batch, widths)
    reads = []
    for n, T in enumerate(lengths.tolist()):
        best = prefix_beam_search(log_probs[:T, n].tolist(), 10, min_length=min_length, max_length=max_length,
                                  allowed=mask)
        reads.append("".join(charset[c - 1] for c in best[0][0]) if best else "")
    return reads


@pytest.mark.parametrize("kind", ["torchscript", "eager", "program"])
def test_length_and_alphabet_constraints_reach_the_beam_search(model_path, pil_images, kind, tmp_path):
    """predict_batch(min_length=, max_length=, allowed=) reads what the exact search held to the same
    constraints reads, for every kind of recognizer -- also a TorchScript file, whose methods have
    fixed signatures -- and the constraints change some reads (else this would prove nothing)."""
    rec = {"torchscript": lambda: api.load(model_path),
           "eager": lambda: formats.eager_recognizer(model_path),
           "program": lambda: api.load(export.export_program(model_path, tmp_path / "m.pt2"))}[kind]()
    images = [_chw(img) for img in pil_images]
    free = api.predict_batch(images, rec, batch_size=4)
    for min_length, max_length, allowed in ((3, 3, None), (0, None, "0123456789"), (2, 4, "abcdef0")):
        got = api.predict_batch(images, rec, min_length=min_length, max_length=max_length, allowed=allowed,
                                batch_size=4)
        ref = formats.load_recognizer(model_path, dtype="float32")
        assert got == _reference_reads(ref, images, min_length, -1 if max_length is None else max_length, allowed)
        assert got != free
        for text in got:
            assert min_length <= len(text) <= (max_length or 99) and set(text) <= set(allowed or rec.charset)


def test_allowed_in_upper_case_on_a_case_folded_model(model_path, pil_images):
    """The tiny model's charset (0-9a-f) has no upper case, as the shipped case-folded one: it reads
    lower case, and takes `allowed` in either case."""
    images = [_chw(img) for img in pil_images]
    lower = api.predict_batch(images, model_path, allowed="abc01", return_scores=True)
    assert api.predict_batch(images, model_path, allowed="ABC01", return_scores=True) == lower
    assert api.predict_batch(images, model_path, allowed="aBc01", return_scores=True) == lower
    assert lower != api.predict_batch(images, model_path, return_scores=True)  # the constraint bites
    with pytest.raises(ValueError, match="allowed characters 'XY' are not in the charset"):  # named as given
        api.predict_batch(images, model_path, allowed="aXY")


def test_constraint_errors(model_path):
    imgs = [torch.zeros(1, 20, 20, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="need the beam decoder"):
        api.predict_batch(imgs, model_path, decoder="greedy", max_length=4)
    with pytest.raises(ValueError, match="allowed characters 'XY' are not in the charset"):
        api.predict_batch(imgs, model_path, allowed="0XY1Y")
    with pytest.raises(ValueError, match="allowed is empty: give the symbols the labels may hold, or leave it") as e:
        api.predict_batch(imgs, model_path, allowed="")
    assert "None" not in str(e.value)  # not a Python name: the CLI's --allowed and the server's "allowed" show it
    with pytest.raises(ValueError, match="max_length must be -1 .no limit. or in .max.min_length, 1., 4096."):
        api.predict_batch(imgs, model_path, min_length=5, max_length=4)
    for bad in (-1, 2 ** 62):  # 2**62 overflowed the beam search's integers and read as if 0
        with pytest.raises(ValueError, match=r"min_length must be in \[0, 4096\], got " + str(bad)):
            api.predict_batch(imgs, model_path, min_length=bad)
    with pytest.raises(ValueError, match="beam_width must be in"):
        api.predict_batch(imgs, model_path, beam_width=5000)
