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
from captcha_fast.decode import Hypothesis, to_hypotheses
from captcha_fast.preprocess import ImageLike, check_width, to_tensors
from captcha_fast.recognizer import Recognizer

DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "default.pt"
"""The shipped pretrained recognizer (predict_batch's default model)."""

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()  # loaded recognizers, by (path, mtime, device, dtype)
_CACHE_SIZE = 4


def load(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
         amp: Optional[bool] = None):
    """A recognizer from a TorchScript file (.pt) or a torch.export program (.pt2), ready for
    predict_batch. A .pt goes on `device` (default: CUDA if available, else CPU) with its
    convolutions in the precision export.resolve_dtype picks for `amp` (None: the device's
    fastest; True: low precision; False: float32). A .pt2 runs float32 on the CPU and refuses
    anything else. Loaded files are cached (by path, modification time, device and precision)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    is_program = export._is_export_archive(path)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() and not is_program else "cpu")
    dtype = export.amp_dtype(amp)
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(dev), dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if is_program:
        rec = export.load_program(path, device=dev, dtype="float32" if amp is False else dtype)
    else:
        rec = export.load_recognizer(path, device=dev, dtype=dtype)
    _CACHE[key] = rec
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return rec


def default_model(device: Union[None, str, torch.device] = None, amp: Optional[bool] = None):
    """The shipped pretrained recognizer (captcha_fast/pretrained/default.pt), loaded as `load` does;
    FileNotFoundError saying how to make one if it is missing."""
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(
            f"the shipped pretrained model {str(DEFAULT_MODEL)!r} is missing: reinstall captcha_fast, or pass "
            f"model= a recognizer file (`captcha-fast export RUN_DIR/best.ckpt --out model.pt`)")
    return load(DEFAULT_MODEL, device=device, amp=amp)


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
    check_decode_args(decoder, beam_width, top_k)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rec = _resolve_model(model, device, amp)
    tensors = to_tensors(images)
    height, max_width = int(rec.height), int(rec.max_width)
    # sort by width after the resize, so each chunk pads little; too wide an image fails here, by name
    widths = [check_width(t.shape[-2], t.shape[-1], height, max_width, f"images[{i}]") for i, t in enumerate(tensors)]
    order = sorted(range(len(tensors)), key=widths.__getitem__)
    texts: List[List[str]] = [[] for _ in tensors]
    scores: List[List[float]] = [[] for _ in tensors]
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        t, s = rec.recognize([tensors[i] for i in idx], decoder, beam_width, top_k)
        for i, ti, si in zip(idx, t, s.tolist()):
            texts[i], scores[i] = ti, si
    if top_k == 1 and not return_scores:
        return [t[0] for t in texts]
    return to_hypotheses(texts, torch.tensor(scores))


def check_decode_args(decoder: str, beam_width: int, top_k: int) -> None:
    """ValueError unless (decoder, beam_width, top_k) make sense together (predict_batch and the CLI)."""
    if decoder not in ("beam", "greedy"):
        raise ValueError(f"decoder must be 'beam' or 'greedy', got {decoder!r}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if decoder == "greedy" and top_k != 1:
        raise ValueError(f"the greedy decoder gives one hypothesis per image: top_k must be 1, got {top_k}")
    if top_k < 1 or top_k > beam_width:
        raise ValueError(f"top_k must be in [1, beam_width = {beam_width}], got {top_k}")
