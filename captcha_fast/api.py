"""The one-call API: predict_batch(images) -> strings, and load(path) -> a recognizer.

    import captcha_fast
    captcha_fast.predict_batch(["a.png", "b.png"])                  # the shipped model
    rec = captcha_fast.load("runs/x/model.pt")                       # TorchScript or .pt2
    captcha_fast.predict_batch(tensors, rec, decoder="greedy")
    captcha_fast.predict_batch(tensors, rec, top_k=3)                # -> List[List[Hypothesis]]
    captcha_fast.predict_batch(paths, return_scores=True)[0][0].confidence  # P(right), in [0, 1]
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

from captcha_fast import formats
from captcha_fast.confidence import apply as apply_calibration
from captcha_fast.confidence import calibration_of
from captcha_fast.decode import Hypothesis, to_hypotheses
from captcha_fast.machine import auto_threads, num_threads, use_auto_threads  # noqa: F401 (auto_threads: API)
from captcha_fast.preprocess import ImageLike, check_width, to_tensors
from captcha_fast.recognizer import Recognizer, check_decode_args, original_error, recognize, with_message

DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "default.pt"
"""The shipped pretrained recognizer (predict_batch's default model)."""

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()  # loaded recognizers, by (path, mtime, device, dtype)
_CACHE_SIZE = 4


def compiled_path(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None) -> Path:
    """Where the AOTInductor package compiled from the recognizer file `path` for `device` (default
    CPU) is kept, so that `load(path)` finds it: $CAPTCHA_FAST_CACHE (default ~/.cache/captcha_fast)
    /compiled/<the file's sha256, 16 digits>-<device type>.pt2. `captcha-fast export MODEL --compile`
    without --out writes it there (export.compile_package)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("CAPTCHA_FAST_CACHE", Path.home() / ".cache" / "captcha_fast"))
    return cache / "compiled" / f"{digest}-{torch.device(device or 'cpu').type}.pt2"


def load(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
         amp: Optional[bool] = None, compiled: Optional[bool] = None):
    """A recognizer ready for predict_batch, in the fastest format available for the file on `device`:

    - a .pt2 file as it is: torch.export programs, or an AOTInductor package (compiled models),
      which fix their device and precision (a different `device`/`amp` raises ValueError);
    - a TorchScript .pt on `device` (default: CUDA if available, else CPU), convolutions in the
      precision formats.resolve_dtype picks for `amp` (None: the device's fastest; True: low
      precision; False: float32) -- unless an AOTInductor package compiled from this very file
      for this device, torch version, CPU and precision is at compiled_path(path, device):
      then that (measured 1.05-1.2x the TorchScript module's speed on a 2-core AVX-512 CPU).
      compiled=False keeps the TorchScript module; compiled=True requires the package.

    format_of(recognizer) says which. Loaded files are cached (by path, modification time,
    device, precision and `compiled`); a call that finds its file there costs one stat, not a
    look inside the file (predict_batch loads its model on every call). `path` must be a recognizer
    file: a folder (a training run's) raises IsADirectoryError naming the recognizer in it
    (RUN_DIR/model.pt), a training checkpoint (RUN_DIR/best.ckpt) ValueError saying how to get one.
    A `device` this machine cannot use fails first (formats.resolve_device says why)."""
    path = Path(path)
    dev = formats.resolve_device(device)  # ValueError/RuntimeError saying what is wrong with `device`
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise _not_a_file(path, st)
    dtype = formats.amp_dtype(amp)
    key = (os.path.abspath(path), st.st_mtime_ns, None if dev is None else str(dev), dtype, compiled)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    is_pt2 = formats.file_kind(path) in ("program", "compiled")
    if dev is None:
        dev = None if is_pt2 else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_pt2:
        rec = formats.load_program(path, device=dev, dtype=dtype)
    else:
        rec = _compiled_for(path, dev, dtype, required=compiled is True) if compiled is not False else None
        if rec is None:
            rec = formats.load_recognizer(path, device=dev, dtype=dtype)
    _CACHE[key] = rec
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return rec


def _not_a_file(path: Path, st: Optional[os.stat_result]) -> OSError:
    """Why `path` cannot be loaded when it is no file: missing, or a folder (a training run's: naming
    the recognizer `captcha-fast train` writes in it, or how to write one)."""
    if st is None or not stat.S_ISDIR(st.st_mode):
        return FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    model = path / "model.pt"
    if model.is_file():
        return IsADirectoryError(f"{str(path)!r} is a folder, not a recognizer file: its recognizer is {str(model)!r}")
    if (path / "best.ckpt").is_file():
        return IsADirectoryError(f"{str(path)!r} is a training run's folder, without a recognizer (model.pt): write "
                                 f"one with `captcha-fast export {path} --out {model}`")
    return IsADirectoryError(f"{str(path)!r} is a folder, not a recognizer file (.pt or .pt2)")


def _compiled_for(path: Path, device: torch.device, dtype: str, required: bool):
    """The AOTInductor package compiled from the TorchScript file `path`, if one is at compiled_path
    and runs here in the precision asked for; else None (required=True: the error saying why)."""
    package = compiled_path(path, device)
    try:
        if not package.is_file():
            raise FileNotFoundError(f"no AOTInductor package compiled from {str(path)!r} for {device.type} at "
                                    f"{str(package)!r}: make one with `captcha-fast export {path} --compile`")
        return formats.load_program(package, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError):
        if required:
            raise
        return None


def format_of(recognizer) -> str:
    """Which format a loaded recognizer runs: "compiled" (AOTInductor package), "program"
    (torch.export programs, .pt2), "torchscript" (.pt) or "eager" (a Python Recognizer)."""
    if isinstance(recognizer, formats.ExportedRecognizer):
        return recognizer.kind
    return "torchscript" if isinstance(recognizer, torch.jit.ScriptModule) else "eager"


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
    if isinstance(model, (Recognizer, torch.jit.ScriptModule, formats.ExportedRecognizer)) and hasattr(model, "recognize"):
        return model
    raise TypeError(f"model must be None (the pretrained model), a recognizer file path or a loaded recognizer "
                    f"(captcha_fast.load), got {type(model).__name__}")


def predict_batch(
    images: Union[Sequence[ImageLike], torch.Tensor],  # a list of images, or one N x C x H x W tensor
    model: Any = None,
    *,
    decoder: str = "beam",
    beam_width: int = 10,
    top_k: int = 1,
    device: Union[None, str, torch.device] = None,
    amp: Optional[bool] = None,
    batch_size: int = 64,
    return_scores: bool = False,
    threads: Optional[int] = None,
    min_length: int = 0,
    max_length: Optional[int] = None,
    allowed: Optional[str] = None,
) -> Union[List[str], List[List[Hypothesis]]]:
    """Read the text in each image.

    images: a list of images (file paths, PIL images, H x W x C numpy arrays, or H x W / C x H x W
        tensors, uint8 or float in [0, 1]; sizes may differ), or one N x C x H x W tensor.
    model: None (the shipped pretrained model), a .pt/.pt2 path, or a loaded recognizer.
    decoder: "beam" (CTC prefix beam search, `beam_width` beams) or "greedy".
    top_k: 1 returns one string per image; > 1 (or return_scores=True) returns, per image, up
        to top_k Hypothesis(text, score, confidence) best first (top_k > 1: beam search only);
        confidence: the probability that the read is right, calibrated on held-out images
        (captcha_fast.confidence; fitted on the best reads, the same map for the others), or
        exp(score) for a model saved without a calibration.
    device, amp: used when the model is loaded here (see `load`); a loaded model keeps its own.
    batch_size: images per forward pass; images are sorted by width to reduce padding and
        the results come back in input order.
    threads: CPU threads for this call (torch.set_num_threads, restored after); None: auto_threads()
        -- torch's thread count, capped by the CPUs free to this process (affinity, cgroup quota, less
        what other processes keep busy; torch's threads wait on each other when one of them has no
        core: docs/speed.md); torch keeps that count until the decision changes.
    min_length, max_length, allowed: beam search reads only labels of min_length..max_length
        symbols (None: any length) drawn from `allowed` (None: the model's whole charset; either case
        for a case-folded model, one without upper-case letters) -- for captchas of a known length or
        alphabet."""
    max_length = -1 if max_length is None else max_length
    check_decode_args(decoder, beam_width, top_k, min_length, max_length, allowed is not None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None (auto) or an int >= 1, got {threads!r}")
    rec = _resolve_model(model, device, amp)
    tensors = to_tensors(images)
    names = image_names(images, len(tensors))
    height, max_width = int(rec.height), int(rec.max_width)
    # sort by width after the resize, so each chunk pads little; too wide an image fails here, by name
    widths = [check_width(t.shape[-2], t.shape[-1], height, max_width, names[i]) for i, t in enumerate(tensors)]
    order = sorted(range(len(tensors)), key=widths.__getitem__)
    texts: List[List[str]] = [[] for _ in tensors]
    scores: List[List[float]] = [[] for _ in tensors]
    if threads is None:
        use_auto_threads()
    with num_threads(threads) if threads is not None else contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            try:
                t, s = recognize(rec, [tensors[i] for i in idx], decoder, beam_width, top_k, min_length, max_length,
                                 allowed)
            except Exception as e:  # noqa: BLE001 - re-raised, naming the user's image
                raise _naming_user_images(e, [names[i] for i in idx]) from e
            for i, ti, si in zip(idx, t, s.tolist()):
                texts[i], scores[i] = ti, si
    if top_k == 1 and not return_scores:
        return [t[0] for t in texts]
    return with_confidence(to_hypotheses(texts, torch.tensor(scores)), calibration_of(rec), decoder)


def with_confidence(hyps: List[List[Hypothesis]], calibration, decoder: str) -> List[List[Hypothesis]]:
    """The hypotheses with their confidence: the score through the model's calibration (captcha_fast.confidence)."""
    scores = [h.score for hs in hyps for h in hs]
    conf = iter(apply_calibration(calibration, decoder, scores) if scores else [])
    return [[h._replace(confidence=next(conf)) for h in hs] for hs in hyps]


def image_names(images, n: int) -> List[str]:
    """How errors name each input image: its path where it is one, else images[i] (its index)."""
    if isinstance(images, (list, tuple)):
        return [repr(str(x)) if isinstance(x, (str, os.PathLike)) else f"images[{i}]" for i, x in enumerate(images)]
    return [f"images[{i}]" for i in range(n)]


# Where a chunk's error names one of its images: "images[k]: ..." (preprocess) or "sequence k" (the ops).
_CHUNK_IMAGE = re.compile(r"\bimages\[(\d+)\]|\bsequence (\d+)\b")


def _naming_user_images(e: Exception, chunk_names: List[str]) -> BaseException:
    """The error recognize raised on a chunk of images, as the user should see it: the original
    message of a TorchScript error (not the interpreter's banner), with the chunk's own image
    numbers turned into the names of the user's images."""
    e = original_error(e)
    message = str(e)

    def user_name(m: re.Match) -> str:
        k = int(m.group(1) or m.group(2))
        return chunk_names[k] if k < len(chunk_names) else m.group(0)

    named = _CHUNK_IMAGE.sub(user_name, message)
    return e if named == message else with_message(type(e), named)
