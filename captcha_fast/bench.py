"""Benchmarks in one place: the decoding baselines, real and synthetic inputs, interleaved
timing and the tables. benchmarks/decode_table.py prints the README's decoding tables,
benchmarks/bench_decode.py and bench_model.py time the same decoders with pytest-benchmark,
and `captcha-fast bench` gives a quick run.

The decoding baselines are what they say they are. Every ratio is quoted against (c), the
fastest pure-Python greedy decoder, with (a), the seed project's decoder, beside it:

    (a) seed_decode: the seed project's decoder (abdksyed/TextFromImage, src/captcha/utils.py
        decode_preds + dataset.py Classification.decode): argmax in torch, `.detach().cpu()
        .numpy()`, then per row a loop over numpy ints that rebuilds its index -> char dict
        and grows the label with `+=`.
    (b) python_greedy_decode: pure Python, the argmax too (one `.tolist()` of the log-probs,
        `row.index(max(row))` per frame).
    (c) fastest_python_greedy_decode: the fastest pure-Python greedy decoder we could write
        (torch argmax, one `.tolist()`, list loops; itertools.groupby was slower).

All decoders here return the same thing, strings (top-1), and every table checks that the
greedy rows return exactly (c)'s strings and the beam rows exactly the exact search's top-1.
log_probs are (T, N, C) with class 0 the blank; charset[i] is the symbol of class i + 1."""
from __future__ import annotations

import gc
import re
import time
from functools import lru_cache
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from captcha_fast import decode
from captcha_fast.charset import Charset
from captcha_fast.model import GATE_WIDTH, CRNNConfig
from captcha_fast.testing import random_log_probs

# ---------------------------------------------------------------------------- baselines


def seed_decode(log_probs: Tensor, input_lengths: Tensor, charset: Sequence[str]) -> List[str]:
    """(a) The seed project's greedy decoder, reproduced faithfully (its model is batch-first,
    ours (T, N, C): the argmax is taken, then transposed as a view)."""
    unique_characters = {char: idx for idx, char in enumerate(charset, start=1)}  # its char -> class map
    unique_characters[" "] = 0

    def decode_row(encoded) -> str:  # Classification.decode
        char2idx = {idx: char for char, idx in unique_characters.items()}
        prev = 0
        label = ""
        for idx in encoded:
            if idx != 0 and idx != prev:
                label += char2idx[idx]
            prev = idx
        return label

    outputs = log_probs.argmax(dim=-1).t()  # (N, T)
    outputs = outputs.detach().cpu().numpy()
    return [decode_row(output[:length]) for output, length in zip(outputs, input_lengths.tolist())]


def python_greedy_decode(log_probs: Tensor, input_lengths: Tensor, charset: Sequence[str]) -> List[str]:
    """(b) Greedy decoding in pure Python, the argmax included."""
    symbols = [""] + list(charset)
    texts = []
    for frames, length in zip(log_probs.transpose(0, 1).tolist(), input_lengths.tolist()):
        out, prev = [], 0
        for row in frames[:length]:
            k = row.index(max(row))  # the first maximum, as torch.argmax
            if k != prev:
                if k:
                    out.append(symbols[k])
                prev = k
        texts.append("".join(out))
    return texts


def fastest_python_greedy_decode(log_probs: Tensor, input_lengths: Tensor, charset: Sequence[str]) -> List[str]:
    """(c) The fastest pure-Python greedy decoder we could write: the bar every ratio is quoted against."""
    symbols = [""] + list(charset)
    texts = []
    for path, length in zip(log_probs.argmax(-1).t().tolist(), input_lengths.tolist()):
        out, prev = [], 0
        for k in path[:length]:
            if k != prev:
                if k:
                    out.append(symbols[k])
                prev = k
        texts.append("".join(out))
    return texts


def torch_greedy_decode(log_probs: Tensor, input_lengths: Tensor, charset: Sequence[str]) -> List[str]:
    """Greedy decoding vectorised in torch ops (argmax, merge, blank removal), then one
    `.tolist()` and a join per sequence."""
    best = log_probs.argmax(-1).t()  # (N, T)
    T = best.shape[1]
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=0)
    in_sequence = torch.arange(T, device=best.device)[None, :] < input_lengths[:, None]
    keep = (best != 0) & (best != prev) & in_sequence
    # A stable sort of "not kept" moves the kept tokens to the front, in order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    tokens = best.gather(1, order).tolist()
    symbols = [""] + list(charset)
    return ["".join([symbols[k] for k in row[:n]]) for row, n in zip(tokens, keep.sum(1).tolist())]


