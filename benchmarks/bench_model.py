"""End-to-end recognition throughput (uint8 50x200 captchas -> strings), batch 1, 64, 256:

    (a) baseline: eager fp32 CRNN + captcha_fast.bench.greedy_decode_python
    (b) scripted Recognizer (folded BN, channels-last, chunked) + C++ greedy
    (c) scripted Recognizer + C++ beam search, beam 10
    (d) (c) with low-precision convolutions (bf16; fp16 on GPUs without bf16)
    (e) (c) with the shipped default precision (amp=None: fp32 on CPU, bf16/fp16 on CUDA)

    pytest --benchmark benchmarks/bench_model.py

img/s = N / best round (extra_info), also GFLOP/s and the fraction of an estimated CPU peak.
The model is the shipped pretrained one when present, else a random default CRNNConfig model.
Every variant's strings are checked against the baseline's (greedy) or decode.beam_search's."""
from functools import lru_cache

import pytest
import torch

from captcha_fast import api, decode, export
from captcha_fast.bench import captcha_images, cpu_peak_gflops, flops_per_image, greedy_decode_python
from captcha_fast.charset import Charset
from captcha_fast.model import CRNN, CRNNConfig
from captcha_fast.preprocess import collate

Ns = [1, 64, 256]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@lru_cache(maxsize=None)
def _model() -> CRNN:
    if api.DEFAULT_MODEL.is_file():
        rec = export.load_recognizer(api.DEFAULT_MODEL, freeze=False)
        cfg = export.config_of(rec)
        torch.manual_seed(0)
        return CRNN(cfg).eval()  # same architecture; weights do not change the speed
    torch.manual_seed(0)
    m = CRNN(CRNNConfig("2345678bcdefgmnpwxy")).eval()
    m.classifier.weight.data *= 8  # confident outputs, as a trained model's
    return m


@lru_cache(maxsize=None)
def _saved(tmp: str):
    return export.save_recognizer(_model(), f"{tmp}/bench_model.pt")


@lru_cache(maxsize=None)
def _images(N: int):
    return captcha_images(N)


def _baseline(images):
    m = _model()
    cfg = m.config
    with torch.no_grad():
        batch, widths = collate(images, cfg.height, cfg.in_channels)
        lp, lengths = m(batch, widths)
    return greedy_decode_python(lp, lengths, Charset(cfg.charset)), lp, lengths


def _run(benchmark, fn, N, device, cfg):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        out = fn()
        sync()
        return out

    rounds = {1: 10, 64: 3, 256: 2}[N]
    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    flops = flops_per_image(cfg, round(200 * cfg.height / 50))  # a 50 x 200 image at the model's height
    gflops = N * flops / best / 1e9
    benchmark.extra_info.update(img_per_s=N / best, gflop_per_s=gflops, flops_per_image=flops)
    if device == "cpu":
        benchmark.extra_info["fraction_of_peak"] = gflops / cpu_peak_gflops()
    return out


@pytest.mark.parametrize("N", Ns)
def test_a_eager_python_greedy(benchmark, N):
    benchmark.group = f"model N={N} cpu"
    imgs = _images(N)
    texts = _run(benchmark, lambda: _baseline(imgs)[0], N, "cpu", _model().config)
    assert len(texts) == N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["b_greedy", "c_beam10", "d_beam10_lowp", "e_beam10_default"])
@pytest.mark.parametrize("N", Ns)
def test_scripted(benchmark, tmp_path_factory, N, variant, device):
    benchmark.group = f"model N={N} {device}"
    dtype = {"b_greedy": "float32", "c_beam10": "float32", "d_beam10_lowp": "low", "e_beam10_default": None}[variant]
    if dtype == "low":
        if device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pytest.skip("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 convs measured ~25x slower "
                        "than fp32 on an AVX2 EPYC, so captcha_fast keeps fp32 on it (amp=None)")
        dtype = torch.float16 if device == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    rec = export.load_recognizer(_saved(str(tmp_path_factory.getbasetemp())), device=device, dtype=dtype)
    imgs = [i.to(device) for i in _images(N)]
    decoder, beam = ("greedy", 1) if variant == "b_greedy" else ("beam", 10)
    texts, _ = _run(benchmark, lambda: rec.recognize(imgs, decoder, beam, 1), N, device, _model().config)
    texts = [t[0] for t in texts]
    want, lp, lengths = _baseline(_images(N))
    if variant == "b_greedy":
        assert texts == want
    else:
        exact = decode.beam_search(lp, lengths, Charset(_model().config.charset), 10)
        agree = sum(a == b for a, b in zip(texts, exact)) / N
        assert agree >= (1.0 if dtype in ("float32", None) and device == "cpu" else 0.9), agree
