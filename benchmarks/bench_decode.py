"""Decoding throughput with pytest-benchmark: every decoder of captcha_fast.bench (the
baselines (a), (b), (c), torch, the C++ ops and the public calls) on

  - model: the shipped model's log-probs for N in {1, 64, 1024} fresh captchas;
  - package: its log-probs for 1024 `captcha`-package renders at 160x60, 200x50, 280x90;
  - synthetic: peaky random log-probs (captcha_fast.testing.random_log_probs), N = 1024,
    T = 50, C in {20, 37};

beam widths 1, 10, 32 for the beam rows; peer decoders when installed.

    pytest --benchmark benchmarks/bench_decode.py --benchmark-json=b.json && python tools/bench_table.py b.json

seq/s = N / best round (extra_info). Every output is checked: greedy rows against (c), beam
rows' top-1 against the exact search (run on every sequence, without the certificate). The README's headline table comes from
benchmarks/decode_table.py, which times the rows interleaved in one process."""
import importlib.util
import time

import pytest
import torch

from captcha_fast import bench

INPUTS = ["model-1", "model-64", "model-1024", "package-160x60", "package-200x50", "package-280x90",
          "synthetic-C20", "synthetic-C37"]
BEAMS = [1, 10, 32]


def _inputs(name: str) -> bench.DecodeInputs:
    kind, size = name.split("-")
    if kind == "model":
        return bench.model_inputs(int(size))
    if kind == "package":  # 1024 captcha-package renders at this size (benchmarks/decode_table.py)
        from decode_table import package_inputs

        return package_inputs(1024, *(int(v) for v in size.split("x")))
    return bench.synthetic_inputs(1024, C=int(size[1:]))


def _run(benchmark, fn, N):
    if benchmark.disabled:  # --benchmark-disable: the checks only, each case run once
        return benchmark(fn)
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    rounds = max(5, min(200, int(0.5 / max(once, 1e-6))))  # about half a second per case
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one call, no timing)
        # best round: on a shared machine the minimum is the least disturbed measurement
        benchmark.extra_info["seq_per_s"] = N / benchmark.stats.stats.min
    return result


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("name", list(bench.GREEDY))
def test_greedy(benchmark, name, inputs):
    x = _inputs(inputs)
    N = x.log_probs.shape[1]
    benchmark.group = f"decode {inputs}"
    benchmark.extra_info["row"] = bench.GREEDY[name].label
    out = _run(benchmark, lambda: bench.GREEDY[name].call(x, 1), N)
    bench.check_agreement(x, 10, {name: out})


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("name", list(bench.BEAM))
def test_beam(benchmark, name, inputs, beam):
    x = _inputs(inputs)
    N = x.log_probs.shape[1]
    benchmark.group = f"decode {inputs}"
    benchmark.extra_info["row"] = f"{bench.BEAM[name].label}, beam {beam}"
    out = _run(benchmark, lambda: bench.BEAM[name].call(x, beam), N)
    bench.check_agreement(x, beam, {name: out})


# Peer decoders, when installed (none is a dependency).
def _peer(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


@_peer("fast_ctc_decode")
@pytest.mark.parametrize("inputs", ["model-1024", "synthetic-C37"])
def test_peer_fast_ctc_decode(benchmark, inputs):
    from fast_ctc_decode import beam_search

    x = _inputs(inputs)
    benchmark.group = f"decode {inputs}"
    benchmark.extra_info["row"] = "fast-ctc-decode, beam 10 (peer, one core)"
    # it takes probabilities, (T, C) per sequence
    probs = [p[:n].contiguous().numpy() for p, n in zip(x.log_probs.exp().transpose(0, 1), x.lengths.tolist())]
    alphabet = ["_"] + x.charset
    out = _run(benchmark, lambda: [beam_search(p, alphabet, beam_size=10, beam_cut_threshold=0.0)[0] for p in probs],
               len(probs))
    assert len(out) == len(probs)


@_peer("pyctcdecode")
@pytest.mark.parametrize("inputs", ["model-1024", "synthetic-C37"])
def test_peer_pyctcdecode(benchmark, inputs):
    from pyctcdecode import build_ctcdecoder

    x = _inputs(inputs)
    benchmark.group = f"decode {inputs}"
    benchmark.extra_info["row"] = "pyctcdecode, beam 10 (peer, one core)"
    decoder = build_ctcdecoder([""] + x.charset)
    logits = [p[:n].contiguous().numpy() for p, n in zip(x.log_probs.transpose(0, 1), x.lengths.tolist())]
    out = _run(benchmark, lambda: [decoder.decode(p, beam_width=10) for p in logits], len(logits))
    assert len(out) == len(logits)


CUDA_ROWS = ["cpp_greedy_strings", "cpp_greedy_labels", "cpp_beam_pruned_strings", "cpp_beam_exact_strings"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("inputs", ["model-1024", "synthetic-C37"])
@pytest.mark.parametrize("name", CUDA_ROWS)
def test_cuda(benchmark, sync, name, inputs):
    """The strings ops on CUDA outputs: tokens decoded on the GPU, strings built on the host."""
    x = _inputs(inputs)
    on_gpu = x._replace(log_probs=x.log_probs.cuda(), lengths=x.lengths.cuda())
    N = x.log_probs.shape[1]
    decoder = bench.DECODERS[name]
    benchmark.group = f"decode {inputs} cuda"
    benchmark.extra_info["row"] = f"{decoder.label}, beam 10, CUDA"

    def run():
        out = decoder.call(on_gpu, 10)
        sync()
        return out

    out = _run(benchmark, run, N)
    bench.check_agreement(x, 10, {name: out})
