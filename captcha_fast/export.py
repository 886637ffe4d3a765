"""Saving and loading recognizers: TorchScript (.pt, one file that runs in Python
or C++ wherever the captcha_fast library is loaded) and torch.export (.pt2).

    save_recognizer(model, "model.pt")      # CRNN -> scripted Recognizer file (fp32 weights)
    rec = load_recognizer("model.pt")       # -> ScriptModule, precision chosen here
    texts, scores = rec([img_uint8_chw, ...])
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from captcha_fast.model import CRNN, CRNNConfig
from captcha_fast.recognizer import RECOGNIZER_FORMAT, Recognizer, build_recognizer, collate

# Attributes and methods that torch.jit.freeze must keep.
_PRESERVED = ["recognize", "preprocess", "logits", "decode", "config_json", "charset", "height",
              "in_channels", "decoder", "beam_width", "format"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _atomic_write(path: Path, write) -> Path:
    """write(tmp_path) then os.replace, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def script_recognizer(model: Union[CRNN, Recognizer], decoder: str = "beam", beam_width: int = 10) -> torch.jit.ScriptModule:
    """A scripted Recognizer (CPU, float32, batch norms folded) from a CRNN or an eager Recognizer."""
    rec = model if isinstance(model, Recognizer) else build_recognizer(model.cpu(), decoder=decoder, beam_width=beam_width)
    return torch.jit.script(rec.cpu().eval())


def save_recognizer(model: Union[CRNN, Recognizer], path: Union[str, os.PathLike], decoder: str = "beam",
                    beam_width: int = 10) -> Path:
    """Script `model` into a Recognizer and save it to `path` (atomically: temp file + os.replace).

    The file holds the float32 weights (batch norms folded), the config as JSON and the
    charset; `load_recognizer` (or plain `torch.jit.load` after loading the captcha_fast
    library) reads it back. `model` is not changed. Returns the path."""
    scripted = script_recognizer(model, decoder=decoder, beam_width=beam_width)
    return _atomic_write(Path(path), lambda tmp: torch.jit.save(scripted, tmp))


def _not_a_recognizer(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a captcha_fast recognizer ({why}); "
                      f"write one with captcha_fast.export.save_recognizer(model, path)")


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The conv dtype: explicit, or the default for the device (CUDA: bfloat16 where supported,
    else float16; CPU: float32, as bfloat16 measured slower on this AVX2 CPU)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def load_recognizer(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                    dtype: Union[None, str, torch.dtype] = None, freeze: bool = True) -> torch.jit.ScriptModule:
    """A saved TorchScript recognizer, on `device` (default CPU), with its convs in `dtype`
    (None/"auto": see resolve_dtype), frozen for inference unless freeze=False.

    The returned module keeps forward/recognize/preprocess/logits/decode and the
    config_json/charset attributes. ValueError if the file is not a recognizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    conv_dtype = resolve_dtype(dtype, device)
    try:
        rec = torch.jit.load(str(path), map_location=device)
    except RuntimeError as e:
        raise _not_a_recognizer(path, f"torch.jit.load failed: {str(e).strip().splitlines()[0]}") from e
    if not (hasattr(rec, "format") and hasattr(rec, "config_json") and hasattr(rec, "recognize")):
        raise _not_a_recognizer(path, "a TorchScript module without the Recognizer interface")
    if rec.format > RECOGNIZER_FORMAT:
        raise ValueError(f"{str(path)!r} is recognizer format {rec.format}; this captcha_fast reads up to "
                         f"{RECOGNIZER_FORMAT}: upgrade captcha_fast")
    rec.eval()
    if conv_dtype != torch.float32:
        rec.model.convs.to(conv_dtype)
    if freeze:
        rec = torch.jit.freeze(rec, preserved_attrs=_PRESERVED)
    return rec


def config_of(recognizer) -> CRNNConfig:
    """The CRNNConfig stored in a (scripted, frozen or eager) recognizer."""
    return CRNNConfig(**json.loads(recognizer.config_json))
