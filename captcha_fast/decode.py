"""CTC decoding to strings from Python: typed wrappers over the C++/CUDA ops
(torch.ops.captcha_fast.*), through the same decode-to-strings path as the
saved Recognizer (captcha_fast.recognizer.decode_log_probs).

log_probs are (T, N, C) = (frames, batch, classes), as the model emits them and
nn.CTCLoss takes them; class 0 is the blank. As predict_batch: one string per
sequence, or Hypothesis(text, score, confidence) lists when scores or top_k > 1 are asked for."""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from captcha_fast.charset import Charset
from captcha_fast.recognizer import (BLANK_SKIP_THRESHOLD, TOKEN_MIN_LOGP, allowed_tokens, check_decode_args,
                                     decode_log_probs)

__all__ = ["Hypothesis", "greedy_decode", "beam_search", "allowed_mask", "TOKEN_MIN_LOGP", "BLANK_SKIP_THRESHOLD"]


class Hypothesis(NamedTuple):
    """One decoded label."""

    text: str
    """The label, as charset symbols."""
    score: float
    """Its log-probability. Greedy decoding: the best path's. Beam search: the
    label's, summed over the alignments the beam kept; over all of them (the
    CTC forward algorithm, log P(label)) when the certificate answered."""
    confidence: float = float("nan")
    """The probability that it is right, in [0, 1] (captcha_fast.confidence): predict_batch maps the
    score through the model's calibration (without one: exp(score), the model's own belief);
    NaN from this module's functions, which decode bare log-probs and know no model."""


def _symbols(charset: Union[Charset, str]) -> List[str]:
    return list(charset.symbols if isinstance(charset, Charset) else _charset_symbols(charset))


@functools.lru_cache(maxsize=64)
def _charset_symbols(charset: str) -> Tuple[str, ...]:
    """A charset string's symbols, checked once: decoding one image a call repeats the same one."""
    return tuple(Charset(charset).symbols)


def to_hypotheses(texts: List[List[str]], scores: Tensor) -> List[List[Hypothesis]]:
    """(top-k strings per sequence, scores (N, k)) -> Hypothesis lists, best first, without the
    missing ones (score -inf: fewer than k labels exist)."""
    return [[Hypothesis(t, s) for t, s in zip(ts, ss) if s > float("-inf")]
            for ts, ss in zip(texts, scores.tolist())]


def unpack_labels(packed: str) -> List[str]:
    """The labels ops' packed output (each label ended by a NUL) as one string per sequence."""
    return packed.split("\0")[:-1]


def greedy_decode(log_probs: Tensor, input_lengths: Tensor, charset: Union[Charset, str], *,
                  return_scores: bool = False) -> Union[List[str], List[Hypothesis]]:
    """Best-path decoding with the C++/CUDA op: one string per sequence, or (return_scores)
    one Hypothesis per sequence (score: the best path's log-probability). The op,
    ctc_greedy_decode_labels, returns the labels packed into one string (no Python object per
    sequence to cross from C++) and raises for a bad sequence as the recognizer's decode does, on
    every device."""
    packed, scores = torch.ops.captcha_fast.ctc_greedy_decode_labels(log_probs, input_lengths, _symbols(charset), 0)
    texts = unpack_labels(packed)
    if not return_scores:
        return texts
    return [Hypothesis(t, s) for t, s in zip(texts, scores.tolist())]


def allowed_mask(charset: Union[Charset, str], allowed: str, device: Union[str, torch.device] = "cpu") -> Tensor:
    """Bool mask over classes that admits the blank and the symbols of `allowed` (recognizer.allowed_tokens)."""
    return allowed_tokens(_symbols(charset), allowed, torch.device(device))


def beam_search(
    log_probs: Tensor,
    input_lengths: Tensor,
    charset: Union[Charset, str],
    beam_width: int = 10,
    top_k: int = 1,
    *,
    return_scores: bool = False,
    token_min_logp: Optional[float] = TOKEN_MIN_LOGP,
    blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD,
    min_length: int = 0,
    max_length: Optional[int] = None,
    allowed: Optional[str] = None,
) -> Union[List[str], List[List[Hypothesis]]]:
    """CTC prefix beam search with the C++/CUDA op: the best string per sequence, or (top_k > 1
    or return_scores) its `top_k` best labels as Hypothesis lists, best first (fewer if fewer
    exist).

    Pruning (token_min_logp, blank_skip_threshold) is on by default; pass
    None for both to run the exact search. min_length/max_length bound the
    label length (captchas often have a known one); `allowed` restricts the
    symbols (e.g. "0123456789" for a meter reading).

    Certificate (top_k = 1): the greedy label and its rivals (the greedy path
    flipped to the runner-up at its three least sure frames) are scored by the
    CTC forward algorithm; when one of them, counting only alignments through
    prefixes this beam provably keeps (each holding more than 1 / (beam_width + 1)
    of all the probability), outweighs every other rival and all the probability
    the rivals leave, it is provably the exact search's top-1 at this beam width
    (and the most probable label), so it is returned without searching, with
    score log P(label) over all alignments. Proof and rounding margin:
    csrc/ctc_decode.h; 96.6-98.7% of the shipped model's outputs take this path.
    Returning strings (top_k = 1, no scores), the op first tries the path test:
    where the greedy path, with the paths that differ from it only where one
    run meets the next, provably holds more than half of all the probability
    (92-95% of the shipped model's outputs), its label is the answer, found in
    one pass over the frames (docs/decoding.md, "The path test alone")."""
    symbols = _symbols(charset)
    mask = None if allowed is None else allowed_mask(charset, allowed, log_probs.device)
    max_len = -1 if max_length is None else max_length
    if top_k == 1 and not return_scores:  # one packed string: no list per sequence to build and take apart
        check_decode_args("beam", beam_width, 1, min_length, max_len, mask is not None)
        return unpack_labels(torch.ops.captcha_fast.ctc_beam_search_labels(
            log_probs, input_lengths, symbols, beam_width, 0, token_min_logp, blank_skip_threshold, min_length,
            max_len, mask, with_scores=False)[0])
    texts, scores = decode_log_probs(log_probs, input_lengths, symbols, "beam", beam_width, top_k, token_min_logp,
                                     blank_skip_threshold, min_length, max_len, mask)
    return to_hypotheses(texts, scores)
