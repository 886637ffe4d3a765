"""Checkpoints: the version check, foreign files, version-1 files, init-from charset mapping."""
import copy
from dataclasses import replace

import pytest
import torch

from captcha_fast.checkpoint import (CHECKPOINT_VERSION, init_from_checkpoint, load_checkpoint,
                                     load_model, save_checkpoint, with_half_weights)
from captcha_fast.model import CRNN, CRNNConfig


def _crnn(charset, seed=0):
    torch.manual_seed(seed)
    return CRNN(CRNNConfig(charset, height=16, channels=(8, 16), hidden_dim=32))


def test_round_trip_and_run_directory(tmp_path):
    model = _crnn("AB1")
    path = save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(), "epoch": 4},
                           tmp_path / "best.ckpt")
    ckpt = load_checkpoint(tmp_path)  # a run directory means its best.ckpt
    assert ckpt["version"] == 1 and ckpt["epoch"] == 4  # without style heads, what captcha_fast 1 reads
    assert "style_heads" not in ckpt["model_config"]
    loaded = load_model(path)
    assert not loaded.training and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_model_with_style_heads_is_a_version_2_or_3_checkpoint(tmp_path):
    """Version 2 for heads of a GRU and classifier, 3 for heads that own block 2 (the config's style_branch,
    which an older captcha_fast cannot read)."""
    from captcha_fast.model import StyleGate, with_style_heads
    model = _crnn("AB1")
    own_block2 = copy.deepcopy(model)
    with torch.no_grad():
        own_block2.convs[2][0].weight.add_(0.1)
    for style, gate, version in ((model, StyleGate(16, 1), 2), (own_block2, StyleGate(8, 1), 3)):
        styled = with_style_heads(model, {"s": style}, gate)
        save_checkpoint({"model": styled.state_dict(), "model_config": styled.config.to_dict()}, tmp_path / "s.ckpt")
        assert load_checkpoint(tmp_path / "s.ckpt")["version"] == version
        loaded = load_model(tmp_path / "s.ckpt")
        assert loaded.config == styled.config and loaded.config.style_heads == ("s",)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in styled.state_dict().items())
    assert CHECKPOINT_VERSION == 3  # the newest, which this captcha_fast reads


def test_a_checkpoint_with_half_weights_loads_them_as_float32(tmp_path):
    """with_half_weights (what a shipped model is): the weights rounded to float16 and stored so; load_checkpoint
    widens them, so the model is the original up to that rounding and the file about half."""
    model = _crnn("AB1")
    full = save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "f.ckpt")
    half = save_checkpoint(with_half_weights(load_checkpoint(full)), tmp_path / "h.ckpt")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)["model"]
    for k, v in model.state_dict().items():
        rounded = v.half().to(v.dtype) if v.is_floating_point() else v
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], rounded), k
    assert not all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # really rounded


def test_init_from_a_model_with_style_heads_takes_one_heads_model(tmp_path):
    """A styled checkpoint starts a plain CRNN from its general head's model, or from a style head's (its
    GRU and classifier on the shared convs), also widened; a plain checkpoint has no style to give."""
    from captcha_fast.model import StyleGate, general_model, style_model, with_style_heads
    general, own = _crnn("AB1", seed=1), _crnn("AB1", seed=2)
    own.load_state_dict({k: v for k, v in general.state_dict().items() if k.startswith(("convs.", "project."))},
                        strict=False)
    styled = with_style_heads(general.eval(), {"s": own.eval()}, StyleGate(16, 1))
    save_checkpoint({"model": styled.state_dict(), "model_config": styled.config.to_dict()}, tmp_path / "s.ckpt")
    for style, want in ((None, general_model(styled)), ("s", style_model(styled, "s"))):
        dst = _crnn("AB1", seed=3)
        assert init_from_checkpoint(dst, tmp_path / "s.ckpt", style) == []
        for k, v in want.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (style, k)
    assert not torch.equal(own.rnn.weight_hh_l0, general.rnn.weight_hh_l0)  # the two heads differ
    wide = CRNN(CRNNConfig("AB1", height=16, channels=(8, 16), hidden_dim=48)).eval()
    init_from_checkpoint(wide, tmp_path / "s.ckpt", "s")
    x, w = torch.rand(2, 1, 16, 40), torch.tensor([40, 28])
    with torch.no_grad():  # the widened model reads as the style head's model (model.widen)
        torch.testing.assert_close(wide(x, w)[0], style_model(styled, "s")(x, w)[0], atol=1e-5, rtol=1e-5)
    save_checkpoint({"model": general.state_dict(), "model_config": general.config.to_dict()}, tmp_path / "p.ckpt")
    with pytest.raises(ValueError, match="cannot start from the 's' head of .*p.ckpt'.*no style heads"):
        init_from_checkpoint(_crnn("AB1"), tmp_path / "p.ckpt", "s")


def test_version_1_checkpoint_of_the_old_trainer_loads(tmp_path):
    """The dict train.py wrote before checkpoint.py existed (version 1, val_char_acc in its rows)."""
    model = _crnn("0123")
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "lr": 1e-3, "val_loss": 1.1, "val_acc": 0.4,
           "val_cer": 0.3, "val_char_acc": 0.7, "val_n": 10, "seconds": 2.0}
    old = {"version": 1, "config": {"data": "x", "channels": (8, 16)}, "model_config": model.config.to_dict(),
           "charset": "0123", "model": model.state_dict(), "epoch": 0, "metrics": [row], "best": row,
           "bad_epochs": 0, "elapsed": 2.0}
    torch.save(old, tmp_path / "best.ckpt")
    assert load_model(tmp_path).config.charset == "0123"
    assert load_checkpoint(tmp_path)["best"] == row


