"""Reading recognizers in the three formats captcha_fast.export writes, and the precision policy:

- TorchScript (.pt): load_recognizer -> a frozen ScriptModule (weights, preprocessing, decoding).
- torch.export programs (.pt2) and AOTInductor packages (.pt2): load_program -> ExportedRecognizer,
  the same interface; preprocessing and decoding run here, in Python.

    rec = load_recognizer("model.pt")       # -> ScriptModule, precision chosen here (resolve_dtype)
    rec = load_program("model.pt2")         # -> ExportedRecognizer
    texts, scores = rec([img_uint8_chw, ...])

file_kind tells the formats apart by their contents; captcha_fast.load picks the reader.
Nothing here writes files or compiles (captcha_fast.export does)."""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from captcha_fast.confidence import Calibration
from captcha_fast.machine import native_bf16, num_threads
from captcha_fast.model import CRNN, CRNNConfig, InferenceCRNN, convs_to
from captcha_fast.preprocess import MAX_WIDTH, collate
from captcha_fast.recognizer import (INTERFACE_FORMAT, RECOGNIZER_FORMAT, Recognizer, allowed_tokens, decode_log_probs,
                                     original_error)

# Attributes and methods that torch.jit.freeze must keep.
_PRESERVED = ["recognize", "preprocess", "log_probs", "decode", "config_json", "charset", "height",
              "in_channels", "decoder", "beam_width", "token_min_logp",
              "blank_skip_threshold", "max_width", "ink", "format"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CALIBRATION_FILE = "calibration.json"
"""The TorchScript archive's extra file holding the confidence calibration (captcha_fast.confidence);
a .pt2 keeps it under "calibration" in its settings, a training checkpoint under "calibration"."""


def _not_a_recognizer(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a captcha_fast recognizer ({why}); "
                      f"write one with captcha_fast.export.save_recognizer(model, path)")


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is a training checkpoint (captcha_fast.checkpoint: a torch.save dict of weights and config)."""
    from captcha_fast.checkpoint import load_checkpoint

    if file_kind(path) != "unknown":  # (torch.save writes a zip without code)
        return False
    try:
        load_checkpoint(path)
    except (ValueError, OSError):
        return False
    return True


def _a_checkpoint(path: Path) -> ValueError:
    """A training checkpoint passed as a recognizer: the error naming its run's recognizer, or how to write one."""
    model = path.parent / "model.pt"
    use = (f"use its run's recognizer {str(model)!r}" if model.is_file()
           else f"write a recognizer from it with `captcha-fast export {path} --out {model}`")
    return ValueError(f"{str(path)!r} is a training checkpoint, not a recognizer: {use}")


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


DEVICES = "'cpu', 'cuda' or 'cuda:N' (N: a GPU's index)"


def resolve_device(device: Union[None, str, torch.device], name: str = "device") -> Optional[torch.device]:
    """The one device check, run wherever a recognizer is loaded or exported: `device` as a torch.device
    (None stays None: the loader's default). ValueError naming the argument as the caller knows it
    (`name`: "device", "--device") and the values it takes; RuntimeError saying why for CUDA that
    this torch cannot use (else torch.jit.load's failure would pass for a damaged file)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be {DEVICES}, got {str(device)!r}")
    if dev.type == "cuda":
        cpu = f"{name} cpu" if name.startswith("--") else f"{name}='cpu'"
        if not torch.cuda.is_available():
            build = ("a build without CUDA" if torch.version.cuda is None
                     else f"built for CUDA {torch.version.cuda}, and it finds no usable GPU")
            raise RuntimeError(f"{name} {str(device)!r}: CUDA is not available here (torch {torch.__version__}, "
                               f"{build}): use {cpu}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"{name} {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


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
    device = resolve_device(device) or torch.device("cpu")
    conv_dtype = resolve_dtype(dtype, device)
    extra = {CALIBRATION_FILE: ""}  # stays "" when the file has none
    try:
        rec = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as e:
        if _is_checkpoint(path):
            raise _a_checkpoint(path) from None
        raise _not_a_recognizer(path, f"torch.jit.load failed: {str(e).strip().splitlines()[0]}") from e
    if not (hasattr(rec, "format") and hasattr(rec, "config_json") and hasattr(rec, "recognize")):
        raise _not_a_recognizer(path, "a TorchScript module without the Recognizer interface")
    if rec.format > RECOGNIZER_FORMAT:
        raise ValueError(f"{str(path)!r} is recognizer format {rec.format}; this captcha_fast reads up to "
                         f"{RECOGNIZER_FORMAT}: upgrade captcha_fast")
    if rec.format < INTERFACE_FORMAT:  # an older interface: rebuild it with today's code, same weights
        rec = torch.jit.script(_rebuild(rec).to(device))
    rec.eval()
    if conv_dtype != torch.float32:
        convs_to(rec.model, conv_dtype)
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


PROGRAM_FORMAT = 2
"""What a .pt2 holds. 1: one "model" program of the whole CRNN whose GRU is a scan loop (written
before the gru op; still read). 2: a "features" part (the conv stack, run a chunk of images at a
time so activations stay in cache) and a "head" part (projection, captcha_fast::gru, classifier,
log-softmax, run on the whole batch), as torch.export programs or as AOTInductor-compiled models."""
SETTINGS_FILE = "captcha_fast.json"  # the archive's extra file with the settings (program .pt2 and compiled .pt2)
_PARTS = ("features", "head")


@lru_cache(maxsize=1)
def scripted_collate():
    """preprocess.collate compiled by TorchScript, once per process (0.2 s): the interpreter runs the
    ink map's hundred-odd small ops with less overhead per op than Python (measured about 20% faster
    for one 50 x 200 image), so a .pt2 recognizer preprocesses as fast as a scripted one."""
    return torch.jit.script(collate)


class ExportedRecognizer:
    """A recognizer from a .pt2 file, with the Python-side interface of a scripted Recognizer:
    __call__/forward, recognize, preprocess, log_probs, decode, config_json, charset, ...
    Preprocessing (scripted_collate) and decoding run the same functions as the Recognizer.

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
        self.own_block2 = bool(cfg.get("style_heads")) and cfg.get("style_branch") == "block2"
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
        """preprocess.collate as TorchScript, as a scripted Recognizer runs it (its errors as Python's)."""
        try:
            return scripted_collate()(images, self.height, self.in_channels, self.max_width, self.ink)
        except torch.jit.Error as e:
            raise original_error(e) from None

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
            elif self.own_block2 and N > 2 * self.chunk and self.device.type == "cpu":
                # The head part runs block 2 where style heads own it, on every image of a batch one of
                # them is sent: in chunks, its activations stay in cache and a chunk of one style runs
                # one block 2 (measured 1.24x the images/s at 256 package renders; 2 x chunk the best of 1-4)
                k = 2 * self.chunk
                parts = [self.parts["head"](*self.features(batch[a:a + k], widths[a:a + k])) for a in range(0, N, k)]
                log_probs, lengths = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])
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
            # One image's compiled convs run on one CPU thread: its fused kernels are too small to split,
            # and waking a second thread for each cost up to 40% of the call (docs/speed.md); the head
            # keeps the caller's threads (the GRU's two directions run in parallel).
            one = N == 1 and self.kind == "compiled" and self.device.type == "cpu"
            with num_threads(1) if one else contextlib.nullcontext():
                return features(batch, widths)
        bounds = [N * i // n_chunks for i in range(n_chunks + 1)]
        parts = [features(batch[a:b], widths[a:b]) for a, b in zip(bounds, bounds[1:])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def decode(self, log_probs: Tensor, lengths: Tensor, decoder: str, beam_width: int, top_k: int,
               min_length: int = 0, max_length: int = -1, allowed: Optional[str] = None) -> Tuple[List[List[str]], Tensor]:
        return decode_log_probs(log_probs, lengths, self.charset, decoder, beam_width, top_k,
                                self.token_min_logp, self.blank_skip_threshold, min_length, max_length,
                                allowed_tokens(self.charset, allowed, log_probs.device))


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
    device = resolve_device(device)
    meta = read_settings(path)
    file_device, file_dtype = torch.device(meta.get("device", "cpu")), meta.get("dtype", "float32")
    if device is not None and device.type != file_device.type:
        raise ValueError(f"{str(path)!r} was exported for {file_device.type}, not {device.type}: "
                         f"export it for that device (or load the TorchScript .pt)")
    if dtype not in (None, "auto") and resolve_dtype(dtype, file_device) != _DTYPES[file_dtype]:
        raise ValueError(f"{str(path)!r} runs its convolutions in {file_dtype}, fixed at export: dtype={dtype!r} "
                         f"is not available for it (export it with that dtype, or load the TorchScript .pt)")
    compiled = "cpu_isa" in meta
    if compiled:
        check_machine(path, meta)
    device = device or file_device
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


def read_settings(path: Path) -> dict:
    """The captcha_fast settings in a .pt2 archive; ValueError naming the file if it has none."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + SETTINGS_FILE)]
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


def check_machine(path: Path, meta: dict):
    """ValueError unless the compiled models in `path` can run here (torch version, CPU ISA, device)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    here = compile_target()
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


def compile_target() -> dict:
    """What a compiled model is tied to: torch version, CPU vector ISA (Inductor's pick)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"torch": torch.__version__, "cpu_isa": str(pick_vec_isa())}
