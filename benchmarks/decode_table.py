"""The README's decoding tables: every decoder of captcha_fast.bench timed interleaved in one
process (rounds alternate between rows, best round counts), on the shipped model's log-probs
for N fresh captchas and on synthetic peaky log-probs, with all cores and with one thread.
Ratios are to (c), the fastest pure-Python greedy decoder, with (a), the seed's decoder,
beside; the run fails unless every row returns the same strings (greedy rows (c)'s, beam
rows the exact search's top-1).

    python benchmarks/decode_table.py [N] [BEAM]     (default 1024 10; run it on a quiet machine)
"""
import platform
import sys
import time

import torch

import captcha_fast
from captcha_fast import bench


def read_bound(x: bench.DecodeInputs) -> float:
    """Sequences per second of one pass over the log-probs (torch.sum): what any decoder pays."""
    s = bench.interleaved({"sum": lambda: x.log_probs.sum()}, rounds=7)["sum"]
    return x.log_probs.shape[1] / s


def main(N: int = 1024, beam: int = 10) -> None:
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, captcha_fast "
          f"{captcha_fast.__version__}, {threads} threads, {time.strftime('%Y-%m-%d %H:%M')}\n")
    for inputs in ("model", "synthetic"):
        x = bench.model_inputs(N) if inputs == "model" else bench.synthetic_inputs(N)
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            rows = bench.decode_table(N, beam, inputs)
            title = f"{x.description}; {n_threads} thread{'s' if n_threads > 1 else ''}"
            print(bench.format_table(rows, title, markdown=True))
            print(f"\nreading the log-probs once (torch.sum): {read_bound(x):,.0f} seq/s\n")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
