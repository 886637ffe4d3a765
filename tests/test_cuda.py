"""CUDA kernels of the CTC decoding ops against the CPU kernels.

The CPU kernels are checked against the pure-Python reference elsewhere; here
CUDA must give the same tokens, lengths and scores bit for bit: both run the
core (csrc/ctc_decode.h) with the same operations in the same order, and nvcc
is told not to contract a*b+c into FMA (--fmad=false in setup.py), which the
host compiler does not do either, so every product rounds alike.
Skipped without a GPU. tools/check_cuda.sh checks, without a GPU, that the
CUDA kernels compile and register."""
from __future__ import annotations

import math
from typing import List

import pytest
import torch

import captcha_fast

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(
        not captcha_fast.CUDA_KERNELS,
        reason="captcha_fast was built without CUDA kernels (rebuild with FORCE_CUDA=1 in a CUDA torch)",
    ),
]

ops = torch.ops.captcha_fast
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def log_probs(T: int, N: int, C: int, seed: int, dtype: torch.dtype = torch.float32, peaky: bool = True) -> torch.Tensor:
    """(T, N, C) log-softmax; peaky looks like a trained model (mostly blank, confident frames)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=g) * 1.5
    if peaky:
        target = torch.randint(0, C, (T, N, 1), generator=g)
        target[torch.rand(T, N, 1, generator=g) < 0.5] = 0
        logits.scatter_add_(2, target, torch.full((T, N, 1), 6.0))
    return logits.log_softmax(-1).to(dtype)


def mixed_lengths(T: int, N: int, seed: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    lengths[0] = T
    if N > 1:
        lengths[1] = 0
    return lengths.to(dtype)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x (T, N, C), on the GPU, in another memory layout."""
    T, N, C = x.shape
    if kind == "contiguous":
        return x.cuda()
    if kind == "batch_first":  # (N, T, C) storage seen as (T, N, C)
        return x.transpose(0, 1).contiguous().cuda().transpose(0, 1)
    if kind == "strided":  # every other sequence, classes with a stride, an offset
        big = torch.full((T, 2 * N + 1, C, 2), float("nan"), dtype=x.dtype)
        big[:, 1::2, :, 1] = x
        return big.cuda()[:, 1::2, :, 1]
    raise ValueError(kind)


def assert_same(cpu, gpu):
    tokens, lengths, scores = (t.cpu() for t in gpu)
    assert tokens.dtype == torch.int32 and lengths.dtype == torch.int32 and scores.dtype == torch.float32
    assert torch.equal(lengths, cpu[1])
    assert torch.equal(tokens, cpu[0])
    torch.testing.assert_close(scores, cpu[2], atol=0, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "batch_first", "strided"])
@pytest.mark.parametrize("C", [5, 37, 100])  # fewer classes than a warp, one and a bit, several
def test_greedy_matches_cpu(dtype, kind, C):
    T, N = 40, 33
    lp = log_probs(T, N, C, seed=C, dtype=dtype)
    lengths = mixed_lengths(T, N, seed=C)
    gpu = ops.ctc_greedy_decode(layout(lp, kind), lengths.cuda())
    assert_same(ops.ctc_greedy_decode(lp, lengths), gpu)


def test_greedy_ties_and_neg_inf_match_cpu():
    # Coarse values make argmax ties common (lowest index must win); -inf
    # classes and whole -inf frames are valid (probability 0).
    T, N, C = 30, 64, 40
    g = torch.Generator().manual_seed(3)
    lp = (torch.randint(-4, 1, (T, N, C), generator=g) * 0.5).float()
    lp[torch.rand(T, N, C, generator=g) < 0.3] = -math.inf
    lp[5, :8] = -math.inf
    lengths = mixed_lengths(T, N, seed=3, dtype=torch.int32)
    for blank in (0, 7):
        assert_same(ops.ctc_greedy_decode(lp, lengths, blank),
                    ops.ctc_greedy_decode(lp.cuda(), lengths.cuda(), blank))


# ---------------------------------------------------------------------------
# Beam search

