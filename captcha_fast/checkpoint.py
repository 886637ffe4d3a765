"""Training checkpoints: written atomically (files.atomic_write), a version checked on load, models from checkpoints.

    RUN_DIR/best.ckpt   the best validation epoch (weights only: not resumable)
    RUN_DIR/last.ckpt   the last epoch, with optimizer, scheduler, scaler and RNG states (--resume)

A checkpoint is a dict saved with torch.save (readable with weights_only=True):
version, config (TrainConfig as a dict), model_config (CRNNConfig), charset, model
(state dict), epoch (0-based), metrics (one row per epoch), best (the best row),
bad_epochs, elapsed; last.ckpt adds optimizer, scheduler, scaler, rng.

This module knows no training code, so export and the CLI's export command can use it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from captcha_fast.files import atomic_write
from captcha_fast.model import CRNN, CRNNConfig, general_model, style_model, widen

# bump when the dict changes; load_checkpoint refuses newer ones (2: style heads, 3: heads that own block 2)
CHECKPOINT_VERSION = 3
PRETRAINED_CHECKPOINT = Path(__file__).resolve().parent / "pretrained" / "default.ckpt"
"""The shipped model's training weights (batch norms unfolded): where `captcha-fast train` starts."""
PathLike = Union[str, os.PathLike]


def save_checkpoint(checkpoint: dict, path: PathLike) -> Path:
    """Save `checkpoint` atomically to `path`, stamped with the oldest version that reads it: 1, 2 for a
    model with style heads, 3 for heads that own block 2 (an older captcha_fast then says to upgrade
    instead of failing on the config)."""
    config = checkpoint.get("model_config", {})
    version = (3 if config.get("style_branch", "rnn") != "rnn" else 2) if config.get("style_heads") else 1
    return atomic_write(path, lambda tmp: torch.save({**checkpoint, "version": version}, tmp))


def checkpoint_file(path: PathLike) -> Path:
    """`path` itself, or RUN_DIR/best.ckpt for a run directory; FileNotFoundError if missing."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: PathLike) -> dict:
    """The checkpoint dict at `path` (a .ckpt file or a run directory: its best.ckpt), on the CPU, its
    weights in float32 (a shipped checkpoint stores them in float16: with_half_weights). ValueError naming
    the file if it is not a captcha_fast training checkpoint or was written by a newer captcha_fast."""
    ckpt = read_checkpoint(path)
    ckpt["model"] = {k: v.float() if v.dtype == torch.float16 else v for k, v in ckpt["model"].items()}
    return ckpt


def read_checkpoint(path: PathLike) -> dict:
    """load_checkpoint's dict as stored (float16 weights stay so): to write it back with another entry."""
    path = checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a foreign file, with advice that does not apply
        # (e.g. to load it with weights_only=False: unsafe): the cause stays chained for --debug
        raise ValueError(f"{str(path)!r} is not a captcha_fast training checkpoint (torch.load cannot read it "
                         f"as one)") from e
    if not isinstance(ckpt, dict) or not {"version", "model", "model_config"} <= ckpt.keys():
        raise ValueError(f"{str(path)!r} is not a captcha_fast training checkpoint (no version/model/model_config)")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} is checkpoint version {ckpt['version']}; this captcha_fast reads up to "
                         f"{CHECKPOINT_VERSION}: upgrade captcha_fast")
    return ckpt


def with_half_weights(checkpoint: dict) -> dict:
    """`checkpoint` with its model's float32 weights rounded to float16 and stored so (load_checkpoint widens
    them): a shipped model's, half the file. The TorchScript recognizer exported from it then stores its
    GRUs, which float16 holds exactly, in float16 too (model.InferenceGRU). A tensor float16 cannot hold
    (a value beyond its 65504) stays float32."""
    model = {k: v.half() if v.dtype == torch.float32 and bool(v.half().isfinite().all()) else v
             for k, v in checkpoint["model"].items()}
    return {**checkpoint, "model": model}


def checkpoint_config(ckpt: dict) -> CRNNConfig:
    """The model config of a loaded checkpoint dict, every default filled in: a checkpoint saved before a
    field existed (the shipped default.ckpt has no res_blocks) has that field's default, so it compares
    equal to one of the same shape saved since."""
    return CRNNConfig(**ckpt["model_config"])


