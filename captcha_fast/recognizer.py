"""Recognizer: images -> strings in one TorchScript-able module.

    List[(C, H, W) uint8 or float]  --preprocess-->  (N, C_in, height, W_max) float32 + widths
                                    --CRNN-------->  (T, N, K) float32 log-probs + frame counts
                                    --decode------>  texts (torch.ops.captcha_fast.*) + scores

`torch.jit.script(Recognizer(model))` and `torch.jit.save` give one file with
the weights, the config (JSON) and the charset; it runs wherever the captcha_fast
library is loaded (Python `import captcha_fast`, or `torch.ops.load_library`
from Python or C++), with no captcha_fast Python code.

Precision follows the conv weights: the input batch is cast to their dtype, so
casting `recognizer.model.convs` to bfloat16/float16 runs the convolutions in
low precision while the GRU, classifier, log-softmax and decoding stay float32
(the CRNN casts to float32 before its projection)."""
from __future__ import annotations

import builtins
import json
import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from captcha_fast import ops  # noqa: F401  (registers torch.ops.captcha_fast.*)
from captcha_fast.model import CRNN, InferenceCRNN, convs_to
from captcha_fast.preprocess import collate

# Bumped when the saved module changes: 2 its interface (log_probs, max_width); 3 style heads, whose config
# field an older captcha_fast cannot rebuild, so it says to upgrade; 4 style heads that own block 2. A model
# is saved as the oldest format that reads it (2 without style heads): older versions read it as before.
RECOGNIZER_FORMAT = 4  # the newest this version reads and writes
INTERFACE_FORMAT = 2   # the module interface: older files are rebuilt with today's code (formats.load_recognizer)

MAX_BEAM_WIDTH = 4096  # the beam search op's limit

# Default pruning of beam search: measured on model-like (peaky) log-probs, it
# changes no top-1 label while making the search several times faster
# (benchmarks/bench_decode.py). None switches a rule off (exact search). -10,
# not -8: at beam 32, -8 flipped a near-tie (two labels 2e-4 apart in log
# probability) on one of the benchmark's 15,360 sequences of the round-29
# model; -10 agrees on all of them, for 3-7% of the search's speed.
TOKEN_MIN_LOGP = -10.0
BLANK_SKIP_THRESHOLD = 0.999


