"""Writing recognizers in three formats (captcha_fast.formats reads them back):

- TorchScript (.pt, the legacy format: torch.jit is deprecated): one file with the weights,
  preprocessing and decoding, runs in Python or C++ (torch::jit::load) wherever the captcha_fast
  library is loaded.
- torch.export programs (.pt2, export_program): the CRNN as "features" + "head" programs with a
  dynamic batch and width; portable across CPUs; preprocessing and decoding stay in Python.
- AOTInductor packages (.pt2, compile_package): the same two parts compiled to C++ for this
  machine (fastest on the CPU); Python (captcha_fast.load) or C++ (AOTIModelPackageLoader,
  examples/cpp/recognize_aoti.cpp).

    save_recognizer(model, "model.pt")      # CRNN -> scripted Recognizer file (fp32 weights, GRUs maybe 16-bit)
    export_program("model.pt", "model.pt2") # -> .pt2 programs;  compile_package(...) -> compiled .pt2
    with_calibration("model.pt", calibration)  # the same file with a confidence calibration

Every file is written atomically (files.atomic_write)."""
from __future__ import annotations

import copy
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from captcha_fast.checkpoint import read_checkpoint, save_checkpoint
from captcha_fast.confidence import Calibration, calibration_of
from captcha_fast.files import atomic_write
from captcha_fast.formats import (CALIBRATION_FILE, PROGRAM_FORMAT, SETTINGS_FILE, compile_target, eager_recognizer,
                                  file_kind, read_settings, resolve_device, resolve_dtype)
from captcha_fast.model import CRNN, InferenceCRNN, conv_lists
from captcha_fast.recognizer import Recognizer, build_recognizer


def save_recognizer(model: Union[CRNN, Recognizer, str, os.PathLike], path: Union[str, os.PathLike],
                    decoder: str = "beam", beam_width: int = 10, calibration: Optional[Calibration] = None) -> Path:
    """Script `model` (a CRNN, a Recognizer or a recognizer file) into a Recognizer and save it to
    `path` (atomically: temp file + os.replace).

    The file holds the float32 weights (batch norms folded; GRU weights that float16 holds exactly
    stored in float16: model.InferenceGRU), the config as JSON, the charset
    and the confidence calibration (`calibration`, else the model's own, if any) as the extra file
    CALIBRATION_FILE; `load_recognizer` (or plain `torch.jit.load` after loading the captcha_fast
    library) reads it back. `model` is not changed. Returns the path."""
    rec = _as_recognizer(model, decoder, beam_width)
    return _save_scripted(torch.jit.script(rec), path, calibration or calibration_of(rec))


def _save_scripted(scripted: torch.jit.ScriptModule, path: Union[str, os.PathLike],
                   calibration: Optional[Calibration]) -> Path:
    extra = {CALIBRATION_FILE: calibration.to_json()} if calibration is not None else {}
    return atomic_write(Path(path), lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))


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


def _as_recognizer(model: Union[CRNN, Recognizer, str, os.PathLike], decoder: str, beam_width: int) -> Recognizer:
    if isinstance(model, (str, os.PathLike)):
        rec = eager_recognizer(model)
    elif isinstance(model, Recognizer):
        rec = copy.deepcopy(model)  # .cpu() and .float() act in place: the caller's module stays as it is
    else:
        rec = build_recognizer(copy.deepcopy(model).cpu(), decoder=decoder, beam_width=beam_width)
    return rec.cpu().float().eval()


