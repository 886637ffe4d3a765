"""Saving and loading recognizers: TorchScript (.pt, one file that runs in Python
or C++ wherever the captcha_fast library is loaded) and torch.export (.pt2).

    save_recognizer(model, "model.pt")      # CRNN -> scripted Recognizer file (fp32 weights)
    rec = load_recognizer("model.pt")       # -> ScriptModule, precision chosen here
    texts, scores = rec([img_uint8_chw, ...])
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from captcha_fast.checkpoint import atomic_write
from captcha_fast.model import CRNN, CRNNConfig, InferenceCRNN
from captcha_fast.preprocess import MAX_WIDTH, collate
from captcha_fast.recognizer import RECOGNIZER_FORMAT, Recognizer, build_recognizer, decode_log_probs

# Attributes and methods that torch.jit.freeze must keep.
_PRESERVED = ["recognize", "preprocess", "log_probs", "decode", "config_json", "charset", "height",
              "in_channels", "decoder", "beam_width", "token_min_logp",
              "blank_skip_threshold", "max_width", "ink", "format"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    return atomic_write(Path(path), lambda tmp: torch.jit.save(scripted, tmp))


def _not_a_recognizer(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a captcha_fast recognizer ({why}); "
                      f"write one with captcha_fast.export.save_recognizer(model, path)")


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The one precision policy: the dtype the convolutions run in on `device`.

    dtype: a torch dtype or its name; None/"auto": the device's fastest (CUDA: bfloat16 where
    supported, else float16; CPU: bfloat16 only where oneDNN has native bf16 (AVX-512 BF16 /
    AMX), where it measured 1.6x faster than fp32, float32 elsewhere: on an AVX2-only CPU bf16
    convs measured 25x slower, README "Precision"); "low": the device's low precision (CUDA as
    auto, CPU bfloat16) whatever its speed."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype in (None, "auto", "low"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if dtype == "low" or native_bf16 else torch.float32
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
    try:
        rec = torch.jit.load(str(path), map_location=device)
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
    return rec


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
    return _rebuild(load_recognizer(path, freeze=False))


# ----------------------------------------------------------------------------- torch.export (.pt2)

class _ExportableCRNN(InferenceCRNN):
    """The InferenceCRNN without data-dependent control flow, for torch.export with a dynamic
    width; it overrides only that: features always masks and never chunks, and the packed
    bidirectional GRU is one `scan` per layer over both directions, the backward one reading
    each sample reversed within its own length (exact for every sample's frames, no packing).
    nn.GRU itself cannot be exported with a dynamic sequence length (export unrolls it)."""

    def __init__(self, model: InferenceCRNN):
        nn.Module.__init__(self)
        self.config, self.chunk = model.config, model.chunk
        self.convs, self.project, self.classifier = model.convs, model.project, model.classifier
        self.dropout = nn.Identity()
        rnn = model.rnn
        self.num_layers = rnn.num_layers
        for layer in range(rnn.num_layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                both = [getattr(rnn, f"{name}_l{layer}{sfx}").detach() for sfx in ("", "_reverse")]
                self.register_buffer(f"{name}_{layer}", torch.stack(both))  # (2, 3H, in) / (2, 3H)

    def features(self, images: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        return self.conv_stack(images, widths, False)

    def recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        T = x.shape[0]
        t = torch.arange(T, device=x.device)[:, None]                               # (T, 1)
        rev = torch.where(t < lengths[None], lengths[None] - 1 - t, t)[..., None]  # (T, N, 1)
        for layer in range(self.num_layers):
            x = self.gru_layer(x, rev, layer)
        return x

    def gru_layer(self, x: Tensor, rev: Tensor, layer: int) -> Tensor:
        """(T, N, F) -> (T, N, 2H): forward direction on x, backward on x reversed per sample."""
        w_ih, w_hh = getattr(self, f"weight_ih_{layer}"), getattr(self, f"weight_hh_{layer}")
        b_ih, b_hh = getattr(self, f"bias_ih_{layer}"), getattr(self, f"bias_hh_{layer}")
        T, N, _ = x.shape
        xr = x.gather(0, rev.expand(-1, -1, x.shape[2]))
        gi = torch.stack([F.linear(x, w_ih[0], b_ih[0]), F.linear(xr, w_ih[1], b_ih[1])], 1)  # (T, 2, N, 3H)
        h0 = x.new_zeros(2, N, w_hh.shape[2])

        def step(h: Tensor, gi_t: Tensor):
            gh = torch.baddbmm(b_hh[:, None], h, w_hh.transpose(1, 2))  # (2, N, 3H)
            i_r, i_z, i_n = gi_t.chunk(3, -1)
            h_r, h_z, h_n = gh.chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
            return h, h.clone()

        _, hs = scan(step, h0, gi)  # (T, 2, N, H)
        b = hs[:, 1].gather(0, rev.expand(-1, -1, hs.shape[3]))
        return torch.cat([hs[:, 0], b], -1)


class ExportedRecognizer:
    """A torch.export program of the recognizer's CRNN (.pt2), with the same Python-side
    interface as a scripted Recognizer: __call__/forward, recognize, preprocess, log_probs,
    decode, config_json, charset. Preprocessing and decoding run the same TorchScript-able
    functions, eagerly. float32, on the CPU."""

    def __init__(self, program, meta: dict):
        self.program = program
        self.module = program.module()
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

    def __call__(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        return self.forward(images)

    def forward(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        texts, scores = self.recognize(images, self.decoder, self.beam_width, 1)
        return [t[0] for t in texts], scores[:, 0]

    def recognize(self, images: List[Tensor], decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        with torch.no_grad():
            batch, widths = self.preprocess(images)
            log_probs, lengths = self.log_probs(batch, widths)
            return self.decode(log_probs, lengths, decoder, beam_width, top_k)

    def preprocess(self, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return collate(images, self.height, self.in_channels, self.max_width, self.ink)

    def log_probs(self, batch: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        # The program takes widths that are multiples of 4, at least 8, and batches of 2 or
        # more (export specializes sizes 0 and 1): pad to that. Exact, as padding is masked
        # and the decoder reads each sample's own frames only.
        N, W = batch.shape[0], batch.shape[-1]
        W_pad = max(8, (W + 3) // 4 * 4)
        if W_pad != W:
            batch = F.pad(batch, (0, W_pad - W))
        if N == 1:
            batch, widths = batch.expand(2, -1, -1, -1), widths.expand(2)
        with torch.no_grad():
            log_probs, lengths = self.module(batch.float().contiguous(), widths.contiguous())
        return log_probs[:, :N], lengths[:N]

    def decode(self, log_probs: Tensor, lengths: Tensor, decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        return decode_log_probs(log_probs, lengths, self.charset, decoder, beam_width, top_k,
                                self.token_min_logp, self.blank_skip_threshold)


_PT2_META = "captcha_fast.json"


def export_program(model: Union[CRNN, Recognizer, str, os.PathLike], path: Union[str, os.PathLike],
                   decoder: str = "beam", beam_width: int = 10) -> Path:
    """torch.export the recognizer's CRNN (float32, CPU; dynamic batch and width) to a .pt2 file
    holding the program plus the config, charset and decoder settings; `load_program` or
    `captcha_fast.api.load` reads it back. `model` is a CRNN, an eager Recognizer or the path of
    a saved TorchScript recognizer (then its decoder settings are kept). Returns the path
    (written atomically). Takes about 10 s."""
    if isinstance(model, (str, os.PathLike)):
        model = eager_recognizer(model)
    rec = model if isinstance(model, Recognizer) else build_recognizer(model.cpu(), decoder=decoder, beam_width=beam_width)
    rec = rec.cpu().eval()
    net = _ExportableCRNN(rec.model).float().eval()
    H = rec.height
    example = (torch.rand(2, rec.in_channels, H, 64), torch.tensor([64, 40]))
    batch, width = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("width4", min=1, max=16384)
    with torch.no_grad():
        program = torch.export.export(net, example, dynamic_shapes=({0: batch, 3: 4 * width}, {0: batch}))
    meta = {"config_json": rec.config_json, "decoder": rec.decoder, "beam_width": rec.beam_width,
            "token_min_logp": rec.token_min_logp, "blank_skip_threshold": rec.blank_skip_threshold,
            "max_width": rec.max_width, "format": RECOGNIZER_FORMAT}
    return atomic_write(Path(path), lambda tmp: torch.export.save(program, tmp, extra_files={_PT2_META: json.dumps(meta)}))


def load_program(path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                 dtype: Union[None, str, torch.dtype] = None) -> ExportedRecognizer:
    """An ExportedRecognizer from a .pt2 file written by export_program. The program is float32
    on the CPU: another device, or a dtype other than float32/"auto", is refused (use the .pt)."""
    path = Path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu" or dtype not in (None, "auto", "float32", torch.float32):
        raise ValueError(f"{str(path)!r} is a .pt2 program, which runs float32 on the CPU: device={str(device)!r} "
                         f"and dtype={dtype!r} are not available for it (load the TorchScript .pt for those)")
    if not path.is_file():
        raise FileNotFoundError(f"exported program file not found: {str(path)!r}")
    extra = {_PT2_META: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # torch raises several types for a foreign file
        raise _not_a_recognizer(path, f"torch.export.load failed: {type(e).__name__}: {str(e).strip()[:200]}") from e
    if not extra[_PT2_META]:
        raise _not_a_recognizer(path, "a torch.export program without captcha_fast metadata")
    return ExportedRecognizer(program, json.loads(extra[_PT2_META]))


def _is_export_archive(path: Path) -> bool:
    """Whether `path` is a torch.export archive (.pt2) rather than a TorchScript file."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") or n == "archive_format" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
