"""The decoders the benchmarks compare, in one place: benchmarks/bench_decode.py
times them with pytest-benchmark, `captcha-fast bench` prints a quick table."""
from __future__ import annotations

import re
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from captcha_fast import decode
from captcha_fast.charset import Charset
from captcha_fast.model import CRNNConfig
from captcha_fast.testing import random_log_probs

SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

def greedy_decode_python(log_probs: Tensor, input_lengths: Tensor, charset: Charset) -> List[str]:
    """Pure-Python greedy with a per-element tensor loop (argmax in torch, then int() of each 0-d
    tensor): NOT the seed's code (which loops over numpy ints); kept until the honest baselines land."""
    best = log_probs.argmax(-1)  # (T, N)
    texts = []
    for n in range(best.shape[1]):
        out, prev = [], 0
        for k in best[: int(input_lengths[n]), n]:
            k = int(k)
            if k != 0 and k != prev:
                out.append(charset.symbols[k - 1])
            prev = k
        texts.append("".join(out))
    return texts


def greedy_decode_python_lists(log_probs: Tensor, input_lengths: Tensor, charset: Charset) -> List[str]:
    """A tuned pure-Python greedy decoder (one .tolist(), then list loops)."""
    best = log_probs.argmax(-1).t().tolist()  # (N, T)
    texts = []
    for path, length in zip(best, input_lengths.tolist()):
        out, prev = [], 0
        for k in path[:length]:
            if k != 0 and k != prev:
                out.append(charset.symbols[k - 1])
            prev = k
        texts.append("".join(out))
    return texts


def greedy_decode_torch(log_probs: Tensor, input_lengths: Tensor) -> Tensor:
    """Vectorised greedy decoding in torch ops: (N, T) int64 tokens, padded with -1."""
    best = log_probs.argmax(-1).t()  # (N, T)
    N, T = best.shape
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=0)
    in_seq = torch.arange(T, device=best.device)[None, :] < input_lengths[:, None]
    keep = (best != 0) & (best != prev) & in_seq
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    return torch.where(keep, best, torch.full_like(best, -1)).gather(1, order)


Decoder = Callable[[Tensor, Tensor, Charset, int], object]

# name -> decoder(log_probs, lengths, charset, beam_width). Greedy ones ignore the beam.
GREEDY: Dict[str, Decoder] = {
    "python greedy (seed loop)": lambda lp, n, cs, k: greedy_decode_python(lp, n, cs),
    "python greedy (tolist)": lambda lp, n, cs, k: greedy_decode_python_lists(lp, n, cs),
    "torch greedy (tokens)": lambda lp, n, cs, k: greedy_decode_torch(lp, n),
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


# ---------------------------------------------------------------------------- the model

def flops_per_image(cfg: CRNNConfig, W: int) -> int:
    """Multiply-adds x 2 of one H x W image at the model's height (convs, projection, GRU,
    classifier; elementwise ops, pooling and decoding not counted)."""
    H = cfg.height
    c1, c2 = cfg.channels
    macs = 9 * H * W * (cfg.in_channels * c1 + c1 * c1)            # block 1 at full size
    macs += 9 * (H // 2) * (W // 2) * (c1 * c2 + c2 * c2)          # block 2 after a pool
    T, hd = W // 4, cfg.hidden_dim
    macs += T * c2 * (H // 4) * hd                                  # projection
    for layer_in in (hd, 2 * hd):                                   # 2 layers x 2 directions
        macs += 2 * T * 3 * hd * (layer_in + hd)
    macs += T * 2 * hd * cfg.num_classes                            # classifier
    return 2 * macs


def cpu_peak_gflops() -> float:
    """Estimated fp32 peak of the CPUs torch uses: threads x GHz x FLOPs/cycle (2 FMA units x
    8 lanes (AVX2) or 16 (AVX-512) x 2)."""
    info = open("/proc/cpuinfo").read()
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", info).group(1))
    lanes = 16 if "avx512f" in info else 8
    return torch.get_num_threads() * mhz / 1e3 * 2 * lanes * 2



def captcha_images(N: int, width: int = 200) -> List[Tensor]:
    """N rendered 50 x `width` captchas of 5 symbols, (3, 50, width) uint8, deterministic."""
    from captcha_fast.synth import render, sample_rng

    symbols = "2345678bcdefgmnpwxy"
    texts = ["".join(symbols[(i * 7 + k) % len(symbols)] for k in range(5)) for i in range(N)]
    return [torch.from_numpy(np.asarray(render(t, sample_rng(0, i), height=50, width=width)).copy()).permute(2, 0, 1)
            for i, t in enumerate(texts)]


def predict_table(batch: int = 64) -> List[Tuple[str, float, float]]:
    """(pipeline, images/s, ratio to the baseline) for `batch` 50x200 captchas and the shipped
    model: the baseline is the eager float32 model + Python greedy decoding."""
    from captcha_fast import api, export
    from captcha_fast.model import CRNN
    from captcha_fast.preprocess import collate

    images = captcha_images(batch)
    scripted = api.default_model()
    eager = CRNN(export.config_of(scripted)).eval()  # the same architecture, before inference folding
    charset = Charset(eager.config.charset)

    def baseline():
        with torch.no_grad():
            x, widths = collate(images, eager.config.height, eager.config.in_channels)
            lp, lengths = eager(x, widths)
        return greedy_decode_python(lp, lengths, charset)

    rows = [("eager fp32 + Python greedy (baseline)", batch / seconds_per_call(baseline))]
    for name, decoder, beam in [("scripted + C++ greedy", "greedy", 1), ("scripted + C++ beam-10", "beam", 10)]:
        rows.append((name, batch / seconds_per_call(lambda: scripted.recognize(images, decoder, beam, 1))))
    return [(name, rate, rate / rows[0][1]) for name, rate in rows]