def model_from_checkpoint(ckpt: dict) -> CRNN:
    """The CRNN (eval mode) of a loaded checkpoint dict."""
    model = CRNN(checkpoint_config(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_model(path: PathLike) -> CRNN:
    """The CRNN (eval mode) of RUN_DIR/best.ckpt, last.ckpt or a run directory (its best.ckpt)."""
    return model_from_checkpoint(load_checkpoint(path))


def transfer_weights(model: CRNN, state: Dict[str, Tensor], charset: str) -> List[str]:
    """Copy `state` (a CRNN state dict whose classes are blank + `charset`) into `model` wherever
    names and shapes match. Classifier rows go per symbol: the blank and every symbol both
    charsets share keep their row (a symbol known only in its other case, as "A" from a case-folded
    "a", takes that row), symbols new to `model` keep their fresh init. Returns the
    names left at their init (shapes differ)."""
    old = {s: i + 1 for i, s in enumerate(charset)}
    # a symbol the source lacks but knows in the other case (a case-folded source) starts from that row
    old.update({s.swapcase(): i for s, i in old.items() if s.swapcase() not in old})
    rows = [(0, 0)] + [(i + 1, old[s]) for i, s in enumerate(model.config.charset) if s in old]
    new_rows, old_rows = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    skipped = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            src = state.get(name)
            if name.startswith("classifier.") and src is not None and src.shape[1:] == t.shape[1:]:
                t[new_rows] = src[old_rows].to(t.dtype)
            elif src is not None and src.shape == t.shape:
                t.copy_(src)
            else:
                skipped.append(name)
    return skipped


# What the weights were trained to see: a start from weights that saw another input (grey vs ink
# map, another height, colour) would copy every layer whose shape happens to match and fine-tune
# features of the wrong input.
INPUT_OPTIONS = ("ink", "height", "in_channels")


def init_from_checkpoint(model: CRNN, path: PathLike, style: Optional[str] = None) -> List[str]:
    """transfer_weights from the checkpoint at `path` (a model pretrained on one charset starts
    another; a narrower one starts a wider model, widened first). A checkpoint with style heads
    gives one head's model: `style`'s (model.style_model), else its general head's. ValueError naming
    the file if its input options (INPUT_OPTIONS) differ from the model's, or it is wider. Returns
    the names left at their init."""
    ckpt = load_checkpoint(path)
    if checkpoint_config(ckpt).style_heads:  # from here on, the checkpoint of that one head's model
        whole = model_from_checkpoint(ckpt)
        one = style_model(whole, style) if style else general_model(whole)
        ckpt = {**ckpt, "model_config": one.config.to_dict(), "model": one.state_dict()}
    elif style:
        raise ValueError(f"cannot start from the {style!r} head of {str(checkpoint_file(path))!r}: it has no "
                         f"style heads")
    source = checkpoint_config(ckpt)
    differ = [f"{k}={getattr(model.config, k)!r} (the checkpoint's: {getattr(source, k)!r})" for k in INPUT_OPTIONS
              if getattr(model.config, k) != getattr(source, k)]
    if differ:
        raise ValueError(f"cannot start from {str(checkpoint_file(path))!r}: its weights were trained on another "
                         f"input than this model's: {', '.join(differ)}; use the checkpoint's settings, or train "
                         f"from scratch (--from-scratch)")
    if source.res_blocks > model.config.res_blocks:
        raise ValueError(f"cannot start from {str(checkpoint_file(path))!r}: it has {source.res_blocks} residual "
                         f"block{'s' * (source.res_blocks > 1)}, more than this model's {model.config.res_blocks}")
    state = ckpt["model"]
    if (source.channels, source.hidden_dim) != (model.config.channels, model.config.hidden_dim):
        try:  # a wider model grows from the narrower one (model.widen), reading what it read
            state = widen(model_from_checkpoint(ckpt), model.config.channels, model.config.hidden_dim).state_dict()
        except ValueError as e:
            raise ValueError(f"cannot start from {str(checkpoint_file(path))!r}: {e}") from None
    return transfer_weights(model, state, source.charset)