class Recognizer(nn.Module):
    """A CRNN with its preprocessing, charset and CTC decoding: forward(images) -> (texts, scores).

    Attributes (saved with the module): config_json (the CRNNConfig as JSON), charset
    (List[str], symbol i is class i + 1), decoder ("greedy" or "beam") and beam_width
    (used by forward), token_min_logp/blank_skip_threshold (beam pruning), max_width (the
    widest an image may be after resizing to the model's height; wider ones are refused by
    name), format (recognizer_format: the oldest that reads it)."""

    def __init__(self, model: CRNN | InferenceCRNN, decoder: str = "beam", beam_width: int = 10,
                 max_width: int = 4096):
        super().__init__()
        if not isinstance(model, InferenceCRNN):
            model = InferenceCRNN(model)  # a copy: batch norms folded, eval mode
        check_decode_args(decoder, beam_width, 1)
        self.model = model
        self.config_json: str = json.dumps(model.config.to_dict())
        self.charset: List[str] = list(model.config.charset)
        self.height: int = model.config.height
        self.in_channels: int = model.config.in_channels
        self.ink: bool = model.config.ink
        self.decoder: str = decoder
        self.beam_width: int = beam_width
        self.token_min_logp: Optional[float] = TOKEN_MIN_LOGP
        self.blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD
        self.max_width: int = max_width
        self.format: int = recognizer_format(model.config)

    def forward(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        """images: (H, W) or (C, H, W) tensors, uint8 or float in [0, 1], any sizes
        -> the best string per image and its score (N,) float32 (a log-probability)."""
        texts, scores = self.recognize(images, self.decoder, self.beam_width, 1)
        return [t[0] for t in texts], scores[:, 0]

    @torch.jit.export
    def recognize(self, images: List[Tensor], decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        """The top_k strings per image (best first) and their scores (N, top_k) float32.
        (Length and charset constraints: recognizer.recognize.)"""
        device = self.model.classifier.weight.device
        with torch.no_grad():
            batch, widths = self.preprocess([img.to(device) for img in images])
            log_probs, lengths = self.log_probs(batch, widths)
            return self.decode(log_probs, lengths, decoder, beam_width, top_k)

    @torch.jit.export
    def preprocess(self, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """-> (N, in_channels, height, W_max) float32 batch, widths (N,) int64 (captcha_fast.preprocess)."""
        return collate(images, self.height, self.in_channels, self.max_width, self.ink)

    @torch.jit.export
    def log_probs(self, batch: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """(N, C, H, W) float batch, widths (N,) -> log-probs (T, N, K) float32, frame counts (N,).
        The convolutions run in the dtype of the conv weights."""
        return self.model(batch.to(self.model.convs[0].weight.dtype), widths)

    @torch.jit.export
    def decode(self, log_probs: Tensor, lengths: Tensor, decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        """(T, N, K) log-probs -> top_k strings per sample and scores (N, top_k) float32."""
        return decode_log_probs(log_probs, lengths, self.charset, decoder, beam_width, top_k,
                                self.token_min_logp, self.blank_skip_threshold)


def recognizer_format(config) -> int:
    """The oldest recognizer format that reads a model of `config`: 2, 3 with style heads, 4 with heads that
    own block 2."""
    if not config.style_heads:
        return INTERFACE_FORMAT
    return 3 if config.style_branch == "rnn" else 4


def decode_log_probs(log_probs: Tensor, lengths: Tensor, charset: List[str], decoder: str, beam_width: int,
                     top_k: int, token_min_logp: Optional[float] = TOKEN_MIN_LOGP,
                     blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD, min_length: int = 0,
                     max_length: int = -1, allowed_tokens: Optional[Tensor] = None) -> Tuple[List[List[str]], Tensor]:
    """The one decode-to-strings path (the Recognizer and captcha_fast.decode both use it):
    (T, N, K) log-probs, frame counts (N,) -> top_k strings per sample (best first) and their
    scores (N, top_k) float32 on the CPU; a missing hypothesis (fewer than top_k exist) is ""
    with score -inf. decoder: "greedy" (top_k must be 1) or "beam" (prefix beam search; None for
    both pruning rules is the exact search). Bad input raises the same error on CPU and CUDA."""
    # The strings ops build the strings in C++ (on the host for CUDA inputs, after the kernels) and
    # raise for a sequence the CUDA kernels flag as bad what the CPU kernels raise for it.
    check_decode_args(decoder, beam_width, top_k, min_length, max_length, allowed_tokens is not None)
    if decoder == "greedy":
        return torch.ops.captcha_fast.ctc_greedy_decode_strings(log_probs, lengths, charset, 0)
    return torch.ops.captcha_fast.ctc_beam_search_strings(
        log_probs, lengths, charset, beam_width, top_k, 0, token_min_logp, blank_skip_threshold, min_length,
        max_length, allowed_tokens)


def check_decode_args(decoder: str, beam_width: int, top_k: int, min_length: int = 0, max_length: int = -1,
                      restricted: bool = False) -> None:
    """ValueError unless the decoding arguments make sense together: the one check, run by
    predict_batch, the CLI (its flags named as the arguments are), every recognizer's decode (also
    inside a saved TorchScript recognizer) and the Recognizer's defaults. restricted: an `allowed`
    set is given."""
    if decoder != "beam" and decoder != "greedy":
        raise ValueError("decoder must be 'beam' or 'greedy', got '" + decoder + "'")
    if beam_width < 1 or beam_width > 4096:  # 4096 = MAX_BEAM_WIDTH (TorchScript can't read globals)
        raise ValueError("beam_width must be in [1, 4096], got " + str(beam_width))
    if decoder == "greedy":
        if top_k != 1:
            raise ValueError("the greedy decoder gives one hypothesis per image: top_k must be 1, got " + str(top_k))
        if min_length != 0 or max_length != -1 or restricted:
            raise ValueError("min_length, max_length and allowed need the beam decoder, not greedy")
    if top_k < 1 or top_k > beam_width:
        raise ValueError("top_k must be in [1, beam_width = " + str(beam_width) + "], got " + str(top_k))
    # 4096: the widest image (preprocess.MAX_WIDTH) gives a quarter as many frames, so no label is longer;
    # larger values overflowed the beam search's integers (min_length 2**62 read as if 0)
    if min_length < 0 or min_length > 4096:
        raise ValueError("min_length must be in [0, 4096], got " + str(min_length))
    if max_length != -1 and (max_length < max(min_length, 1) or max_length > 4096):
        raise ValueError("max_length must be -1 (no limit) or in [max(min_length, 1), 4096], got " + str(max_length)
                         + " with min_length = " + str(min_length))


def allowed_tokens(charset: List[str], allowed: Optional[str], device: torch.device) -> Optional[Tensor]:
    """The beam search's allowed_tokens mask (classes, bool, on `device`; the blank and the symbols
    of `allowed`), None for None (all symbols). A charset without upper-case letters (a case-folded
    model, which reads lower case) takes `allowed` in either case. ValueError naming symbols not in
    the charset."""
    if allowed is None:
        return None
    if len(allowed) == 0:
        raise ValueError("allowed is empty: give the symbols the labels may hold, or leave it out for all of them")
    folded = not any(c.isupper() for c in charset)
    mask = torch.zeros(len(charset) + 1, dtype=torch.bool)
    mask[0] = True  # the blank
    unknown = ""
    for ch in allowed:
        symbol = ch.lower() if folded and ch not in charset else ch  # "ABC" on a 0-9a-z model: its a, b, c
        if symbol in charset:
            mask[charset.index(symbol) + 1] = True
        elif ch not in unknown:
            unknown += ch
    if len(unknown) > 0:
        raise ValueError("allowed characters '" + unknown + "' are not in the charset '" + "".join(charset) + "'")
    return mask.to(device)


def recognize(rec, images: List[Tensor], decoder: str, beam_width: int, top_k: int, min_length: int = 0,
              max_length: int = -1, allowed: Optional[str] = None) -> Tuple[List[List[str]], Tensor]:
    """rec.recognize(images, decoder, beam_width, top_k) for any recognizer, with beam search held
    to labels of min_length..max_length symbols (-1: any) drawn from `allowed` (None: all). A
    scripted recognizer's methods have fixed signatures (also in files saved long ago), so with
    constraints its own preprocess and log_probs run, and decode_log_probs decodes here."""
    if min_length == 0 and max_length == -1 and allowed is None:
        return rec.recognize(images, decoder, beam_width, top_k)
    if not isinstance(rec, nn.Module):  # an ExportedRecognizer: Python methods that take them
        return rec.recognize(images, decoder, beam_width, top_k, min_length, max_length, allowed)
    device = getattr(rec, "device", None)  # load_recognizer sets it; else the weights'
    if device is None:
        device = next(iter(rec.parameters()), torch.empty(0)).device
    with torch.no_grad():
        batch, widths = rec.preprocess([img.to(device) for img in images])
        log_probs, lengths = rec.log_probs(batch, widths)
    return decode_log_probs(log_probs, lengths, list(rec.charset), decoder, beam_width, top_k, rec.token_min_logp,
                            rec.blank_skip_threshold, min_length, max_length,
                            allowed_tokens(list(rec.charset), allowed, log_probs.device))


def build_recognizer(model: CRNN, decoder: str = "beam", beam_width: int = 10,
                     dtype: torch.dtype = torch.float32) -> Recognizer:
    """An inference Recognizer from a (trained) CRNN: a copy in eval mode with the
    batch norms folded into the convs, convs cast to `dtype` (the model is not changed)."""
    rec = Recognizer(InferenceCRNN(model), decoder=decoder, beam_width=beam_width).eval()
    convs_to(rec.model, dtype)
    return rec


INTERPRETER_BANNER = "The following operation failed in the TorchScript interpreter."
_RAISED = re.compile(r"^(?:builtins\.)?([A-Za-z_]\w*): ", re.M)  # "builtins.ValueError: images[1]: ..."


def original_error(e: BaseException) -> BaseException:
    """The error a scripted method raised, as Python would have raised it: torch.jit.Error (and a
    RuntimeError from an op called in TorchScript) opens with INTERPRETER_BANNER and two tracebacks
    before the original "Type: message"; this gives Type(message) (ValueError, RuntimeError, ...;
    RuntimeError for a type that is not a builtin), or e itself when it is not such an error."""
    text = str(e)
    if not text.startswith(INTERPRETER_BANNER):
        return e
    last_traceback = text.rfind("\nTraceback of TorchScript")
    raised = _RAISED.search(text, max(0, last_traceback))
    if raised is None:
        return e
    cls = getattr(builtins, raised.group(1), None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    return with_message(cls, text[raised.end():].strip())


def with_message(cls: type, message: str) -> Exception:
    """cls(message), or RuntimeError(message) where cls needs other arguments."""
    try:
        return cls(message)
    except TypeError:
        return RuntimeError(message)
