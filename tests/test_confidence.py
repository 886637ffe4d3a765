"""Confidence: the Platt fit, reliability, the calibration stored in every model format, and the
confidence predict_batch, the CLI and the server give."""
import json
import math

import numpy as np
import pytest
import torch

from captcha_fast import api, confidence, export, formats
from captcha_fast.checkpoint import load_checkpoint, save_checkpoint
from captcha_fast.cli import main
from captcha_fast.confidence import Calibration
from captcha_fast.preprocess import prepare_image
from captcha_fast.synth import render, sample_rng
from tests.conftest import TINY_CHARSET, tiny_model

CAL = Calibration(beam=(0.6, -0.8), greedy=(0.3, 0.4), n=123, source="a test")


def platt(slope, intercept, score):
    """The calibrated map written out independently of confidence.py."""
    p = math.exp(min(score, -1e-6))
    return 1 / (1 + math.exp(-(slope * math.log(p / (1 - p)) + intercept)))


def test_fit_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    scores = -rng.exponential(2.0, 40000)
    truth = np.array([platt(0.6, -0.8, s) for s in scores])
    right = rng.random(len(scores)) < truth
    slope, intercept = confidence.fit_platt(scores, right)
    assert slope == pytest.approx(0.6, abs=0.03) and intercept == pytest.approx(-0.8, abs=0.05)
    fitted = confidence.apply(Calibration((slope, intercept), (slope, intercept)), "beam", scores)
    assert np.abs(np.array(fitted) - truth).max() < 0.02


def test_fit_without_information_gives_the_base_rate_and_stays_finite():
    rng = np.random.default_rng(1)
    scores = -rng.exponential(2.0, 2000)
    right = scores < np.median(scores)  # lower scores right: anti-monotone, clamped to slope 0
    slope, intercept = confidence.fit_platt(scores, right)
    assert slope == 0 and 1 / (1 + math.exp(-intercept)) == pytest.approx(0.5, abs=0.01)
    slope, intercept = confidence.fit_platt(scores, np.ones(len(scores), bool))  # every read right
    conf = confidence.apply(Calibration((slope, intercept), (slope, intercept)), "beam", scores)
    assert all(0.9 < c < 1 for c in conf)
    with pytest.raises(ValueError, match="one length"):
        confidence.fit_platt([-1.0, -2.0], [True])
    with pytest.raises(ValueError, match="no reads"):
        confidence.fit_platt([float("-inf")], [False])


def test_groups_keep_the_high_confidence_promise_on_each_set():
    """On set "b" the score says little (80% right whatever it is): the pooled fit breaks the >= 0.9
    promise there; with groups the intercept drops, as little as needed, until it holds on both."""
    rng = np.random.default_rng(2)
    scores = -rng.exponential(1.0, 8000)
    groups = np.array(["a", "b"] * 4000)
    truth = np.array([platt(1.5, 0.5, s) if g == "a" else 0.8 for s, g in zip(scores, groups)])
    right = rng.random(len(scores)) < truth
    reads = {d: confidence.Reads([""] * len(scores), scores.tolist(), right.tolist()) for d in confidence.DECODERS}

    def promise(cal, group):  # (reads at >= 0.9, their accuracy) in the group
        conf = np.array(confidence.apply(cal, "beam", scores))
        member = (groups == group) & (conf >= 0.9)
        return int(member.sum()), right[member].mean() if member.any() else float("nan")

    pooled = confidence.fit_calibration(reads)
    assert promise(pooled, "b")[0] >= 10 and promise(pooled, "b")[1] < 0.9
    per_set = confidence.fit_calibration(reads, groups=groups.tolist(), min_high=10)
    assert per_set.beam[0] == pooled.beam[0] and per_set.beam[1] < pooled.beam[1]
    for group in "ab":
        n, accuracy = promise(per_set, group)
        assert n < 10 or (accuracy * n + 1) / (n + 2) >= 0.9
    n, accuracy = promise(Calibration((per_set.beam[0], per_set.beam[1] + 0.05), per_set.greedy), "b")
    assert n >= 10 and (accuracy * n + 1) / (n + 2) < 0.9  # one step less would break it: the least shift
    shift, broken = confidence.per_set_shift(*pooled.beam, reads["beam"], groups.tolist(), 10)
    assert shift == pytest.approx(pooled.beam[1] - per_set.beam[1]) and broken == ["b"]  # what it is paid for