def _export_parts(rec: Recognizer, device: torch.device, dtype: torch.dtype, unpadded: bool) -> dict:
    """torch.export the "features" and "head" parts of rec's CRNN on `device`, convs in `dtype`,
    with a dynamic batch and width (and "features_unpadded" if unpadded)."""
    net = copy.deepcopy(rec.model).to(device).eval()
    for conv in (c for convs in conv_lists(net) for c in convs if isinstance(c, nn.Conv2d)):
        # Channels-last weights make every conv run channels-last: with a 1-channel input,
        # conv_stack's .contiguous(channels_last) is a no-op and the convs would stay NCHW
        # (1.3x slower on the CPU, same values).
        conv.to(dtype)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    batch, width4 = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("width4", min=2, max=16384)
    images = torch.rand(3, rec.in_channels, rec.height, 64, device=device)
    widths = torch.tensor([64, 40, 12], device=device)
    with torch.no_grad():
        features = torch.export.export(_Features(net), (images, widths),
                                       dynamic_shapes=({0: batch, 3: 4 * width4}, {0: batch}))
        x, w = _Features(net)(images, widths)
        # the heads read the first block's features (twice as many columns) where they own block 2
        x_width = 2 * width4 if len(net.style_models) else width4
        head = torch.export.export(_Head(net), (x, w), dynamic_shapes=({0: batch, 3: x_width}, {0: batch}))
        parts = {"features": features, "head": head}
        if unpadded:
            parts["features_unpadded"] = torch.export.export(
                _Features(net, unpadded=True), (images, widths), dynamic_shapes=({0: batch, 3: 4 * width4}, {0: batch}))
    return parts


def _meta(rec: Recognizer, device: torch.device, dtype: torch.dtype, chunk: int,
          calibration: Optional[Calibration]) -> dict:
    return {"config_json": rec.config_json, "decoder": rec.decoder, "beam_width": rec.beam_width,
            "token_min_logp": rec.token_min_logp, "blank_skip_threshold": rec.blank_skip_threshold,
            "max_width": rec.max_width, "format": rec.format, "program_format": PROGRAM_FORMAT,
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

    device = resolve_device(device)
    dtype = torch.float32 if dtype is None and device.type == "cpu" else resolve_dtype(dtype, device)
    rec = _as_recognizer(model, decoder, beam_width)
    programs = _export_parts(rec, device, dtype, unpadded=device.type == "cpu")
    meta = _meta(rec, device, dtype, rec.model.chunk, calibration or calibration_of(rec))

    def write(tmp: str):
        with warnings.catch_warnings():  # torch's note on non-contiguous (channels-last) weights: saved exactly
            warnings.filterwarnings("ignore", "No complete tensor found in the group")
            package_pt2(tmp, exported_programs=programs, extra_files={SETTINGS_FILE: json.dumps(meta)})
    return atomic_write(Path(path), write)


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

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    rec = _as_recognizer(model, decoder, beam_width)
    meta = {**_meta(rec, device, dtype, rec.model.chunk, calibration or calibration_of(rec)), **compile_target()}
    # Flat strings for C++ readers (AOTIModelPackageLoader::get_metadata()); Python reads SETTINGS_FILE.
    cfg = json.loads(rec.config_json)
    flat = {"captcha_fast." + k: str(v if not isinstance(v, bool) else int(v)) for k, v in
            {**{k: v for k, v in meta.items() if k not in ("config_json", "calibration")}, **cfg}.items()
            if v is not None}
    options = {"aot_inductor.package": True, "aot_inductor.metadata": flat, "compile_threads": 1,
               # threads chosen at run time (torch.set_num_threads), not frozen at compile time
               "cpp.dynamic_threads": True}
    files = {}
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation note from inside aot_compile (isinstance(treespec, LeafSpec)): not the caller's
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        # Compiled masks are fused into the conv epilogues, nearly free: no unpadded variant.
        for name, program in _export_parts(rec, device, dtype, unpadded=False).items():
            files[name] = aot_compile(program.module(), program.example_inputs[0], options=options)
    return atomic_write(Path(path), lambda tmp: package_pt2(tmp, aoti_files=files, extra_files={SETTINGS_FILE: json.dumps(meta)}))


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
        meta = {**read_settings(path), "calibration": calibration.to_dict()}

        def rewrite(tmp: str):
            with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    data = src.read(info)
                    dst.writestr(info, json.dumps(meta) if info.filename.endswith("/extra/" + SETTINGS_FILE) else data)
        return atomic_write(out, rewrite)
    return save_checkpoint({**read_checkpoint(path), "calibration": calibration.to_dict()}, out)
