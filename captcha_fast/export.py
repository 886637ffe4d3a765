"""Saving and loading recognizers in three formats:

- TorchScript (.pt, the legacy format: torch.jit is deprecated): one file with the weights,
  preprocessing and decoding, runs in Python or C++ (torch::jit::load) wherever the captcha_fast
  library is loaded.
- torch.export programs (.pt2, export_program): the CRNN as "features" + "head" programs with a
  dynamic batch and width; portable across CPUs; preprocessing and decoding stay in Python.
- AOTInductor packages (.pt2, compile_package): the same two parts compiled to C++ for this
  machine (fastest on the CPU); Python (captcha_fast.load) or C++ (AOTIModelPackageLoader,
  examples/cpp/recognize_aoti.cpp).

    save_recognizer(model, "model.pt")      # CRNN -> scripted Recognizer file (fp32 weights)
    rec = load_recognizer("model.pt")       # -> ScriptModule, precision chosen here
    export_program("model.pt", "model.pt2") # -> .pt2 programs;  compile_package(...) -> compiled .pt2
    rec = load_program("model.pt2")         # -> ExportedRecognizer, the same interface
    texts, scores = rec([img_uint8_chw, ...])
"""
from __future__ import annotations

import copy
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from captcha_fast.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from captcha_fast.confidence import Calibration, calibration_of
from captcha_fast.machine import native_bf16
from captcha_fast.model import CRNN, CRNNConfig, InferenceCRNN
from captcha_fast.preprocess import MAX_WIDTH, collate
from captcha_fast.recognizer import (RECOGNIZER_FORMAT, Recognizer, allowed_tokens, build_recognizer,
                                     decode_log_probs)

# Attributes and methods that torch.jit.freeze must keep.
_PRESERVED = ["recognize", "preprocess", "log_probs", "decode", "config_json", "charset", "height",
              "in_channels", "decoder", "beam_width", "token_min_logp",
              "blank_skip_threshold", "max_width", "ink", "format"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CALIBRATION_FILE = "calibration.json"
"""The TorchScript archive's extra file holding the confidence calibration (captcha_fast.confidence);
a .pt2 keeps it under "calibration" in its settings, a training checkpoint under "calibration"."""


def script_recognizer(model: Union[CRNN, Recognizer], decoder: str = "beam", beam_width: int = 10) -> torch.jit.ScriptModule:
    """A scripted Recognizer (CPU, float32, batch norms folded) from a CRNN or an eager Recognizer."""
    rec = model if isinstance(model, Recognizer) else build_recognizer(model.cpu(), decoder=decoder, beam_width=beam_width)
    return torch.jit.script(rec.cpu().eval())


def save_recognizer(model: Union[CRNN, Recognizer], path: Union[str, os.PathLike], decoder: str = "beam",
                    beam_width: int = 10, calibration: Optional[Calibration] = None) -> Path:
    """Script `model` into a Recognizer and save it to `path` (atomically: temp file + os.replace).

    The file holds the float32 weights (batch norms folded), the config as JSON, the charset
    and the confidence calibration (`calibration`, else the model's own, if any) as the extra file
    CALIBRATION_FILE; `load_recognizer` (or plain `torch.jit.load` after loading the captcha_fast
    library) reads it back. `model` is not changed. Returns the path."""
    scripted = script_recognizer(model, decoder=decoder, beam_width=beam_width)
    return _save_scripted(scripted, path, calibration or calibration_of(model))


def _save_scripted(scripted: torch.jit.ScriptModule, path: Union[str, os.PathLike],
                   calibration: Optional[Calibration]) -> Path:
    extra = {CALIBRATION_FILE: calibration.to_json()} if calibration is not None else {}
    return atomic_write(Path(path), lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))