def test_apply_is_monotone_in_the_score_and_in_0_1():
    scores = [float("-inf"), -300.0, -20.0, -5.0, -1.0, -0.1, -1e-3, -1e-9, 0.0, 1e-6]
    for decoder in confidence.DECODERS:
        conf = confidence.apply(CAL, decoder, scores)
        assert conf[0] == 0.0 and all(0 <= c <= 1 for c in conf)
        assert all(a <= b for a, b in zip(conf, conf[1:]))
        for s, c in zip(scores[1:], conf[1:]):
            assert c == pytest.approx(platt(*getattr(CAL, decoder), s), rel=1e-9)
    raw = confidence.apply(None, "beam", scores)  # uncalibrated: the model's own exp(score)
    assert raw == pytest.approx([0.0] + [math.exp(min(s, 0.0)) for s in scores[1:]])


def test_reliability_bins_ece_and_the_high_confidence_check():
    rel = confidence.reliability([0.95, 0.95, 0.15, 0.15], [True, False, False, False])
    assert [(b["lo"], b["n"], b["accuracy"]) for b in rel.bins] == [(0.1, 2, 0.0), (0.9, 2, 0.5)]
    assert rel.ece == pytest.approx(0.5 * 0.15 + 0.5 * 0.45)
    assert rel.n_high == 2 and rel.accuracy_high == 0.5 and not rel.high_ok
    assert confidence.reliability([0.95] * 10, [True] * 9 + [False]).high_ok  # 90% right at >= 0.9
    assert confidence.reliability([0.5], [True]).high_ok  # no read at >= 0.9


def test_calibration_json_rejects_what_it_cannot_read():
    assert Calibration.from_json(CAL.to_json()) == CAL
    assert Calibration.from_json("") is None and Calibration.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown calibration"):
        Calibration.from_dict({"method": "isotonic", "beam": [1, 2], "greedy": [1, 2]})


# ---------------------------------------------------------------------------- stored with the model

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    plain = export.save_recognizer(tiny_model(), folder / "plain.pt")
    calibrated = export.save_recognizer(tiny_model(), folder / "calibrated.pt", calibration=CAL)
    return folder, plain, calibrated