BEAM_OPTIONS = {
    "default": dict(beam_width=10),
    "beam1": dict(beam_width=1),
    "top_k": dict(beam_width=12, top_k=4),
    "pruned": dict(beam_width=8, top_k=2, token_min_logp=-6.0, blank_skip_threshold=0.95),
    "min_max_length": dict(beam_width=6, top_k=3, min_length=2, max_length=5),
    "blank_last": dict(beam_width=5, top_k=2, blank=36),
}


@pytest.mark.parametrize("name", list(BEAM_OPTIONS))
@pytest.mark.parametrize("peaky", [True, False], ids=["peaky", "flat"])
def test_beam_matches_cpu(name, peaky):
    T, N, C = 30, 33, 37
    lp = log_probs(T, N, C, seed=11, peaky=peaky)
    lengths = mixed_lengths(T, N, seed=11)
    kw = BEAM_OPTIONS[name]
    assert_same(ops.ctc_beam_search(lp, lengths, **kw), ops.ctc_beam_search(lp.cuda(), lengths.cuda(), **kw))


def test_beam_allowed_mask_matches_cpu():
    T, N, C = 25, 20, 37
    lp = log_probs(T, N, C, seed=5)
    lengths = mixed_lengths(T, N, seed=5, dtype=torch.int32)
    allowed = torch.arange(C) % 3 != 1
    cpu = ops.ctc_beam_search(lp, lengths, 8, 3, allowed_tokens=allowed)
    assert_same(cpu, ops.ctc_beam_search(lp.cuda(), lengths.cuda(), 8, 3, allowed_tokens=allowed.cuda()))
    # A strided view of the mask is read in place.
    strided = torch.stack([allowed, ~allowed], 1).cuda()[:, 0]
    assert_same(cpu, ops.ctc_beam_search(lp.cuda(), lengths.cuda(), 8, 3, allowed_tokens=strided))
    produced = cpu[0][cpu[0] >= 0]
    assert produced.numel() > 0 and allowed[produced.long()].all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "batch_first", "strided"])
def test_beam_dtypes_and_layouts_match_cpu(dtype, kind):
    T, N, C = 20, 17, 12
    lp = log_probs(T, N, C, seed=2, dtype=dtype)
    lengths = mixed_lengths(T, N, seed=2)
    cpu = ops.ctc_beam_search(lp, lengths, 6, 2)
    assert_same(cpu, ops.ctc_beam_search(layout(lp, kind), lengths.cuda(), 6, 2))


def test_beam_large_batch_matches_cpu():
    T, N, C = 30, 700, 20
    lp = log_probs(T, N, C, seed=9)
    lengths = mixed_lengths(T, N, seed=9)
    assert_same(ops.ctc_beam_search(lp, lengths, 4, 2), ops.ctc_beam_search(lp.cuda(), lengths.cuda(), 4, 2))


# ---------------------------------------------------------------------------
# Shapes, streams, devices


def test_empty_batch_and_empty_frames():
    for T, N in ((10, 0), (0, 3)):
        lp = torch.zeros(T, N, 5, device="cuda").log_softmax(-1)
        lengths = torch.zeros(N, dtype=torch.long, device="cuda")
        cpu_lp, cpu_len = lp.cpu(), lengths.cpu()
        assert_same(ops.ctc_greedy_decode(cpu_lp, cpu_len), ops.ctc_greedy_decode(lp, lengths))
        assert_same(ops.ctc_beam_search(cpu_lp, cpu_len, 4, 2), ops.ctc_beam_search(lp, lengths, 4, 2))
        out = ops.ctc_beam_search(lp, lengths, 4, 2, max_length=3)
        assert out[0].shape == (N, 2, min(T, 3)) and all(t.is_cuda for t in out)