def _not_a_recognizer(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a captcha_fast recognizer ({why}); "
                      f"write one with captcha_fast.export.save_recognizer(model, path)")


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The one precision policy: the dtype the convolutions run in on `device`.

    dtype: a torch dtype or its name; None/"auto": the device's fastest (CUDA: bfloat16 where
    supported, else float16; CPU: bfloat16 only where the CPU has native bf16 (machine.native_bf16:
    AVX-512 BF16 / AMX), where it measured 1.6x faster than fp32, float32 elsewhere: on an AVX2-only
    CPU bf16 convs measured 25x slower, docs/deployment.md "Precision"); "low": the device's low precision
    (CUDA as auto, CPU bfloat16) whatever its speed."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype in (None, "auto", "low"):
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.bfloat16 if dtype == "low" or native_bf16(device) else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, 'auto' or 'low', got {dtype!r}")
    return _DTYPES[dtype]


def amp_dtype(amp: Optional[bool]) -> Optional[str]:
    """predict_batch/load's `amp` as a resolve_dtype argument: None -> "auto", True -> "low",
    False -> "float32"."""
    return "auto" if amp is None else ("low" if amp else "float32")


def load_recognizer(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                    dtype: Union[None, str, torch.dtype] = None, freeze: bool = True) -> torch.jit.ScriptModule:
    """A saved TorchScript recognizer, on `device` (default CPU), with its convs in `dtype`
    (None/"auto": see resolve_dtype), frozen for inference unless freeze=False.

    The returned module keeps forward/recognize/preprocess/log_probs/decode and the
    config_json/charset attributes. ValueError if the file is not a recognizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    conv_dtype = resolve_dtype(dtype, device)
    extra = {CALIBRATION_FILE: ""}  # stays "" when the file has none
    try:
        rec = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as e:
        raise _not_a_recognizer(path, f"torch.jit.load failed: {str(e).strip().splitlines()[0]}") from e
    if not (hasattr(rec, "format") and hasattr(rec, "config_json") and hasattr(rec, "recognize")):
        raise _not_a_recognizer(path, "a TorchScript module without the Recognizer interface")
    if rec.format > RECOGNIZER_FORMAT:
        raise ValueError(f"{str(path)!r} is recognizer format {rec.format}; this captcha_fast reads up to "
                         f"{RECOGNIZER_FORMAT}: upgrade captcha_fast")
    if rec.format < RECOGNIZER_FORMAT:  # an older interface: rebuild it with today's code, same weights
        rec = torch.jit.script(_rebuild(rec).to(device))
    rec.eval()
    if conv_dtype != torch.float32:
        rec.model.convs.to(conv_dtype)
    if freeze:
        rec = torch.jit.freeze(rec, preserved_attrs=_PRESERVED)
    rec.device = device  # a Python attribute (as ExportedRecognizer's): where recognizer.recognize sends images
    rec.calibration = _calibration(path, extra[CALIBRATION_FILE])  # another (confidence.calibration_of)
    return rec


def _calibration(path: Path, text) -> Optional[Calibration]:
    """The calibration stored in `path` (JSON text or a dict), None if none; ValueError naming the file if unreadable."""
    try:
        return Calibration.from_json(text) if isinstance(text, (str, bytes)) else Calibration.from_dict(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{str(path)!r}: its confidence calibration cannot be read: {e}") from None


def config_of(recognizer) -> CRNNConfig:
    """The CRNNConfig stored in a (scripted, frozen or eager) recognizer."""
    return CRNNConfig(**json.loads(recognizer.config_json))


def _rebuild(saved) -> Recognizer:
    """An eager Recognizer (float32, CPU) with the weights and settings of a saved one (any format)."""
    rec = Recognizer(InferenceCRNN(CRNN(config_of(saved))), decoder=saved.decoder, beam_width=saved.beam_width)
    rec.model.load_state_dict({k: v.float().cpu() for k, v in saved.model.state_dict().items()})
    rec.token_min_logp, rec.blank_skip_threshold = saved.token_min_logp, saved.blank_skip_threshold
    if hasattr(saved, "max_width"):
        rec.max_width = saved.max_width
    return rec.eval()


def eager_recognizer(path: Union[str, os.PathLike]) -> Recognizer:
    """An eager Recognizer (float32, CPU) with the weights and settings of a saved TorchScript
    recognizer, e.g. to export it as a .pt2 program."""
    saved = load_recognizer(path, dtype="float32", freeze=False)  # full-precision weights
    rec = _rebuild(saved)
    rec.calibration = saved.calibration  # a plain attribute: scripting leaves it out, save_recognizer writes it
    return rec


# ----------------------------------------------------------------------------- torch.export (.pt2)

class _Features(nn.Module):
    """images (N, C_in, H, W) float32, widths (N,) -> conv features (N, C, H / 4, W / 4) in the convs'
    dtype, widths / 4: the part the runner calls a chunk of images at a time. unpadded: without
    the padding masks, for batches where every width is W (the masks cost a third of the conv
    stack run op by op; torch.cond cannot choose here: export rejects its branches' strides)."""

    def __init__(self, net: InferenceCRNN, unpadded: bool = False):
        super().__init__()
        self.net, self.unpadded = net, unpadded

    def forward(self, images: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        return self.net.conv_stack(images.to(self.net.convs[0].weight.dtype), widths, self.unpadded)


class _Head(nn.Module):
    """Conv features, frame counts -> log-probs (T, N, K) float32, frame counts: the whole batch at once."""

    def __init__(self, net: InferenceCRNN):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
        return self.net.head(x, w)


PROGRAM_FORMAT = 2
"""What a .pt2 holds. 1: one "model" program of the whole CRNN whose GRU is a scan loop (written
before the gru op; still read). 2: a "features" part (the conv stack, run a chunk of images at a
time so activations stay in cache) and a "head" part (projection, captcha_fast::gru, classifier,
log-softmax, run on the whole batch), as torch.export programs or as AOTInductor-compiled models."""
_META = "captcha_fast.json"  # the archive's extra file with the settings (program .pt2 and compiled .pt2)
_PARTS = ("features", "head")


class ExportedRecognizer:
    """A recognizer from a .pt2 file, with the Python-side interface of a scripted Recognizer:
    __call__/forward, recognize, preprocess, log_probs, decode, config_json, charset, ...
    Preprocessing and decoding run the same functions as the Recognizer, eagerly.

    kind: "program" (torch.export programs, run op by op) or "compiled" (AOTInductor models,
    fused C++ kernels for this machine). device and dtype (the convs') are fixed at export."""

    def __init__(self, parts: dict, meta: dict, kind: str, device: Optional[torch.device] = None):
        self.parts = parts  # "features" + "head" callables, or "model" (PROGRAM_FORMAT 1)
        self.kind = kind
        self.config_json: str = meta["config_json"]
        cfg = json.loads(self.config_json)
        self.charset: List[str] = list(cfg["charset"])
        self.height: int = cfg["height"]
        self.in_channels: int = cfg["in_channels"]
        self.ink: bool = cfg.get("ink", False)
        self.decoder: str = meta["decoder"]
        self.beam_width: int = meta["beam_width"]
        self.token_min_logp = meta["token_min_logp"]
        self.blank_skip_threshold = meta["blank_skip_threshold"]
        self.max_width: int = meta.get("max_width", MAX_WIDTH)
        self.format: int = meta["format"]
        self.program_format: int = meta.get("program_format", 1)
        self.device = device or torch.device(meta.get("device", "cpu"))  # with its index (cuda:1)
        self.dtype: torch.dtype = _DTYPES[meta.get("dtype", "float32")]
        self.chunk: int = meta.get("chunk", 16)
        self.calibration: Optional[Calibration] = Calibration.from_dict(meta.get("calibration"))

    def __call__(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        return self.forward(images)

    def forward(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        texts, scores = self.recognize(images, self.decoder, self.beam_width, 1)
        return [t[0] for t in texts], scores[:, 0]

    def recognize(self, images: List[Tensor], decoder: str, beam_width: int, top_k: int, min_length: int = 0,
                  max_length: int = -1, allowed: Optional[str] = None) -> Tuple[List[List[str]], Tensor]:
        with torch.no_grad():
            batch, widths = self.preprocess([img.to(self.device) for img in images])
            log_probs, lengths = self.log_probs(batch, widths)
            return self.decode(log_probs, lengths, decoder, beam_width, top_k, min_length, max_length, allowed)

    def preprocess(self, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return collate(images, self.height, self.in_channels, self.max_width, self.ink)

    def log_probs(self, batch: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """(N, C, H, W) float batch, widths (N,) -> log-probs (T, N, K) float32, frame counts (N,)."""
        # The programs take widths that are multiples of 4 and at least 8 (export specialises a
        # length of 1 frame): pad to that. Exact: padding is masked, and the decoder reads each
        # sample's own frames only. Format 1 programs also need a batch of 2 or more.
        N, W = batch.shape[0], batch.shape[-1]
        W_pad = max(8, (W + 3) // 4 * 4)
        batch = batch.to(self.device, torch.float32)
        widths = widths.to(self.device)
        if W_pad != W:
            batch = F.pad(batch, (0, W_pad - W))
        if N == 1 and self.program_format == 1:
            batch, widths = batch.expand(2, -1, -1, -1), widths.expand(2)
        batch, widths = batch.contiguous(), widths.contiguous()
        with torch.no_grad():
            if "model" in self.parts:
                log_probs, lengths = self.parts["model"](batch, widths)
            else:
                log_probs, lengths = self.parts["head"](*self.features(batch, widths))
        return log_probs[:, :N], lengths[:N]

    def features(self, batch: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """The conv stack over chunks of about self.chunk images (on the CPU: activations stay in
        cache; measured 2x faster than the whole batch at 256), chunk sizes balanced."""
        N = batch.shape[0]
        features = self.parts["features"]
        if "features_unpadded" in self.parts and bool((widths >= batch.shape[-1]).all()):  # (CPU only)
            features = self.parts["features_unpadded"]
        n_chunks = 1 if self.device.type != "cpu" else max(1, N // self.chunk)
        if n_chunks == 1:
            return features(batch, widths)
        bounds = [N * i // n_chunks for i in range(n_chunks + 1)]
        parts = [features(batch[a:b], widths[a:b]) for a, b in zip(bounds, bounds[1:])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def decode(self, log_probs: Tensor, lengths: Tensor, decoder: str, beam_width: int, top_k: int,
               min_length: int = 0, max_length: int = -1, allowed: Optional[str] = None) -> Tuple[List[List[str]], Tensor]:
        return decode_log_probs(log_probs, lengths, self.charset, decoder, beam_width, top_k,
                                self.token_min_logp, self.blank_skip_threshold, min_length, max_length,
                                allowed_tokens(self.charset, allowed, log_probs.device))


def _as_recognizer(model: Union[CRNN, Recognizer, str, os.PathLike], decoder: str, beam_width: int) -> Recognizer:
    if isinstance(model, (str, os.PathLike)):
        model = eager_recognizer(model)
    rec = model if isinstance(model, Recognizer) else build_recognizer(model.cpu(), decoder=decoder, beam_width=beam_width)
    return rec.cpu().float().eval()


def _export_parts(rec: Recognizer, device: torch.device, dtype: torch.dtype, unpadded: bool) -> dict:
    """torch.export the "features" and "head" parts of rec's CRNN on `device`, convs in `dtype`,
    with a dynamic batch and width (and "features_unpadded" if unpadded)."""
    net = copy.deepcopy(rec.model).to(device).eval()
    net.convs.to(dtype)
    for conv in net.convs:
        # Channels-last weights make every conv run channels-last: with a 1-channel input,
        # conv_stack's .contiguous(channels_last) is a no-op and the convs would stay NCHW
        # (1.3x slower on the CPU, same values).
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    batch, width4 = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("width4", min=2, max=16384)
    images = torch.rand(3, rec.in_channels, rec.height, 64, device=device)
    widths = torch.tensor([64, 40, 12], device=device)
    with torch.no_grad():
        features = torch.export.export(_Features(net), (images, widths),
                                       dynamic_shapes=({0: batch, 3: 4 * width4}, {0: batch}))
        x, w = _Features(net)(images, widths)
        head = torch.export.export(_Head(net), (x, w), dynamic_shapes=({0: batch, 3: width4}, {0: batch}))
        parts = {"features": features, "head": head}
        if unpadded:
            parts["features_unpadded"] = torch.export.export(
                _Features(net, unpadded=True), (images, widths), dynamic_shapes=({0: batch, 3: 4 * width4}, {0: batch}))
    return parts


def _meta(rec: Recognizer, device: torch.device, dtype: torch.dtype, chunk: int,
          calibration: Optional[Calibration]) -> dict:
    return {"config_json": rec.config_json, "decoder": rec.decoder, "beam_width": rec.beam_width,
            "token_min_logp": rec.token_min_logp, "blank_skip_threshold": rec.blank_skip_threshold,
            "max_width": rec.max_width, "format": RECOGNIZER_FORMAT, "program_format": PROGRAM_FORMAT,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "chunk": chunk,
            "calibration": calibration.to_dict() if calibration is not None else None}


def export_program(model: Union[CRNN, Recognizer, str, os.PathLike], path: Union[str, os.PathLike],
                   decoder: str = "beam", beam_width: int = 10, device: Union[str, torch.device] = "cpu",
                   dtype: Union[None, str, torch.dtype] = None, calibration: Optional[Calibration] = None) -> Path:
    """torch.export the recognizer's CRNN (dynamic batch and width) to a .pt2 file holding the
    programs (PROGRAM_FORMAT) plus the config, charset and decoder settings; `load_program` or
    `captcha_fast.load` reads it back. `model` is a CRNN, an eager Recognizer or the path of a
    saved TorchScript recognizer (then its decoder settings are kept). The program runs on
    `device` with its convs in `dtype` (None: float32 on the CPU, portable to any CPU;
    resolve_dtype's choice on CUDA). Returns the path (written atomically). About 10 s."""
    from torch.export.pt2_archive._package import package_pt2

    device = torch.device(device)
    dtype = torch.float32 if dtype is None and device.type == "cpu" else resolve_dtype(dtype, device)
    rec = _as_recognizer(model, decoder, beam_width)
    programs = _export_parts(rec, device, dtype, unpadded=device.type == "cpu")
    meta = _meta(rec, device, dtype, rec.model.chunk, calibration or calibration_of(rec))

    def write(tmp: str):
        with warnings.catch_warnings():  # torch's note on non-contiguous (channels-last) weights: saved exactly
            warnings.filterwarnings("ignore", "No complete tensor found in the group")
            package_pt2(tmp, exported_programs=programs, extra_files={_META: json.dumps(meta)})
    return atomic_write(Path(path), write)


def _machine() -> dict:
    """What a compiled model is tied to: torch version, CPU vector ISA (Inductor's pick)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"torch": torch.__version__, "cpu_isa": str(pick_vec_isa())}


def compile_package(model: Union[CRNN, Recognizer, str, os.PathLike], path: Union[str, os.PathLike],
                    decoder: str = "beam", beam_width: int = 10, device: Union[str, torch.device] = "cpu",
                    dtype: Union[None, str, torch.dtype] = None, calibration: Optional[Calibration] = None) -> Path:
    """AOTInductor-compile the recognizer's CRNN for this machine into a .pt2 package ("features" and
    "head" models, dynamic batch and width, plus the settings): Inductor fuses the elementwise work
    (masks, pooling, ReLU, log-softmax) into C++ loops; convolutions, matmuls and captcha_fast::gru
    stay library calls. `captcha_fast.load` reads it, and so does C++ (torch::inductor::
    AOTIModelPackageLoader, after loading the captcha_fast library; examples/cpp). It runs only
    with this torch version, on a CPU with this machine's vector ISA (or on `device`); dtype
    None: resolve_dtype's choice for `device`. Compiles with one thread: about a minute of CPU."""
    from torch._inductor import aot_compile
    from torch.export.pt2_archive._package import package_pt2

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    rec = _as_recognizer(model, decoder, beam_width)
    meta = {**_meta(rec, device, dtype, rec.model.chunk, calibration or calibration_of(rec)), **_machine()}
    # Flat strings for C++ readers (AOTIModelPackageLoader::get_metadata()); Python reads _META.
    cfg = json.loads(rec.config_json)
    flat = {"captcha_fast." + k: str(v if not isinstance(v, bool) else int(v)) for k, v in
            {**{k: v for k, v in meta.items() if k not in ("config_json", "calibration")}, **cfg}.items()
            if v is not None}
    options = {"aot_inductor.package": True, "aot_inductor.metadata": flat, "compile_threads": 1,
               # threads chosen at run time (torch.set_num_threads), not frozen at compile time
               "cpp.dynamic_threads": True}
    files = {}
    with torch.no_grad():
        # Compiled masks are fused into the conv epilogues, nearly free: no unpadded variant.
        for name, program in _export_parts(rec, device, dtype, unpadded=False).items():
            files[name] = aot_compile(program.module(), program.example_inputs[0], options=options)
    return atomic_write(Path(path), lambda tmp: package_pt2(tmp, aoti_files=files, extra_files={_META: json.dumps(meta)}))


def load_program(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                 dtype: Union[None, str, torch.dtype] = None) -> ExportedRecognizer:
    """An ExportedRecognizer from a .pt2 file written by export_program (kind "program") or
    compile_package (kind "compiled"). Device and precision are fixed in the file: `device`
    (None: the file's) and `dtype` (None/"auto": the file's) must match it, else ValueError;
    a device index (cuda:1) picks the GPU it runs on."""
    from torch.export.pt2_archive._package import load_pt2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recognizer file not found: {str(path)!r}")
    meta = _read_meta(path)
    file_device, file_dtype = torch.device(meta.get("device", "cpu")), meta.get("dtype", "float32")
    if device is not None and torch.device(device).type != file_device.type:
        raise ValueError(f"{str(path)!r} was exported for {file_device.type}, not {torch.device(device).type}: "
                         f"export it for that device (or load the TorchScript .pt)")
    if dtype not in (None, "auto") and resolve_dtype(dtype, file_device) != _DTYPES[file_dtype]:
        raise ValueError(f"{str(path)!r} runs its convolutions in {file_dtype}, fixed at export: dtype={dtype!r} "
                         f"is not available for it (export it with that dtype, or load the TorchScript .pt)")
    compiled = "cpu_isa" in meta
    if compiled:
        _check_machine(path, meta)
    device = torch.device(device) if device is not None else file_device
    try:
        contents = load_pt2(str(path), device_index=-1 if device.index is None else device.index)
    except Exception as e:  # torch raises several types for a damaged file
        raise _not_a_recognizer(path, f"loading it failed: {type(e).__name__}: {str(e).strip()[:200]}") from e
    if compiled:
        runners = contents.aoti_runners
        if set(runners) != set(_PARTS):
            raise _not_a_recognizer(path, f"compiled models {sorted(runners)}, expected {list(_PARTS)}")
        # loader.boxed_run: the flat call, without the pytree round trip of AOTICompiledModel.__call__
        parts = {name: (lambda *xs, run=runners[name].loader.boxed_run: run(list(xs))) for name in _PARTS}
        return ExportedRecognizer(parts, meta, "compiled", device)
    programs = contents.exported_programs
    expected = ["model"] if meta.get("program_format", 1) == 1 else list(_PARTS)
    if not set(expected) <= set(programs):
        raise _not_a_recognizer(path, f"programs {sorted(programs)}, expected {expected}")
    if device.index is not None:  # the weights and the devices written in the graph (exported on cuda:0)
        from torch.export.passes import move_to_device_pass
        programs = {name: move_to_device_pass(p, device) for name, p in programs.items()}
    return ExportedRecognizer({name: _runnable(p) for name, p in programs.items()}, meta, "program", device)


def _runnable(program) -> torch.fx.GraphModule:
    """program.module() without its per-call input-guard hook: ExportedRecognizer.log_probs builds
    inputs that meet the program's constraints, and the hook costs 0.15 ms a call (10% at batch 1)."""
    module = program.module(check_guards=False)
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
    return module


def _read_meta(path: Path) -> dict:
    """The captcha_fast settings in a .pt2 archive; ValueError naming the file if it has none."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + _META)]
            if not names:
                raise _not_a_recognizer(path, "a .pt2 archive without captcha_fast settings")
            meta = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        if isinstance(e, ValueError) and "captcha_fast" in str(e):
            raise
        raise _not_a_recognizer(path, f"not a readable .pt2 archive: {type(e).__name__}: {e}") from e
    program_format = meta.get("program_format", 1)
    if program_format > PROGRAM_FORMAT:
        raise ValueError(f"{str(path)!r} is .pt2 program format {program_format}; this captcha_fast reads up to "
                         f"{PROGRAM_FORMAT}: upgrade captcha_fast")
    return meta


def _check_machine(path: Path, meta: dict):
    """ValueError unless the compiled models in `path` can run here (torch version, CPU ISA, device)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    here = _machine()
    why = None
    if meta["torch"] != here["torch"]:
        why = f"for torch {meta['torch']}, and torch {here['torch']} is installed"
    elif meta["device"] == "cpu" and meta["cpu_isa"] not in [str(isa) for isa in valid_vec_isa_list()]:
        why = f"for a CPU with {meta['cpu_isa']}, which this CPU lacks ({here['cpu_isa']})"
    elif meta["device"] == "cuda" and not torch.cuda.is_available():
        why = "for CUDA, and no GPU is available"
    if why:
        raise ValueError(f"{str(path)!r} holds models compiled {why}: compile it again here "
                         f"(captcha-fast export MODEL --out FILE.pt2 --compile), or load the .pt/.pt2 program")


def file_kind(path: Union[str, os.PathLike]) -> str:
    """"compiled" (a .pt2 AOTInductor package), "program" (a .pt2 of torch.export programs), "torchscript"
    (a torch.jit archive) or "unknown" (anything else, e.g. a checkpoint), by the file's contents."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if any("/data/aotinductor/" in n or n.startswith("data/aotinductor/") for n in names):
        return "compiled"
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "program"
    return "torchscript" if any("/code/" in n for n in names) else "unknown"  # (torch.save zips have no code)


def _is_export_archive(path: Path) -> bool:
    """Whether `path` is a .pt2 archive (program or compiled) rather than a TorchScript file."""
    return file_kind(path) in ("program", "compiled")


# ----------------------------------------------------------------------------- calibration

def with_calibration(path: Union[str, os.PathLike], calibration: Calibration,
                     out: Union[None, str, os.PathLike] = None) -> Path:
    """Write the recognizer or checkpoint at `path` to `out` (default: `path`, replaced atomically) with
    `calibration` as its confidence calibration; weights and settings unchanged. A TorchScript
    .pt gets CALIBRATION_FILE, a .pt2 (program or compiled) its settings' "calibration", a
    training checkpoint its "calibration" key."""
    path = Path(path)
    out = Path(out) if out is not None else path
    kind = file_kind(path)
    if kind == "torchscript":
        return _save_scripted(torch.jit.load(str(path), map_location="cpu"), out, calibration)
    if kind in ("program", "compiled"):
        meta = {**_read_meta(path), "calibration": calibration.to_dict()}

        def rewrite(tmp: str):
            with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    data = src.read(info)
                    dst.writestr(info, json.dumps(meta) if info.filename.endswith("/extra/" + _META) else data)
        return atomic_write(out, rewrite)
    return save_checkpoint({**load_checkpoint(path), "calibration": calibration.to_dict()}, out)
