"""The decoders the benchmarks compare, in one place: benchmarks/bench_decode.py
times them with pytest-benchmark, `captcha-fast bench` prints a quick table."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from captcha_fast import decode
from captcha_fast.charset import Charset
from captcha_fast.testing import random_log_probs

SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

Decoder = Callable[[Tensor, Tensor, Charset, int], object]

# name -> decoder(log_probs, lengths, charset, beam_width). Greedy ones ignore the beam.
GREEDY: Dict[str, Decoder] = {
    "python greedy (seed loop)": lambda lp, n, cs, k: decode.greedy_decode_python(lp, n, cs),
    "python greedy (tolist)": lambda lp, n, cs, k: decode.greedy_decode_python_lists(lp, n, cs),
    "torch greedy (tokens)": lambda lp, n, cs, k: decode.greedy_decode_torch(lp, n),
    "C++ greedy (tokens)": lambda lp, n, cs, k: torch.ops.captcha_fast.ctc_greedy_decode(lp, n, 0),
    "C++ greedy (strings)": lambda lp, n, cs, k: decode.greedy_decode(lp, n, cs),
}
BEAM: Dict[str, Decoder] = {
    "C++ beam, pruned (strings)": lambda lp, n, cs, k: decode.beam_search(lp, n, cs, k),
    "C++ beam, exact (strings)": lambda lp, n, cs, k: decode.beam_search(
        lp, n, cs, k, token_min_logp=None, blank_skip_threshold=None),
}
BASELINE = "python greedy (seed loop)"


def decode_inputs(N: int, T: int = 50, C: int = 37, seed: int = 0) -> Tuple[Tensor, Tensor, Charset]:
    """Model-like (peaky) log-probs (T, N, C), full lengths, and a charset of C - 1 symbols."""
    lp = random_log_probs(T, N, C, generator=torch.Generator().manual_seed(seed))
    return lp, torch.full((N,), T, dtype=torch.long), Charset(SYMBOLS[: C - 1])


def seconds_per_call(fn: Callable[[], object], min_time: float = 0.3) -> float:
    """Best of several timed runs, each repeating fn for about min_time / 5."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time / 5:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(max(calls, 1)):
            fn()
        best = min(best, (time.perf_counter() - t0) / max(calls, 1))
    return best


def decode_table(N: int = 1024, T: int = 50, C: int = 37, beam_width: int = 10) -> List[Tuple[str, float, float]]:
    """(decoder, sequences/s, ratio to the seed's Python greedy) on one machine, one run."""
    lp, lens, cs = decode_inputs(N, T, C)
    rows = []
    for name, fn in {**GREEDY, **BEAM}.items():
        label = name if name in GREEDY else f"{name} beam={beam_width}"
        rows.append((label, N / seconds_per_call(lambda: fn(lp, lens, cs, beam_width))))
    base = dict(rows)[BASELINE]
    return [(name, rate, rate / base) for name, rate in rows]