def test_non_default_stream():
    T, N, C = 30, 50, 37
    lp, lengths = log_probs(T, N, C, seed=4), mixed_lengths(T, N, seed=4)
    cpu_greedy = ops.ctc_greedy_decode(lp, lengths)
    cpu_beam = ops.ctc_beam_search(lp, lengths, 8, 2)
    lp_base, len_base = lp.cuda(), lengths.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # The inputs are written on this stream only after a long sleep: an op
        # that launched on the default stream would read them unwritten.
        torch.cuda._sleep(50_000_000)
        lp_gpu, len_gpu = lp_base.clone(), len_base.clone()
        greedy = ops.ctc_greedy_decode(lp_gpu, len_gpu)
        beam = ops.ctc_beam_search(lp_gpu, len_gpu, 8, 2)
        greedy = [t.to("cpu", non_blocking=True) for t in greedy]
        beam = [t.to("cpu", non_blocking=True) for t in beam]
    stream.synchronize()
    assert_same(cpu_greedy, greedy)
    assert_same(cpu_beam, beam)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    T, N, C = 20, 9, 11
    lp, lengths = log_probs(T, N, C, seed=6), mixed_lengths(T, N, seed=6)
    out = ops.ctc_beam_search(lp.to("cuda:1"), lengths.to("cuda:1"), 5, 2)
    assert all(t.device == torch.device("cuda:1") for t in out)
    assert_same(ops.ctc_beam_search(lp, lengths, 5, 2), out)


# ---------------------------------------------------------------------------
# Bad input: flagged per sequence (NaN scores, length 0, tokens -1), no sync.


def _flagged(out, bad):
    tokens, lengths, scores = (t.cpu() for t in out)
    assert scores[bad].isnan().all()
    assert (lengths[bad] == 0).all()
    assert (tokens[bad] == -1).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_values_flag_the_sequence(value):
    T, N, C = 20, 6, 9
    lp, lengths = log_probs(T, N, C, seed=8), torch.full((N,), T)
    lengths[4] = 10
    bad_lp = lp.clone()
    bad_lp[3, 2, 4] = value   # inside sequence 2
    bad_lp[15, 4, 1] = value  # after the end of sequence 4: not read, not bad
    good = [0, 1, 3, 4, 5]
    for op, args in ((ops.ctc_greedy_decode, ()), (ops.ctc_beam_search, (5, 2))):
        with pytest.raises(RuntimeError, match="sequence 2 contain NaN or"):
            op(bad_lp, lengths, *args)  # the CPU raises
        out = op(bad_lp.cuda(), lengths.cuda(), *args)
        _flagged(out, [2])
        cpu = op(lp, lengths, *args)
        assert_same([t[good] for t in cpu], [t[good] for t in out])


@pytest.mark.parametrize("bad_length", [-1, 21, 2**40])
def test_out_of_range_length_flags_the_sequence(bad_length):
    T, N, C = 20, 5, 9
    lp = log_probs(T, N, C, seed=10)
    lengths = torch.tensor([20, 7, 0, 13, 20])
    bad = lengths.clone()
    bad[3] = bad_length
    good = [0, 1, 2, 4]
    for op, args in ((ops.ctc_greedy_decode, ()), (ops.ctc_beam_search, (5, 3))):
        with pytest.raises(RuntimeError, match=r"input_lengths\[3\]"):
            op(lp, bad, *args)  # the CPU raises
        out = op(lp.cuda(), bad.cuda(), *args)
        _flagged(out, [3])
        cpu = op(lp, lengths, *args)
        assert_same([t[good] for t in cpu], [t[good] for t in out])


def test_checks_are_shared_with_cpu():
    lp = log_probs(10, 2, 5, seed=0).cuda()
    with pytest.raises(RuntimeError, match="same device"):
        ops.ctc_greedy_decode(lp, torch.tensor([10, 10]))
    with pytest.raises(RuntimeError, match="beam_width"):
        ops.ctc_beam_search(lp, torch.tensor([10, 10], device="cuda"), 0)
    with pytest.raises(RuntimeError, match="allowed_tokens must be on"):
        ops.ctc_beam_search(lp, torch.tensor([10, 10], device="cuda"), allowed_tokens=torch.ones(5, dtype=torch.bool))


