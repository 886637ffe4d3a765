"""CTC decoding from Python: typed wrappers over the C++/CUDA ops
(torch.ops.captcha_fast.*) that return strings. The pure-Python baselines
are in captcha_fast.bench.

log_probs are (T, N, C) = (frames, batch, classes), as the model emits them and
nn.CTCLoss takes them; class 0 is the blank."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from captcha_fast import ops  # noqa: F401  (registers the ops and their fake kernels)
from captcha_fast.charset import Charset

# Default pruning of beam_search: measured on model-like (peaky) log-probs, it
# changes no top-1 label while making the search several times faster
# (benchmarks/bench_decode.py). None switches a rule off (exact search).
TOKEN_MIN_LOGP = -8.0
BLANK_SKIP_THRESHOLD = 0.999


class Hypothesis(NamedTuple):
    """One decoded label."""

    text: str
    """The label, as charset symbols."""
    score: float
    """Its log-probability: the best path's for greedy decoding; the sum over
    the alignments the beam kept for beam search."""


def _check_scores(scores: Tensor, op: str) -> None:
    # The CUDA kernels flag bad input with a NaN score instead of syncing.
    if scores.is_cuda:
        bad = torch.isnan(scores.reshape(scores.shape[0], -1)).any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{op}: sequence {bad[0]} has NaN/+inf log-probs or a length outside [0, T]")


def _texts(tokens: Tensor, lengths: Tensor, charset: Charset) -> List[str]:
    symbols = charset.symbols
    return ["".join(symbols[k - 1] for k in row[:n]) for row, n in zip(tokens.tolist(), lengths.tolist())]


def greedy_decode(log_probs: Tensor, input_lengths: Tensor, charset: Charset) -> List[Hypothesis]:
    """Best-path decoding with the C++/CUDA op: one Hypothesis per sequence."""
    tokens, lengths, scores = torch.ops.captcha_fast.ctc_greedy_decode(log_probs, input_lengths, 0)
    _check_scores(scores, "ctc_greedy_decode")
    return [Hypothesis(t, s) for t, s in zip(_texts(tokens, lengths, charset), scores.tolist())]


def allowed_mask(charset: Charset, allowed: str, device: Union[str, torch.device] = "cpu") -> Tensor:
    """Bool mask over classes that admits the blank and the symbols of `allowed`."""
    bad = "".join(ch for ch in dict.fromkeys(allowed) if ch not in charset.symbols)
    if bad:
        raise ValueError(f"allowed characters {bad!r} are not in the charset {charset.symbols!r}")
    mask = torch.zeros(charset.num_classes, dtype=torch.bool)
    mask[0] = True
    mask[[charset.symbols.index(ch) + 1 for ch in allowed]] = True
    return mask.to(device)


def beam_search(
    log_probs: Tensor,
    input_lengths: Tensor,
    charset: Charset,
    beam_width: int = 10,
    top_k: int = 1,
    *,
    token_min_logp: Optional[float] = TOKEN_MIN_LOGP,
    blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD,
    min_length: int = 0,
    max_length: Optional[int] = None,
    allowed: Optional[str] = None,
) -> List[List[Hypothesis]]:
    """CTC prefix beam search with the C++/CUDA op: for each sequence its
    `top_k` best labels, best first (fewer if fewer exist).

    Pruning (token_min_logp, blank_skip_threshold) is on by default; pass
    None for both to run the exact search. min_length/max_length bound the
    label length (captchas often have a known one); `allowed` restricts the
    symbols (e.g. "0123456789" for a meter reading)."""
    mask = None if allowed is None else allowed_mask(charset, allowed, log_probs.device)
    tokens, lengths, scores = torch.ops.captcha_fast.ctc_beam_search(
        log_probs, input_lengths, beam_width, top_k, 0, token_min_logp, blank_skip_threshold,
        min_length, -1 if max_length is None else max_length, mask,
    )
    _check_scores(scores, "ctc_beam_search")
    N, K, L = tokens.shape
    texts = _texts(tokens.reshape(N * K, L), lengths.reshape(-1), charset)
    flat_scores = scores.reshape(-1).tolist()
    return [
        [Hypothesis(texts[n * K + k], flat_scores[n * K + k]) for k in range(K) if flat_scores[n * K + k] > float("-inf")]
        for n in range(N)
    ]
