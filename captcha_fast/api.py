"""The one-call API: predict_batch(images) -> strings, and load(path) -> a recognizer.

    import captcha_fast
    captcha_fast.predict_batch(["a.png", "b.png"])                  # the shipped model
    rec = captcha_fast.load("runs/x/model.pt")                       # TorchScript or .pt2
    captcha_fast.predict_batch(tensors, rec, decoder="greedy")
    captcha_fast.predict_batch(tensors, rec, top_k=3)                # -> List[List[Hypothesis]]
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

from captcha_fast import export
from captcha_fast.decode import Hypothesis
from captcha_fast.images import ImageLike, to_tensors
from captcha_fast.recognizer import Recognizer, resized_width

PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "default.pt"
"""The shipped pretrained recognizer (predict_batch's default model)."""
DEFAULT_MODEL = PRETRAINED  # the name the CLI uses

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()  # loaded recognizers, by (path, mtime, device, dtype)
_CACHE_SIZE = 4


def _amp_dtype(amp: Optional[bool], device: torch.device) -> Union[str, torch.dtype]:
    """None: the device default (CUDA bf16/fp16, CPU fp32); True: low precision; False: fp32."""
    if amp is None:
        return "auto"
    if not amp:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def load(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
         amp: Optional[bool] = None):
    """A recognizer from a TorchScript file (.pt) or a torch.export program (.pt2), ready for
    predict_batch: on `device` (default: CUDA if available, else CPU), convolutions in low
    precision per `amp` (None: the device default, see export.resolve_dtype: bf16/fp16 on CUDA,
    bf16 on CPUs with native bf16, else fp32; True forces bf16/fp16, False fp32)."""
    dev = torch.device(device) if device is not None else _default_device()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(dev), str(_amp_dtype(amp, dev)))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if export._is_export_archive(path):
        rec = export.load_program(path)  # float32, CPU
    else:
        rec = export.load_recognizer(path, device=dev, dtype=_amp_dtype(amp, dev))
    _CACHE[key] = rec
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return rec


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_model(device: Union[None, str, torch.device] = None, amp: Optional[bool] = None):
    """The shipped pretrained recognizer (captcha_fast/pretrained/default.pt), loaded as `load` does;
    FileNotFoundError saying how to make one if it is missing."""
    path = PRETRAINED
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped pretrained model {str(path)!r} is missing: train one and save it there "
            f"(captcha_fast.export.save_recognizer(model, {str(path)!r}), or `captcha-fast export "
            f"RUN_DIR/best.ckpt --out {str(path)!r}`), or pass model= a recognizer file or object")
    return load(path, device=device, amp=amp)


def _resolve_model(model, device, amp):
    if model is None:
        return default_model(device=device, amp=amp)
    if isinstance(model, (str, os.PathLike)):
        return load(model, device=device, amp=amp)
    if isinstance(model, (Recognizer, torch.jit.ScriptModule, export.ExportedRecognizer)) and hasattr(model, "recognize"):
        return model
    raise TypeError(f"model must be None (the pretrained model), a recognizer file path or a loaded recognizer "
                    f"(captcha_fast.load), got {type(model).__name__}")


def predict_batch(
    images: Union[ImageLike, Sequence[ImageLike]],
    model: Any = None,
    *,
    decoder: str = "beam",
    beam_width: int = 10,
    top_k: int = 1,
    device: Union[None, str, torch.device] = None,
    amp: Optional[bool] = None,
    batch_size: int = 64,
    return_scores: bool = False,
) -> Union[List[str], List[List[Hypothesis]]]:
    """Read the text in each image.

    images: a list of images (file paths, PIL images, H x W x C numpy arrays, or H x W / C x H x W
        tensors, uint8 or float in [0, 1]; sizes may differ), or one N x C x H x W tensor.
    model: None (the shipped pretrained model), a .pt/.pt2 path, or a loaded recognizer.
    decoder: "beam" (CTC prefix beam search, `beam_width` beams) or "greedy".
    top_k: 1 returns one string per image; > 1 (or return_scores=True) returns, per image, up
        to top_k Hypothesis(text, score) best first (top_k > 1: beam search only).
    device, amp: used when the model is loaded here (see `load`); a loaded model keeps its own.
    batch_size: images per forward pass; images are sorted by width to reduce padding and
        the results come back in input order."""
    if decoder not in ("beam", "greedy"):
        raise ValueError(f"decoder must be 'beam' or 'greedy', got {decoder!r}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if top_k < 1 or (decoder == "beam" and top_k > beam_width):
        raise ValueError(f"top_k must be in [1, beam_width = {beam_width}], got {top_k}")
    if decoder == "greedy" and top_k != 1:
        raise ValueError(f"the greedy decoder gives one hypothesis per image: top_k must be 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rec = _resolve_model(model, device, amp)
    tensors = to_tensors(images)
    height = int(rec.height)
    # sort by width after the resize, so each chunk pads little
    order = sorted(range(len(tensors)), key=lambda i: resized_width(tensors[i].shape[-2], tensors[i].shape[-1], height))
    texts: List[List[str]] = [[] for _ in tensors]
    scores: List[List[float]] = [[] for _ in tensors]
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        t, s = rec.recognize([tensors[i] for i in idx], decoder, beam_width, top_k)
        for i, ti, si in zip(idx, t, s.tolist()):
            texts[i], scores[i] = ti, si
    if top_k == 1 and not return_scores:
        return [t[0] for t in texts]
    return [[Hypothesis(t, s) for t, s in zip(ts, ss) if s > float("-inf")] for ts, ss in zip(texts, scores)]