def test_sizes_past_int32_are_refused_before_allocating():
    # One frame expanded over 2^20 + 1 frames: a trie of 1 + T x 4096 nodes (past 2^32) is
    # refused by the shared check, with the CPU's sentence, before any GPU memory is taken.
    lp = torch.zeros(1, 1, 3, device="cuda").log_softmax(-1).expand(1_048_577, 1, 3)
    lengths = torch.tensor([1_048_577], device="cuda")
    match = r"T = 1048577 frames x beam_width 4096 needs a .* above the limit of 4.0 GiB"
    with pytest.raises(RuntimeError, match=match):
        ops.ctc_beam_search(lp, lengths, 4096)
    with pytest.raises(RuntimeError, match=match):
        ops.ctc_beam_search_strings(lp, lengths, ["a", "b"], 4096)
    # Within the limit, the same stride-0 input decodes as on the CPU.
    assert_same(ops.ctc_beam_search(lp.cpu(), lengths.cpu(), 2), ops.ctc_beam_search(lp, lengths, 2))


def test_scripted_call_runs_on_cuda():
    @torch.jit.script
    def decode(lp: torch.Tensor, lengths: torch.Tensor):
        return torch.ops.captcha_fast.ctc_beam_search(lp, lengths, 4, 1)

    lp, lengths = log_probs(15, 4, 7, seed=12), torch.tensor([15, 3, 0, 9])
    assert_same(ops.ctc_beam_search(lp, lengths, 4, 1), decode(lp.cuda(), lengths.cuda()))


# ---------------------------------------------------------------------------
# The strings ops: tokens decoded on the GPU, strings built on the host.

CHARSET = [f"s{c}" for c in range(1, 37)]  # 36 symbols of two characters: class c is CHARSET[c - 1]


@pytest.mark.parametrize("kind", ["contiguous", "batch_first", "strided"])
def test_strings_match_cpu(kind):
    T, N, C = 30, 33, 37
    lp = log_probs(T, N, C, seed=13)
    lengths = mixed_lengths(T, N, seed=13)
    gpu_lp, gpu_len = layout(lp, kind), lengths.cuda()
    texts, scores = ops.ctc_greedy_decode_strings(gpu_lp, gpu_len, CHARSET)
    want_texts, want_scores = ops.ctc_greedy_decode_strings(lp, lengths, CHARSET)
    assert texts == want_texts and torch.equal(scores, want_scores) and scores.device.type == "cpu"
    for kw in BEAM_OPTIONS.values():
        texts, scores = ops.ctc_beam_search_strings(gpu_lp, gpu_len, CHARSET, **kw)
        want_texts, want_scores = ops.ctc_beam_search_strings(lp, lengths, CHARSET, **kw)
        assert texts == want_texts and scores.device.type == "cpu"
        torch.testing.assert_close(scores, want_scores, atol=0, rtol=0)


def test_strings_scripted_on_cuda():
    @torch.jit.script
    def decode(lp: torch.Tensor, lengths: torch.Tensor, charset: List[str]):
        return torch.ops.captcha_fast.ctc_beam_search_strings(lp, lengths, charset, 8, 2)

    lp, lengths = log_probs(15, 4, 37, seed=14), torch.tensor([15, 3, 0, 9])
    assert decode(lp.cuda(), lengths.cuda(), CHARSET)[0] == decode(lp, lengths, CHARSET)[0]


@pytest.mark.parametrize("op, args", [(ops.ctc_greedy_decode_strings, ()), (ops.ctc_beam_search_strings, (5, 2))])
def test_strings_raise_as_on_cpu(op, args):
    # The tensor ops flag these sequences on CUDA; the strings ops wait for the result anyway,
    # so they raise the CPU's errors.
    T, N, C = 20, 6, 37
    lp, lengths = log_probs(T, N, C, seed=8), torch.full((N,), T)
    bad_lp = lp.clone()
    bad_lp[3, 2, 4] = float("nan")
    with pytest.raises(RuntimeError, match="sequence 2 contain NaN or"):
        op(bad_lp.cuda(), lengths.cuda(), CHARSET, *args)
    bad_lengths = lengths.clone()
    bad_lengths[4] = T + 1
    with pytest.raises(RuntimeError, match=r"input_lengths\[4\] = 21 is outside \[0, T\]"):
        op(lp.cuda(), bad_lengths.cuda(), CHARSET, *args)
