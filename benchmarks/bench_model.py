"""End-to-end recognition throughput (uint8 50x200 fresh captchas -> strings) of the shipped
model (captcha_fast/pretrained/default.pt), batch 1, 64, 256:

    (a) baseline: the shipped weights run eagerly (export.eager_recognizer: an nn.Module, no
        TorchScript) + (c), the fastest pure-Python greedy decoder (captcha_fast.bench)
    (b) the scripted shipped recognizer + C++ greedy
    (c) the scripted shipped recognizer + C++ beam search, beam 10
    (d) (c) with low-precision convolutions (bf16; fp16 on GPUs without bf16)
    (e) (c) with the shipped default precision (amp=None: export.resolve_dtype)

    pytest --benchmark benchmarks/bench_model.py

img/s = N / best round (extra_info), also GFLOP/s and the fraction of an estimated CPU peak.
Every variant's strings are checked: (b) against (a)'s, (c)-(e) against the exact beam search
on the eager model's log-probs (all of them in float32 on the CPU, 90% in low precision)."""
import pytest
import torch

from captcha_fast import api, bench, export

Ns = [1, 64, 256]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _config():
    return export.config_of(bench.shipped_model())


def _run(benchmark, fn, N, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        out = fn()
        sync()
        return out

    rounds = {1: 10, 64: 3, 256: 2}[N]
    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    cfg = _config()
    flops = bench.flops_per_image(cfg, round(200 * cfg.height / 50))  # a 50 x 200 image at the model's height
    gflops = N * flops / best / 1e9
    benchmark.extra_info.update(img_per_s=N / best, gflop_per_s=gflops, flops_per_image=flops)
    if device == "cpu":
        benchmark.extra_info["fraction_of_peak"] = gflops / bench.cpu_peak_gflops()
    return out


def _exact_top1(images):
    """Top-1 of the exact beam search over the eager model's log-probs."""
    rec = bench.shipped_model()
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
        if device == "cpu" and not bench.cpu_has_native_bf16():
            pytest.skip("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 convs measured ~25x slower "
                        "than fp32 on an AVX2 EPYC, so captcha_fast keeps fp32 on it (amp=None)")
        dtype = torch.float16 if device == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    benchmark.extra_info["row"] = f"({variant[0]}) scripted shipped model, {variant[2:]}, {device}"
    rec = export.load_recognizer(api.DEFAULT_MODEL, device=device, dtype=dtype)
    images, _ = bench.captcha_images(N)
    on_device = [i.to(device) for i in images]
    decoder, beam = ("greedy", 1) if variant == "b_greedy" else ("beam", 10)
    texts, _ = _run(benchmark, lambda: rec.recognize(on_device, decoder, beam, 1), N, device)
    texts = [t[0] for t in texts]
    want = bench.eager_baseline(images) if variant == "b_greedy" else _exact_top1(images)
    agree = sum(a == b for a, b in zip(texts, want)) / N
    assert agree >= (1.0 if dtype in ("float32", None) and device == "cpu" else 0.9), agree
