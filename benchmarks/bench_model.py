"""End-to-end recognition throughput (uint8 50x200 fresh captchas -> strings) of the shipped
model (captcha_fast/pretrained/default.pt), batch 1, 64, 256:

    (a) baseline: the shipped weights run eagerly (formats.eager_recognizer: an nn.Module, no
        TorchScript) + (c), the fastest pure-Python greedy decoder (captcha_fast.bench)
    (b) the scripted shipped recognizer + C++ greedy
    (c) the scripted shipped recognizer + C++ beam search, beam 10
    (d) (c) with low-precision convolutions (bf16; fp16 on GPUs without bf16)
    (e) (c) with the shipped default precision (amp=None: formats.resolve_dtype)

    pytest --benchmark benchmarks/bench_model.py

    pytest --benchmark --benchmark-disable benchmarks/bench_model.py   # each once: the checks only (CI)

img/s = N / best round (extra_info), also GFLOP/s and the fraction of an estimated CPU peak.
Every variant's strings are checked: (b) against (a)'s (all of them in float32 on the CPU);
(c)-(e) against the exact beam search over their own log-probs (the pruning changes no top-1),
and, where the convolutions run in low precision, against float32 on LOW_PRECISION_AGREEMENT
of the images."""
import pytest
import torch

from captcha_fast import api, bench, formats
from captcha_fast.machine import native_bf16

Ns = [1, 64, 256]
LOW_PRECISION_AGREEMENT = 0.95
"""Share of images whose top-1 in bf16/fp16 must equal float32's (measured 0.988 at N = 256 on an
AVX-512 BF16 EPYC; bf16 reads our held-out sets within 0.3 points of fp32's accuracy)."""
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _config():
    return formats.config_of(bench.shipped_model())


def _run(benchmark, fn, N, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        out = fn()
        sync()
        return out

    rounds = {1: 10, 64: 3, 256: 2}[N]
    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable: run once, nothing measured
        return out
    best = benchmark.stats.stats.min
    cfg = _config()
    flops = bench.flops_per_image(cfg, round(200 * cfg.height / 50))  # a 50 x 200 image at the model's height
    gflops = N * flops / best / 1e9
    benchmark.extra_info.update(img_per_s=N / best, gflop_per_s=gflops, flops_per_image=flops)
    if device == "cpu":
        benchmark.extra_info["fraction_of_peak"] = gflops / bench.cpu_peak_gflops()
    return out


def _exact_top1(images, rec=None):
    """Top-1 of the exact beam search over the log-probs of `rec` (default: the shipped model, float32)."""
    rec = rec if rec is not None else bench.shipped_model()
    with torch.no_grad():
        lp, lengths = rec.log_probs(*rec.preprocess(images))
    texts, _ = torch.ops.captcha_fast.ctc_beam_search_strings(lp, lengths, list(rec.charset), 10, 1, 0)
    return [t[0] for t in texts]


@pytest.mark.parametrize("N", Ns)
def test_a_eager_python_greedy(benchmark, N):
    benchmark.group = f"model N={N} cpu"
    benchmark.extra_info["row"] = "(a) eager shipped model + (c) Python greedy — baseline"
    images, _ = bench.captcha_images(N)
    texts = _run(benchmark, lambda: bench.eager_baseline(images), N, "cpu")
    scripted = bench.shipped_model().recognize(images, "greedy", 1, 1)[0]
    assert texts == [t[0] for t in scripted]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["b_greedy", "c_beam10", "d_beam10_lowp", "e_beam10_default"])
@pytest.mark.parametrize("N", Ns)
def test_scripted(benchmark, N, variant, device):
    benchmark.group = f"model N={N} {device}"
    dtype = {"b_greedy": "float32", "c_beam10": "float32", "d_beam10_lowp": "low", "e_beam10_default": None}[variant]
    if dtype == "low":
        if device == "cpu" and not native_bf16("cpu"):
            pytest.skip("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 convs measured ~25x slower "
                        "than fp32 on an AVX2 EPYC, so captcha_fast keeps fp32 on it (amp=None)")
        dtype = torch.float16 if device == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    benchmark.extra_info["row"] = f"({variant[0]}) scripted shipped model, {variant[2:]}, {device}"
    rec = formats.load_recognizer(api.DEFAULT_MODEL, device=device, dtype=dtype)
    images, _ = bench.captcha_images(N)
    on_device = [i.to(device) for i in images]
    decoder, beam = ("greedy", 1) if variant == "b_greedy" else ("beam", 10)
    texts, _ = _run(benchmark, lambda: rec.recognize(on_device, decoder, beam, 1), N, device)
    texts = [t[0] for t in texts]
    if variant == "b_greedy":  # float32: the eager CPU baseline's strings (CUDA's float32 kernels differ a little)
        agree = sum(a == b for a, b in zip(texts, bench.eager_baseline(images))) / N
        assert agree >= (1.0 if device == "cpu" else LOW_PRECISION_AGREEMENT), agree
        return
    assert texts == _exact_top1(on_device, rec)  # the pruned search finds the exact top-1 in any precision
    if formats.resolve_dtype(dtype, torch.device(device)) != torch.float32 and N >= 64:
        agree = sum(a == b for a, b in zip(texts, _exact_top1(images))) / N
        benchmark.extra_info["agreement_with_float32"] = agree
        assert agree >= LOW_PRECISION_AGREEMENT, agree
