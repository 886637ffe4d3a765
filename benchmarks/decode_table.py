"""The README's decoding tables: every decoder of captcha_fast.bench timed interleaved in one
process (rounds alternate between rows, best round counts), on the shipped model's log-probs
for N fresh captchas, for N `captcha`-package renders at 160x60, 200x50 and 280x90 (the package
as users call it), and on synthetic peaky log-probs, with all cores and with one thread. Ratios
are to (c), the fastest pure-Python greedy decoder, with (a), the seed's decoder, beside; the run
fails unless every row returns the same strings (greedy rows (c)'s, beam rows the top-1 of the
exact search run on every sequence, without the certificate).

    python benchmarks/decode_table.py [N] [BEAM]     (default 1024 10; run it on a quiet machine)
"""
import platform
import sys
import time
from functools import lru_cache

import numpy as np
import torch

import captcha_fast
from captcha_fast import bench

PACKAGE_SIZES = [(160, 60), (200, 50), (280, 90)]
PACKAGE_SEED = 777  # not a training seed: fresh renders


@lru_cache(maxsize=4)
def package_inputs(N: int, width: int, height: int) -> bench.DecodeInputs:
    """The shipped model's log-probs for N seeded `captcha`-package renders (ImageCaptcha(width,
    height), its own fonts and sizes) of 4-6 symbols of the model's charset."""
    from captcha_fast.synth import package_captcha

    rec = bench.shipped_model()
    symbols = "".join(rec.charset)
    images, labels = [], []
    for i in range(N):
        image, text = package_captcha(PACKAGE_SEED + width, i, (width, height), symbols)
        images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
        labels.append(text)
    with torch.no_grad():
        log_probs, lengths = rec.log_probs(*rec.preprocess(images))
    T, _, C = log_probs.shape
    return bench.DecodeInputs(log_probs.contiguous(), lengths, list(rec.charset),
                              f"the shipped model's log-probs for {N} captcha-package renders {width}x{height}, "
                              f"T<={T}, C={C}", labels)


def read_bound(x: bench.DecodeInputs) -> float:
    """Sequences per second of one pass over the log-probs (torch.sum): what any decoder pays."""
    s = bench.interleaved({"sum": lambda: x.log_probs.sum()}, rounds=7)["sum"]
    return x.log_probs.shape[1] / s


def certified_share(x: bench.DecodeInputs, beam: int) -> float:
    """The share of sequences the top-label certificate answers without searching. The certificate
    does not depend on the pruning options, so against a search pruned to almost nothing (every
    frame blank-only) a certified sequence's score (log P of its label) differs and a searched one's
    does not."""
    ops = torch.ops.captcha_fast
    args = (x.log_probs, x.lengths, beam, 1, 0, 0.0, 1e-9, 0, -1, None)
    return float((ops.ctc_beam_search(*args, True)[2] != ops.ctc_beam_search(*args, False)[2]).float().mean())


def path_share(x: bench.DecodeInputs, beam: int) -> float:
    """The share of sequences the path test alone answers (strings only: NaN scores)."""
    scores = torch.ops.captcha_fast.ctc_beam_search_labels(x.log_probs, x.lengths, x.charset, beam,
                                                           with_scores=False)[1]
    return float(scores.isnan().float().mean())


def main(N: int = 1024, beam: int = 10) -> None:
    threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, captcha_fast "
          f"{captcha_fast.__version__}, {threads} threads, {time.strftime('%Y-%m-%d %H:%M')}\n")
    all_inputs = [bench.model_inputs(N), *(package_inputs(N, w, h) for w, h in PACKAGE_SIZES),
                  bench.synthetic_inputs(N)]
    for x in all_inputs:
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            rows = bench.decode_table(N, beam, x)
            title = f"{x.description}; {n_threads} thread{'s' if n_threads > 1 else ''}"
            print(bench.format_table(rows, title, markdown=True))
            print(f"\nreading the log-probs once (torch.sum): {read_bound(x):,.0f} seq/s; "
                  f"certified without searching: {certified_share(x, beam):.1%}, of all by the path test "
                  f"alone (strings only): {path_share(x, beam):.1%}\n")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