# ---------------------------------------------------------------------------- inputs


class DecodeInputs(NamedTuple):
    """What every decoder is given: log_probs (T, N, C) float32, lengths (N,) int64, the charset
    (C - 1 symbols), and a description for tables; labels are the rendered texts (model inputs)."""

    log_probs: Tensor
    lengths: Tensor
    charset: List[str]
    description: str
    labels: Optional[List[str]] = None


SYMBOLS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FRESH_SEED = 12345  # the captcha seed the shipped model's evaluation uses: never seen in training


def synthetic_inputs(N: int, T: int = 50, C: int = 37, seed: int = 0) -> DecodeInputs:
    """Model-like (peaky) log-probs from captcha_fast.testing.random_log_probs, full lengths."""
    lp = random_log_probs(T, N, C, generator=torch.Generator().manual_seed(seed))
    return DecodeInputs(lp, torch.full((N,), T, dtype=torch.long), list(SYMBOLS[: C - 1]),
                        f"synthetic peaky log-probs, T={T}, C={C}")


def shipped_model():
    """The shipped pretrained recognizer (captcha_fast/pretrained/default.pt), float32, CPU."""
    from captcha_fast import api

    return api.load(api.DEFAULT_MODEL, device="cpu", amp=False, compiled=False)


def fresh_captchas(N: int, charset: str, seed: int = FRESH_SEED) -> Tuple[List[Tensor], List[str]]:
    """N seeded synthetic captchas of 4-8 symbols of `charset`, as (3, H, W) uint8 tensors, and
    their labels."""
    from captcha_fast.synth import SynthConfig, SyntheticCaptchas

    captchas = SyntheticCaptchas(SynthConfig(charset=charset, seed=seed), N)
    images, labels = [], []
    for image, label in captchas:
        images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
        labels.append(label)
    return images, labels


@lru_cache(maxsize=4)
def model_inputs(N: int, seed: int = FRESH_SEED) -> DecodeInputs:
    """The shipped model's log-probs for N freshly rendered, seeded captchas (its own
    preprocessing and network; the model's charset and height, whatever they are)."""
    rec = shipped_model()
    images, labels = fresh_captchas(N, "".join(rec.charset), seed)
    with torch.no_grad():
        batch, widths = rec.preprocess(images)
        log_probs, lengths = rec.log_probs(batch, widths)
    T, _, C = log_probs.shape
    return DecodeInputs(log_probs.contiguous(), lengths, list(rec.charset),
                        f"the shipped model's log-probs for {N} fresh captchas, T<={T}, C={C}", labels)


# ---------------------------------------------------------------------------- decoders


class Decoder(NamedTuple):
    """A table row: call(inputs, beam_width) -> the decoder's own output (what is timed);
    texts(output) -> its top-1 strings (what is checked)."""

    label: str
    call: Callable[[DecodeInputs, int], object]
    texts: Callable[[object], List[str]] = list


def _charset(x: DecodeInputs) -> Charset:
    return Charset("".join(x.charset))


def _first_texts(out) -> List[str]:
    return [t[0] for t in out[0]]


