"""Pure-Python CTC prefix beam search: slow and plain, the test oracle.

It follows the textbook algorithm with dictionaries keyed by label tuples
and float64 arithmetic, independently of the C++ core (csrc/ctc_decode.h),
and implements the same options with the same meaning."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

NEG_INF = float("-inf")


def log_add(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def prefix_beam_search(
    frames: Sequence[Sequence[float]],
    beam_width: int,
    blank: int = 0,
    token_min_logp: Optional[float] = None,
    blank_skip_threshold: Optional[float] = None,
    min_length: int = 0,
    max_length: int = -1,
    allowed: Optional[Sequence[bool]] = None,
) -> List[Tuple[Tuple[int, ...], float]]:
    """All surviving (label, log-prob) pairs of one sequence, best first.

    `frames` is the (T, C) log-probabilities of one sequence, already cut to
    its length. Options (None = exact search):
      token_min_logp: at each frame only characters with log-prob >= it are
        extended, plus the frame's best character;
      blank_skip_threshold: a frame whose blank probability is >= it only
        moves each prefix's mass to "ends in blank";
      min_length / max_length: label length bounds (-1: no maximum);
      allowed: mask over classes (the blank entry is ignored)."""
    min_logp = NEG_INF if token_min_logp is None else token_min_logp
    log_skip = math.inf if blank_skip_threshold is None or blank_skip_threshold >= 1 else math.log(blank_skip_threshold)
    T = len(frames)
    if T < min_length:
        return []
    beams: Dict[Tuple[int, ...], Tuple[float, float]] = {(): (0.0, NEG_INF)}  # prefix -> (p_blank, p_nonblank)
    for t, row in enumerate(frames):
        if any(math.isnan(v) or v == math.inf for v in row):
            raise ValueError(f"frame {t} has NaN or +inf")
        chars = [c for c in range(len(row)) if c != blank and (allowed is None or allowed[c])]
        best = max(chars, key=lambda c: row[c]) if chars else None  # max keeps the first of ties
        extend = [c for c in chars if row[c] >= min_logp and row[c] > NEG_INF]
        if best is not None and NEG_INF < row[best] < min_logp:
            extend.append(best)
        if row[blank] >= log_skip:
            beams = {p: (log_add(pb, pnb) + row[blank], NEG_INF) for p, (pb, pnb) in beams.items()}
            continue

        nxt: Dict[Tuple[int, ...], List[float]] = {}
        for prefix, (pb, pnb) in beams.items():
            entry = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
            entry[0] = log_add(entry[0], log_add(pb, pnb) + row[blank])
            if prefix:  # repeating the last character collapses into the same prefix
                entry[1] = log_add(entry[1], pnb + row[prefix[-1]])
            if 0 <= max_length <= len(prefix):
                continue
            for c in extend:
                # a repeat needs a blank between the copies: only the p_blank part extends
                mass = pb if prefix and prefix[-1] == c else log_add(pb, pnb)
                e = nxt.setdefault(prefix + (c,), [NEG_INF, NEG_INF])
                e[1] = log_add(e[1], mass + row[c])

        frames_left = T - t - 1
        ranked = sorted(
            ((p, pb, pnb) for p, (pb, pnb) in nxt.items()
             if log_add(pb, pnb) > NEG_INF and len(p) + frames_left >= min_length),
            key=lambda item: -log_add(item[1], item[2]),
        )
        beams = {p: (pb, pnb) for p, pb, pnb in ranked[:beam_width]}
        if not beams:
            return []
    final = [(p, log_add(pb, pnb)) for p, (pb, pnb) in beams.items()]
    final = [(p, s) for p, s in final if s > NEG_INF and len(p) >= min_length]
    return sorted(final, key=lambda item: -item[1])


def greedy_decode_reference(frames: Sequence[Sequence[float]], blank: int = 0) -> Tuple[Tuple[int, ...], float]:
    """Best path of one sequence: (label, its log-probability)."""
    label: List[int] = []
    prev, score = blank, 0.0
    for row in frames:
        best = max(range(len(row)), key=lambda c: row[c])
        score += row[best]
        if best != blank and best != prev:
            label.append(best)
        prev = best
    return tuple(label), score
