"""Training: overfitting, resume, clear errors, checkpoints, evaluation, DDP."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captcha_fast.charset import Charset
from captcha_fast.data import scan_folder
from captcha_fast.synth import SynthConfig, write_synthetic
from captcha_fast.train import TrainConfig, edit_distance, frames_needed, greedy_texts, load_model, train

TINY = dict(height=16, channels=(8, 16), hidden_dim=32, dropout=0.0, batch_size=8, threads=1, progress=False,
            char_warmup=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_synthetic(d, SynthConfig(charset="0123", min_len=3, max_len=4, seed=3), 8)
    return d


def _read_all(model, folder):
    from captcha_fast.data import CaptchaDataset, collate
    samples = scan_folder(folder)
    ds = CaptchaDataset(samples, Charset(model.config.charset), model.config.height, model.config.in_channels)
    b = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        lp, n = model.eval()(b.images, b.widths)
    return greedy_texts(lp, n, ds.charset), b.labels


def test_helpers():
    assert frames_needed("ab") == 2 and frames_needed("aab") == 4 and frames_needed("aaa") == 5
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2


def test_overfits_a_few_captchas(tiny_folder, tmp_path):
    # A manifest listing each image 8 times: 8 steps per epoch, less per-epoch overhead.
    manifest = tmp_path / "x8.tsv"
    manifest.write_text("".join(f"{s.path}\t{s.label}\n" for s in scan_folder(tiny_folder)) * 8)
    kw = dict(TINY, height=32, char_warmup=40)  # single-character warm-up: off the CTC plateau at once
    cfg = TrainConfig(data=str(manifest), out=str(tmp_path / "run"), val_fraction=0.0, augment=False,
                      epochs=30, lr=1e-2, warmup=0.1, patience=1000, export=False, **kw)
    path = train(cfg)
    assert path.name == "best.ckpt"
    model = load_model(path)
    reads, truths = _read_all(model, tiny_folder)
    assert reads == truths
    # charset round trip: inferred sorted from the labels, saved, loaded
    assert model.config.charset == "0123"
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert ckpt["charset"] == "0123" and ckpt["epoch"] == 29
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 30 and float(rows[-1]["train_acc"]) == 1.0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def _synthetic_cfg(out, **kw):
    base = dict(data="synthetic", out=str(out), synth_train=24, synth_val=8, synth_min_len=2, synth_max_len=3,
                synth_charset="AB12", epochs=4, lr=5e-3, export=False, seed=1)
    base.update(TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted(tmp_path):
    full = train(_synthetic_cfg(tmp_path / "full"))
    train(_synthetic_cfg(tmp_path / "cut", stop_after=2))
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["epoch"] == 1
    resumed = train(_synthetic_cfg(tmp_path / "cut", resume=True))
    a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    for ra, rb in zip(a["metrics"], b["metrics"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["val_acc"] == rb["val_acc"]
    assert full.name == resumed.name == "best.ckpt"


def test_resume_refuses_other_config(tmp_path):
    train(_synthetic_cfg(tmp_path / "r", stop_after=1))
    with pytest.raises(ValueError, match="--resume: lr is"):
        train(_synthetic_cfg(tmp_path / "r", resume=True, lr=1e-3))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_synthetic_cfg(tmp_path / "none", resume=True))


def test_too_long_label_is_a_clear_error(tmp_path):
    from PIL import Image
    Image.new("L", (40, 16), 255).save(tmp_path / "AABBCCDD.png")  # 40 px -> 10 frames, needs 12
    Image.new("L", (40, 16), 255).save(tmp_path / "AB.png")
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), val_fraction=0.0, augment=False, **TINY)
    with pytest.raises(ValueError, match=r"'AABBCCDD' of .*AABBCCDD\.png' needs 12 CTC frames but its image gives 10"):
        train(cfg)


def test_bad_data_errors_name_the_file(tiny_folder, tmp_path):
    import shutil
    d = tmp_path / "d"
    shutil.copytree(tiny_folder, d)
    (d / "0123_bad.png").write_bytes(b"\x89PNG truncated")
    cfg = TrainConfig(data=str(d), out=str(tmp_path / "run"), val_fraction=0.0, epochs=1, export=False, **TINY)
    with pytest.raises(ValueError, match=r"0123_bad\.png.*cannot be read"):
        train(cfg)
    cfg.skip_bad = True
    with pytest.warns(UserWarning, match="0123_bad.png"):
        train(cfg)
    with pytest.raises(ValueError, match=r"outside the charset"):
        train(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "r2"), charset="012", epochs=1, **TINY))


def test_export_and_evaluate(tiny_folder, tmp_path, capsys):
    pytest.importorskip("captcha_fast.export")
    import argparse
    from captcha_fast import evaluate
    cfg = TrainConfig(data=str(tiny_folder), out=str(tmp_path / "run"), val_fraction=0.0, augment=False,
                      epochs=3, lr=1e-2, **TINY)
    path = train(cfg)
    assert path.name == "model.pt"
    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    evaluate.run(p.parse_args([str(path), str(tiny_folder), "--json", "--gallery", str(tmp_path / "g.png")]))
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 8 and 0 <= out["accuracy"] <= 1 and 0 <= out["cer"]
    assert (tmp_path / "g.png").exists()
    # `captcha-fast export` of the best checkpoint reads the same as the run's model.pt
    from captcha_fast import api
    from captcha_fast.cli import main
    assert main(["export", str(tmp_path / "run" / "best.ckpt"), "--out", str(tmp_path / "again.pt")]) == 0
    images = sorted(tiny_folder.glob("*.png"))
    assert api.predict_batch(images, tmp_path / "again.pt") == api.predict_batch(images, path)


def test_score_and_confusions():
    from captcha_fast.evaluate import score
    r = score(["AB0", "I1C", "XY"], ["AB0", "11C", "XYZ"], merge="0O,1I")
    assert r.n == 3 and r.correct == 1 and r.accuracy == pytest.approx(1 / 3)
    assert r.cer == pytest.approx(2 / 8) and r.accuracy_merged == pytest.approx(2 / 3)
    assert ("I", "1", 1) in r.confusions and ("∅", "Z", 1) in r.confusions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single(tmp_path):
    """torchrun with 2 gloo ranks: both end with identical weights, close to the one-process run
    (not equal: each rank's batch norms see only its half of a batch)."""
    args = ["synthetic", "--synth-train", "32", "--synth-val", "8", "--synth-min-len", "2", "--synth-max-len", "3",
            "--synth-charset", "AB12", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--height", "16",
            "--channels", "8", "16", "--hidden", "32", "--dropout", "0", "--no-augment", "--quiet", "--threads", "1",
            "--seed", "2", "--char-warmup", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CAPTCHA_FAST_DUMP_RANKS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "captcha_fast.train"]
    ddp = subprocess.run(cmd + args + ["--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # each rank saved its final weights (rank 0 also wrote the checkpoint)
    weights = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0, msg=k)
    single = subprocess.run([sys.executable, "-m", "captcha_fast.train"] + args + ["--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "last.ckpt", weights_only=True)["model"]
    from captcha_fast.train import build_model
    torch.manual_seed(2)  # what train() does before building the model
    init = build_model(TrainConfig(data="synthetic", height=16, channels=(8, 16), hidden_dim=32, dropout=0.0),
                       Charset("12AB")).state_dict()
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    da = torch.cat([(a[k] - init[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - init[k]).flatten() for k in keys])
    # the same update, up to the batch-norm difference (per-rank batch statistics on CPU)
    cos = float(torch.nn.functional.cosine_similarity(da, db, dim=0))
    assert cos > 0.9 and 0.8 < float(da.norm() / db.norm()) < 1.25, (cos, float(da.norm() / db.norm()))


def test_init_from_copies_shared_symbols(tmp_path):
    from captcha_fast.model import CRNN, CRNNConfig
    from captcha_fast.train import init_from_checkpoint
    src = CRNN(CRNNConfig("ABC1", height=16, channels=(8, 16), hidden_dim=32))
    torch.save({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    dst = CRNN(CRNNConfig("1Cxy", height=16, channels=(8, 16), hidden_dim=32))
    assert init_from_checkpoint(dst, tmp_path) == []
    torch.testing.assert_close(dst.convs[0][0].weight, src.convs[0][0].weight)
    w_src, w_dst = src.classifier.weight, dst.classifier.weight
    torch.testing.assert_close(w_dst[0], w_src[0])  # blank
    torch.testing.assert_close(w_dst[1], w_src[4])  # "1"
    torch.testing.assert_close(w_dst[2], w_src[3])  # "C"
    assert not torch.equal(w_dst[3], w_src[1])      # "x" is new: fresh init