_ops = torch.ops.captcha_fast
# Short names (test ids) -> rows. GREEDY rows must return (c)'s strings, BEAM rows the exact search's top-1.
GREEDY: Dict[str, Decoder] = {
    "a_seed": Decoder("(a) the seed's decoder (argmax, .numpy(), per-row loop rebuilding its dict)",
                      lambda x, k: seed_decode(x.log_probs, x.lengths, x.charset)),
    "b_python": Decoder("(b) pure-Python greedy (argmax in Python too)",
                        lambda x, k: python_greedy_decode(x.log_probs, x.lengths, x.charset)),
    "c_fastest_python": Decoder("(c) fastest pure-Python greedy (torch argmax, one .tolist(), list loops)",
                                lambda x, k: fastest_python_greedy_decode(x.log_probs, x.lengths, x.charset)),
    "torch": Decoder("torch greedy (vectorised merge, Python join)",
                     lambda x, k: torch_greedy_decode(x.log_probs, x.lengths, x.charset)),
    "cpp_greedy_strings": Decoder("C++ greedy, strings op (ctc_greedy_decode_strings)",
                                  lambda x, k: _ops.ctc_greedy_decode_strings(x.log_probs, x.lengths, x.charset, 0),
                                  _first_texts),
    "cpp_greedy_labels": Decoder("C++ greedy, labels op (ctc_greedy_decode_labels: packed labels, split)",
                                 lambda x, k: decode.unpack_labels(
                                     _ops.ctc_greedy_decode_labels(x.log_probs, x.lengths, x.charset, 0)[0]),
                                 list),
    "greedy_decode": Decoder("captcha_fast.greedy_decode",
                             lambda x, k: decode.greedy_decode(x.log_probs, x.lengths, _charset(x)),
                             list),
}
# The beam rows' defaults include the top-label certificate (certify=True); the reference row,
# EXACT, searches every sequence (certify=False), so the checks compare against the search itself.
BEAM: Dict[str, Decoder] = {
    "cpp_beam_pruned_strings": Decoder(
        "C++ beam search, default pruning + certificate, strings op (ctc_beam_search_strings)",
        lambda x, k: _ops.ctc_beam_search_strings(x.log_probs, x.lengths, x.charset, k, 1, 0,
                                                  decode.TOKEN_MIN_LOGP, decode.BLANK_SKIP_THRESHOLD),
        _first_texts),
    "cpp_beam_pruned_labels": Decoder(
        "C++ beam search, default pruning + certificate, labels op without scores "
        "(ctc_beam_search_labels: packed, split)",
        lambda x, k: decode.unpack_labels(_ops.ctc_beam_search_labels(
            x.log_probs, x.lengths, x.charset, k, 0, decode.TOKEN_MIN_LOGP, decode.BLANK_SKIP_THRESHOLD,
            with_scores=False)[0]),
        list),
    "beam_search": Decoder("captcha_fast.beam_search (default pruning + certificate)",
                           lambda x, k: decode.beam_search(x.log_probs, x.lengths, _charset(x), k),
                           list),
    "cpp_beam_pruned_search_strings": Decoder(
        "C++ beam search, default pruning, no certificate (search every sequence)",
        lambda x, k: _ops.ctc_beam_search_strings(x.log_probs, x.lengths, x.charset, k, 1, 0,
                                                  decode.TOKEN_MIN_LOGP, decode.BLANK_SKIP_THRESHOLD,
                                                  0, -1, None, False),
        _first_texts),
    "cpp_beam_exact_strings": Decoder(
        "C++ beam search, exact, no certificate, strings op (ctc_beam_search_strings)",
        lambda x, k: _ops.ctc_beam_search_strings(x.log_probs, x.lengths, x.charset, k, 1, 0, None, None,
                                                  0, -1, None, False),
        _first_texts),
}
DECODERS = {**GREEDY, **BEAM}
BASELINE, SEED, EXACT = "c_fastest_python", "a_seed", "cpp_beam_exact_strings"


def check_agreement(inputs: DecodeInputs, beam_width: int, outputs: Dict[str, object]) -> None:
    """AssertionError unless every greedy row returned (c)'s strings and every beam row the
    exact search's top-1 strings (outputs: row id -> its output)."""
    greedy = fastest_python_greedy_decode(inputs.log_probs, inputs.lengths, inputs.charset)
    exact = BEAM[EXACT].texts(BEAM[EXACT].call(inputs, beam_width))
    for name, out in outputs.items():
        want = greedy if name in GREEDY else exact
        got = DECODERS[name].texts(out)
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert len(got) == len(want) and not bad, (
            f"{DECODERS[name].label}: {len(bad)} of {len(want)} strings differ from the reference, "
            f"e.g. sequence {bad[:1]}")


# ---------------------------------------------------------------------------- timing


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 7, min_round: float = 0.02) -> Dict[str, float]:
    """Seconds per call of each function: `rounds` rounds, each running every function in turn
    (so a busy machine slows all of them alike) for at least min_round seconds; the best round
    counts. GC is off while timing."""
    calls = {}
    for name, fn in fns.items():  # warm-up, and how many calls fill min_round
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_round / max(time.perf_counter() - t0, 1e-9)))
    best = {name: float("inf") for name in fns}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    finally:
        if enabled:
            gc.enable()
    return best


class Row(NamedTuple):
    name: str
    rate: float        # sequences (or images) per second
    vs_baseline: float  # rate / (c)'s rate (predict tables: / the baseline pipeline's)
    vs_seed: float     # rate / (a)'s rate (nan in predict tables)