def test_torchscript_file_carries_the_calibration(files):
    folder, plain, calibrated = files
    assert formats.load_recognizer(calibrated).calibration == CAL
    assert formats.load_recognizer(plain).calibration is None
    extra = {formats.CALIBRATION_FILE: ""}  # readable without captcha_fast's loader too
    torch.jit.load(str(calibrated), _extra_files=extra)
    assert json.loads(extra[formats.CALIBRATION_FILE])["beam"] == [0.6, -0.8]
    rewritten = export.with_calibration(plain, CAL, folder / "rewritten.pt")
    assert formats.load_recognizer(rewritten).calibration == CAL
    images = [torch.randint(0, 256, (1, 32, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    assert api.predict_batch(images, str(rewritten)) == api.predict_batch(images, str(plain))  # same weights


def test_pt2_file_carries_the_calibration(files):
    folder, plain, calibrated = files
    program = export.export_program(str(calibrated), folder / "calibrated.pt2")  # from the .pt: kept
    assert formats.load_program(program).calibration == CAL
    bare = export.export_program(str(plain), folder / "plain.pt2")
    assert formats.load_program(bare).calibration is None
    other = Calibration((1.5, 2.0), (1.0, 0.0), 7, "other")
    rec = formats.load_program(export.with_calibration(bare, other, folder / "other.pt2"))
    assert rec.calibration == other
    image = torch.randint(0, 256, (1, 32, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (h,), = api.predict_batch([image], rec, return_scores=True)
    assert h.confidence == pytest.approx(platt(1.5, 2.0, h.score))


@pytest.mark.parametrize("half", [False, True])
def test_checkpoint_carries_the_calibration_into_export(tmp_path, half):
    """... and a shipped checkpoint's float16 weights stay float16 (the install calibrates default.ckpt)."""
    from captcha_fast.checkpoint import read_checkpoint, with_half_weights
    model = tiny_model()
    ckpt = tmp_path / "best.ckpt"
    saved = {"model": model.state_dict(), "model_config": model.config.to_dict(), "charset": TINY_CHARSET, "epoch": 0}
    save_checkpoint(with_half_weights(saved) if half else saved, ckpt)
    export.with_calibration(ckpt, CAL)
    assert Calibration.from_dict(load_checkpoint(ckpt)["calibration"]) == CAL
    assert (read_checkpoint(ckpt)["model"]["rnn.weight_hh_l0"].dtype == torch.float16) == half
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.pt")]) == 0
    assert formats.load_recognizer(tmp_path / "m.pt").calibration == CAL


# ---------------------------------------------------------------------------- in every output

def _images(n=6):
    return [render(text, sample_rng(11, i), height=40) for i, text in enumerate(["3a7f", "0b1c", "c4d5e6", "ffff",
                                                                                  "12ab", "9"][:n])]


@pytest.mark.parametrize("decoder", ["beam", "greedy"])
def test_predict_batch_confidence_is_the_calibrated_score(files, decoder):
    _, plain, calibrated = files
    hyps = [hs[0] for hs in api.predict_batch(_images(), str(calibrated), decoder=decoder, return_scores=True)]
    for h in hyps:
        assert 0 <= h.confidence <= 1 and h.confidence == pytest.approx(platt(*getattr(CAL, decoder), h.score))
    ranked = sorted(hyps, key=lambda h: h.score)
    assert all(a.confidence <= b.confidence for a, b in zip(ranked, ranked[1:]))
    for h in (hs[0] for hs in api.predict_batch(_images(), str(plain), decoder=decoder, return_scores=True)):
        assert h.confidence == pytest.approx(math.exp(h.score))  # documented: uncalibrated = exp(score)


def test_top_k_hypotheses_each_carry_a_confidence(files):
    _, _, calibrated = files
    for hs in api.predict_batch(_images(), str(calibrated), top_k=3):
        assert [h.confidence for h in hs] == pytest.approx([platt(*CAL.beam, h.score) for h in hs])
        assert all(a.confidence >= b.confidence for a, b in zip(hs, hs[1:]))  # best first


def test_cli_predict_prints_the_confidence(files, tmp_path, capsys):
    _, _, calibrated = files
    paths = []
    for i, image in enumerate(_images(3)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    want = api.predict_batch([str(p) for p in paths], str(calibrated), return_scores=True)
    assert main(["predict", "--model", str(calibrated), *map(str, paths)]) == 0
    for line, hs in zip(capsys.readouterr().out.splitlines(), want):
        path, text, score, conf = line.split("\t")
        assert text == hs[0].text and float(conf) == pytest.approx(hs[0].confidence, abs=1e-4)
    assert main(["predict", "--json", "--model", str(calibrated), str(paths[0])]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["confidence"] == pytest.approx(want[0][0].confidence)
    assert row["hypotheses"][0]["confidence"] == row["confidence"]


def test_read_labelled_on_prepared_images_matches_the_recognizer(files):
    """Training calibrates on its validation set's prepared images: the reads must be the recognizer's."""
    _, _, calibrated = files
    rec = formats.load_recognizer(calibrated)
    images = [torch.from_numpy(np.array(im.convert("L"))).unsqueeze(0) for im in _images()]
    labels = ["3a7f", "0b1c", "c4d5e6", "ffff", "12ab", "9"]
    raw = confidence.read_labelled(rec, images, labels)
    prepared = [(prepare_image(im, rec.height, rec.in_channels, rec.max_width, ink=rec.ink) * 255).round()
                .to(torch.uint8) for im in images]
    again = confidence.read_labelled(rec, prepared, labels, prepared=True)
    for d in confidence.DECODERS:
        assert again[d].texts == raw[d].texts and again[d].right == raw[d].right
        assert again[d].scores == pytest.approx(raw[d].scores, abs=0.05)


def test_cli_calibrate_fits_on_labelled_images_and_writes_a_copy(files, calibration_folder, tmp_path, capsys):
    _, plain, _ = files
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(plain), str(calibration_folder), "--out", str(out),
                 "--plot", str(tmp_path / "r.png")]) == 0
    assert "confidence = sigmoid(" in capsys.readouterr().out and (tmp_path / "r.png").stat().st_size > 0
    cal = formats.load_recognizer(out).calibration
    reads = confidence.read_labelled(formats.load_recognizer(plain), *_labelled(calibration_folder))
    assert cal.n == 50 and cal.beam == pytest.approx(confidence.fit_platt(reads["beam"].scores, reads["beam"].right))
    assert formats.load_recognizer(plain).calibration is None  # the source is left alone


def test_cli_calibrate_refuses_too_few_images(files, png_folder, tmp_path, capsys):
    """5 images fit a slope and intercept to noise (2 gave one confidence, 0.25, for every read)."""
    out = tmp_path / "few.pt"
    assert main(["calibrate", str(files[1]), str(png_folder), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == ("captcha-fast calibrate: error: 5 labelled images are too few to fit "
                                               "a confidence on: give at least 50 the model never trained on")
    assert not out.exists()


def test_cli_calibrate_without_a_model_fits_the_shipped_one(calibration_folder, tmp_path):
    """calibrate DATA fits the shipped model, as eval DATA scores it; the shipped file is left alone."""
    shipped = formats.load_recognizer(api.DEFAULT_MODEL).calibration
    outs = [tmp_path / "default.pt", tmp_path / "named.pt"]
    assert main(["calibrate", str(calibration_folder), "--ignore-case", "--out", str(outs[0])]) == 0
    assert main(["calibrate", str(api.DEFAULT_MODEL), str(calibration_folder), "--ignore-case",
                 "--out", str(outs[1])]) == 0
    fits = [formats.load_recognizer(out).calibration for out in outs]
    assert fits[0] == fits[1] and fits[0].n == 50 and fits[0] != shipped
    assert formats.load_recognizer(api.DEFAULT_MODEL).calibration == shipped


def _labelled(folder):
    from captcha_fast.evaluate import load_labelled
    images, labels, _ = load_labelled(str(folder))
    return images, labels


def test_training_calibrates_on_its_validation_split(tmp_path, capsys):
    from captcha_fast.evaluate import load_labelled
    from captcha_fast.synth import SynthConfig, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, SynthConfig(charset="AB12", min_len=2, max_len=3, seed=5), 24)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--val-fraction", "0.4", "--seed", "3",
                 "--epochs", "2", "--height", "16", "--channels", "8", "16", "--hidden", "32", "--batch-size", "8",
                 "--char-warmup", "0", "--no-augment", "--quiet", "--threads", "1", "--lr", "1e-2", "--from-scratch",
                 "--no-ink", "--min-steps", "0"]) == 0
    cal = formats.load_recognizer(tmp_path / "run" / "model.pt").calibration
    best = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert Calibration.from_dict(best["calibration"]) == cal and cal.n == best["best"]["val_n"]
    # the same fit as on the split's image files read by the saved recognizer
    images, labels, _ = load_labelled(str(data), split="val", val_fraction=0.4, seed=3)
    reads = confidence.read_labelled(formats.load_recognizer(tmp_path / "run" / "model.pt"), images, labels)
    assert cal.beam == pytest.approx(confidence.fit_platt(reads["beam"].scores, reads["beam"].right), abs=0.02)


def test_a_dozen_reads_do_not_prove_the_promise():
    """Set "b" has 13 reads the pooled fit puts at >= 0.9, 12 of them right: 92% of the sample, but
    the next such read is right with expectation 13/15 < 0.9, so the fit is lowered until fewer than
    min_high of b's reads stay at >= 0.9; at 10 of 10 right the pooled fit is kept."""
    rng = np.random.default_rng(3)
    a_scores = -rng.exponential(1.0, 4000)
    a_right = rng.random(4000) < 1 / (1 + np.exp(-(1.5 * a_scores + 4)))
    for b_right, n_b, lowered in ((12, 13, True), (10, 10, False)):
        b_scores = np.full(n_b, -1e-4)  # sure reads: >= 0.9 under any fit near the pooled one
        b_ok = np.arange(n_b) < b_right
        scores = np.concatenate([a_scores, b_scores]).tolist()
        right = np.concatenate([a_right, b_ok]).tolist()
        groups = ["a"] * 4000 + ["b"] * n_b
        reads = {d: confidence.Reads([""] * len(scores), scores, right) for d in confidence.DECODERS}
        pooled = confidence.fit_calibration(reads)
        assert sum(c >= 0.9 for c in confidence.apply(pooled, "beam", b_scores.tolist())) == n_b
        shift, broken = confidence.per_set_shift(*pooled.beam, reads["beam"], groups, 10)
        assert (shift > 0) == lowered and broken == (["b"] if lowered else [])
    assert confidence.keeps_promise(10, 10) and not confidence.keeps_promise(12, 13)
    assert confidence.keeps_promise(95, 100) and not confidence.keeps_promise(9, 10)  # 96/102, 10/12