def test_newer_or_foreign_files_are_clear_errors(tmp_path):
    model = _crnn("AB")
    newer = {"version": CHECKPOINT_VERSION + 1, "model": model.state_dict(), "model_config": model.config.to_dict()}
    torch.save(newer, tmp_path / "new.ckpt")
    with pytest.raises(ValueError, match=rf"new\.ckpt' is checkpoint version {CHECKPOINT_VERSION + 1}; this "
                                         rf"captcha_fast reads up to {CHECKPOINT_VERSION}: upgrade"):
        load_model(tmp_path / "new.ckpt")
    torch.save({"weights": model.state_dict()}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt' is not a captcha_fast training checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 8)
    for name in ("text.ckpt", "random.ckpt"):  # torch's own text (KeyError: 101; "use weights_only=False") left out
        with pytest.raises(ValueError) as e:
            load_checkpoint(tmp_path / name)
        assert str(e.value) == f"{str(tmp_path / name)!r} is not a captcha_fast training checkpoint (torch.load " \
                               f"cannot read it as one)"
    with pytest.raises(FileNotFoundError, match=r"nowhere/best\.ckpt' does not exist"):
        load_checkpoint(tmp_path / "nowhere" / "best.ckpt")


def test_init_from_maps_classifier_rows_per_symbol(tmp_path):
    src = _crnn("ABC1", seed=1)
    save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    dst = _crnn("1Cxy", seed=2)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    assert init_from_checkpoint(dst, tmp_path) == []
    torch.testing.assert_close(dst.convs[0][0].weight, src.convs[0][0].weight)
    for name in ("classifier.weight", "classifier.bias"):
        s, d, f = src.state_dict()[name], dst.state_dict()[name], fresh[name]
        torch.testing.assert_close(d[0], s[0])  # blank
        torch.testing.assert_close(d[1], s[4])  # "1": class 4 in ABC1
        torch.testing.assert_close(d[2], s[3])  # "C"
        torch.testing.assert_close(d[3:], f[3:])  # "x", "y": new symbols keep their fresh init


@torch.no_grad()
def test_init_from_a_narrower_checkpoint_grows_it(tmp_path):
    src = _crnn("AB1", seed=1).eval()
    save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    wider = CRNN(CRNNConfig("AB1", height=16, channels=(12, 16), hidden_dim=48)).eval()
    assert init_from_checkpoint(wider, tmp_path) == []
    x, w = torch.rand(2, 1, 16, 40), torch.tensor([40, 28])
    torch.testing.assert_close(wider(x, w)[0], src(x, w)[0], atol=1e-6, rtol=1e-6)  # reads what it read
    narrower = CRNN(CRNNConfig("AB1", height=16, channels=(8, 16), hidden_dim=24))
    with pytest.raises(ValueError, match=r"best\.ckpt'.*hidden 24 is narrower"):
        init_from_checkpoint(narrower, tmp_path)


def test_init_from_a_shallower_checkpoint_grows_residual_blocks(tmp_path):
    src = _crnn("AB1", seed=1).eval()
    save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    deep = CRNN(replace(src.config, res_blocks=1)).eval()
    assert {k.split(".")[1] for k in init_from_checkpoint(deep, tmp_path)} == {"4", "5"}  # the new block's convs
    x, w = torch.rand(2, 1, 16, 40), torch.tensor([40, 28])
    torch.testing.assert_close(deep(x, w)[0], src(x, w)[0], atol=0, rtol=0)  # reads what it read
    save_checkpoint({"model": deep.state_dict(), "model_config": deep.config.to_dict()}, tmp_path / "deep.ckpt")
    with pytest.raises(ValueError, match=r"deep\.ckpt'.*1 residual block, more than this model's 0"):
        init_from_checkpoint(CRNN(src.config), tmp_path / "deep.ckpt")


def test_a_case_folded_source_starts_both_cases(tmp_path):
    src = _crnn("abc1", seed=1)
    save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    dst = _crnn("ABa9", seed=2)
    fresh = dst.state_dict()["classifier.weight"].clone()
    init_from_checkpoint(dst, tmp_path)
    w, s = dst.state_dict()["classifier.weight"], src.state_dict()["classifier.weight"]
    torch.testing.assert_close(w[1], s[1])  # "A" from "a"
    torch.testing.assert_close(w[2], s[2])  # "B" from "b"
    torch.testing.assert_close(w[3], s[1])  # "a" itself
    torch.testing.assert_close(w[4], fresh[4])  # "9": new


@pytest.mark.parametrize("change, named", [
    (dict(ink=True), "ink=True (the checkpoint's: False)"),      # same shapes: would copy every layer
    (dict(height=20), "height=20 (the checkpoint's: 16)"),       # convs would copy, the projection not
    (dict(in_channels=3), "in_channels=3 (the checkpoint's: 1)"),
])
def test_init_from_refuses_weights_trained_on_another_input(tmp_path, change, named):
    src = _crnn("AB1")
    save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "best.ckpt")
    dst = CRNN(CRNNConfig("AB1", **{**dict(height=16, channels=(8, 16), hidden_dim=32), **change}))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=rf"best\.ckpt'.*another input.*{named.replace('(', '.').replace(')', '.')}"
                                         r".*--from-scratch"):
        init_from_checkpoint(dst, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing copied