def decode_table(N: int = 1024, beam_width: int = 10, inputs="model", rounds: int = 7) -> List[Row]:
    """Every decoder on the same inputs ("model": the shipped model's log-probs for N fresh
    captchas; "synthetic": peaky random log-probs, T=50, C=37; or DecodeInputs), timed
    interleaved in this process; raises unless all rows agree (check_agreement)."""
    if isinstance(inputs, DecodeInputs):
        x = inputs
    else:
        x = model_inputs(N) if inputs == "model" else synthetic_inputs(N)
    N = x.log_probs.shape[1]
    check_agreement(x, beam_width, {name: d.call(x, beam_width) for name, d in DECODERS.items()})
    seconds = interleaved({name: (lambda d=d: d.call(x, beam_width)) for name, d in DECODERS.items()}, rounds)
    return [Row(d.label if name in GREEDY else f"{d.label}, beam {beam_width}", N / seconds[name],
                seconds[BASELINE] / seconds[name], seconds[SEED] / seconds[name]) for name, d in DECODERS.items()]


def format_table(rows: List[Row], title: str, unit: str = "seq/s", markdown: bool = False) -> str:
    """The rows as a plain-text (or markdown) table, ratios to (c) with (a) beside."""
    seed = not all(np.isnan(r.vs_seed) for r in rows)
    if markdown:
        head = f"| {title} | {unit} | {'vs (c)' if seed else 'vs baseline'} |" + (" vs (a) |" if seed else "")
        lines = [head, "|---|---:|---:|" + ("---:|" if seed else "")]
        for r in rows:
            lines.append(f"| {r.name} | {r.rate:,.0f} | {r.vs_baseline:.2f}x |" + (f" {r.vs_seed:.2f}x |" if seed else ""))
        return "\n".join(lines)
    lines = [title, f"{'':<80} {unit:>11} {'vs (c)' if seed else 'vs base':>8}" + (f" {'vs (a)':>8}" if seed else "")]
    for r in rows:
        lines.append(f"{r.name:<80} {r.rate:>11,.0f} {r.vs_baseline:>7.2f}x" + (f" {r.vs_seed:>7.2f}x" if seed else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the model


def flops_per_image(cfg: CRNNConfig, W: int) -> int:
    """Multiply-adds x 2 of one image W wide at the model's height H (convs, projection, GRU,
    classifier; elementwise ops, pooling and decoding not counted)."""
    H = cfg.height
    c1, c2 = cfg.channels
    macs = 9 * H * W * (cfg.in_channels * c1 + c1 * c1)            # block 1 at full size
    macs += 9 * (H // 2) * (W // 2) * (c1 * c2 + c2 * c2)          # block 2 after a pool
    macs += 9 * (H // 4) * (W // 4) * 2 * c2 * c2 * cfg.res_blocks  # residual blocks after the second pool
    T, hd = W // 4, cfg.hidden_dim
    macs += T * c2 * (H // 4) * hd                                  # projection
    for layer_in in (hd, 2 * hd):                                   # 2 layers x 2 directions
        macs += 2 * T * 3 * hd * (layer_in + hd)
    macs += T * 2 * hd * cfg.num_classes                            # classifier
    if cfg.style_heads and cfg.style_branch == "block2":  # the gate's 3x3 conv on block 1's features; a batch
        macs += 9 * (H // 2) * (W // 2) * c1 * GATE_WIDTH          # of one style runs that head's layers alone
    elif cfg.style_heads:  # the gate's 3x3 conv (its pooling and linear layer aside) and each other head's classifier
        macs += 9 * (H // 4) * T * c2 * GATE_WIDTH + len(cfg.style_heads) * T * 2 * hd * cfg.num_classes
    return 2 * macs


def cpu_peak_gflops() -> float:
    """Estimated fp32 peak of the CPUs torch uses: threads x GHz x FLOPs/cycle (2 FMA units x
    8 lanes (AVX2) or 16 (AVX-512) x 2)."""
    info = open("/proc/cpuinfo").read()
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", info).group(1))
    lanes = 16 if "avx512f" in info else 8
    return torch.get_num_threads() * mhz / 1e3 * 2 * lanes * 2


@lru_cache(maxsize=4)
def captcha_images(N: int, width: int = 200) -> Tuple[List[Tensor], List[str]]:
    """N fresh captchas of 5 symbols of the shipped model's charset, rendered 50 x `width`
    ((3, 50, width) uint8, deterministic), and their labels."""
    from captcha_fast.synth import render, sample_rng

    symbols = "".join(shipped_model().charset)
    labels = ["".join(symbols[(i * 7 + k * 3) % len(symbols)] for k in range(5)) for i in range(N)]
    images = [torch.from_numpy(np.asarray(render(t, sample_rng(FRESH_SEED, i), height=50, width=width)).copy())
              .permute(2, 0, 1) for i, t in enumerate(labels)]
    return images, labels


BASELINE_PIPELINE = "eager fp32 CRNN (the training nn.Module) + (c) fastest Python greedy (baseline)"


def eager_baseline(images: List[Tensor]) -> List[str]:
    """The predict baseline, as a user would run the model by hand: the shipped weights in the
    training nn.Module (captcha_fast.model.CRNN, eval mode, fp32, batch norms unfolded), the same
    preprocessing, and decoding by (c)."""
    from captcha_fast.preprocess import MAX_WIDTH, collate

    model = eager_shipped_model()
    c = model.config
    with torch.no_grad():
        batch, widths = collate(images, c.height, c.in_channels, MAX_WIDTH, c.ink)
        log_probs, lengths = model(batch, widths)
    return fastest_python_greedy_decode(log_probs, lengths, list(c.charset))


@lru_cache(maxsize=1)
def eager_shipped_model():
    """The shipped model's training weights (pretrained/default.ckpt) in the training CRNN, eval mode."""
    from captcha_fast.checkpoint import PRETRAINED_CHECKPOINT, load_model

    return load_model(PRETRAINED_CHECKPOINT)


def predict_table(batch: int = 64, rounds: int = 5) -> List[Row]:
    """(pipeline, images/s, ratio to the baseline) for calls of `batch` 50x200 fresh captchas
    (batches below 32 cycle through 32 different images, one call per chunk, as a server sees them)
    and the shipped weights in every row: the baseline runs them eagerly and decodes with (c).
    Raises unless the greedy pipeline returns the baseline's strings and beam search the exact
    search's top-1."""
    all_images, _ = captcha_images(batch * max(1, 32 // batch))
    chunks = [all_images[i: i + batch] for i in range(0, len(all_images), batch)]
    scripted = shipped_model()

    def each(fn):  # one call per chunk; the reads of all of them
        return lambda: [r for chunk in chunks for r in fn(chunk)]

    pipelines = {
        BASELINE_PIPELINE: each(eager_baseline),
        "scripted recognizer + C++ greedy": each(lambda c: scripted.recognize(c, "greedy", 1, 1)[0]),
        "scripted recognizer + C++ beam 10": each(lambda c: scripted.recognize(c, "beam", 10, 1)[0]),
    }
    want = pipelines[BASELINE_PIPELINE]()
    got_greedy = [t[0] for t in pipelines["scripted recognizer + C++ greedy"]()]
    assert got_greedy == want, "the scripted greedy pipeline's strings differ from the eager baseline's"
    exact = []
    with torch.no_grad():
        for chunk in chunks:
            lp, lengths = scripted.log_probs(*scripted.preprocess(chunk))
            exact += [t[0] for t in _ops.ctc_beam_search_strings(lp, lengths, list(scripted.charset), 10, 1, 0)[0]]
    assert [t[0] for t in pipelines["scripted recognizer + C++ beam 10"]()] == exact, \
        "the scripted beam pipeline's top-1 differs from the exact search's"
    # what a user calls: predict_batch with its defaults (captcha_fast.load's choice of format and
    # precision, the automatic thread count, the input checks), its strings
    from captcha_fast import api, formats
    fastest = api.load(api.DEFAULT_MODEL, device="cpu")
    dtype = str(getattr(fastest, "dtype", None) or formats.resolve_dtype(None, torch.device("cpu"))).split(".")[-1]
    default = each(lambda c: api.predict_batch(c))
    same = sum(r == e for r, e in zip(default(), exact))
    pipelines[f"captcha_fast.predict_batch, its defaults: {api.format_of(fastest)}, {dtype} + C++ beam 10 "
              f"({same}/{len(exact)} strings as fp32)"] = default
    seconds = interleaved(pipelines, rounds)
    base = seconds[BASELINE_PIPELINE]
    return [Row(name, len(all_images) / s, base / s, float("nan")) for name, s in seconds.items()]
