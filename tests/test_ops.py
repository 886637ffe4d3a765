"""The C++ ops against the pure-Python references (captcha_fast._reference)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import captcha_fast  # noqa: F401  (registers the ops)
from captcha_fast._reference import greedy_decode_reference, prefix_beam_search
from captcha_fast.testing import random_log_probs

ops = torch.ops.captcha_fast
TOL = 1e-4


def beam_cpp(lp, lens, K, top_k, blank=0, **opt):
    tokens, lengths, scores = ops.ctc_beam_search(
        lp, lens, K, top_k, blank, opt.get("token_min_logp"), opt.get("blank_skip_threshold"),
        opt.get("min_length", 0), opt.get("max_length", -1), opt.get("allowed"))
    out = []
    for n in range(lp.shape[1]):
        out.append([(tuple(tokens[n, k, : lengths[n, k]].tolist()), scores[n, k].item())
                    for k in range(top_k) if scores[n, k].item() > -math.inf])
    return out


def beam_ref(lp, lens, K, top_k, blank=0, **opt):
    allowed = opt.get("allowed")
    return [prefix_beam_search(lp[: lens[n], n].double().tolist(), K, blank, opt.get("token_min_logp"),
                               opt.get("blank_skip_threshold"), opt.get("min_length", 0), opt.get("max_length", -1),
                               None if allowed is None else allowed.tolist())[:top_k]
            for n in range(lp.shape[1])]


def assert_same_hypotheses(got, want, tol=TOL):
    """Same scores rank by rank; same labels except where two scores tie within tol
    (the order of exact ties is an implementation detail)."""
    assert len(got) == len(want), (got, want)
    for k, ((label, score), (ref_label, ref_score)) in enumerate(zip(got, want)):
        assert score == pytest.approx(ref_score, abs=tol, rel=1e-5), (k, got, want)
        tied = any(abs(want[j][1] - ref_score) <= tol for j in (k - 1, k + 1) if 0 <= j < len(want))
        if not tied:
            assert label == ref_label, (k, got, want)


search_options = st.fixed_dictionaries({
    "token_min_logp": st.sampled_from([None, None, -1.0, -3.0, -8.0]),
    "blank_skip_threshold": st.sampled_from([None, None, 0.5, 0.9, 0.999]),
    "min_length": st.sampled_from([0, 0, 1, 3]),
    "max_length": st.sampled_from([-1, -1, 3, 6]),
})


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 16), N=st.integers(1, 4), C=st.integers(1, 8),
       K=st.integers(1, 8), peaky=st.booleans(), options=search_options, data=st.data())
def test_beam_search_matches_reference(seed, T, N, C, K, peaky, options, data):
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    top_k = data.draw(st.integers(1, K), label="top_k")
    if options["max_length"] != -1:
        options["max_length"] = max(options["max_length"], options["min_length"], 1)
    if data.draw(st.booleans(), label="use mask"):
        options["allowed"] = torch.rand(C, generator=g) < 0.7
    lp = random_log_probs(T, N, C, peaky=peaky, blank=blank, generator=g)
    lens = torch.randint(0, T + 1, (N,), generator=g)
    got, want = beam_cpp(lp, lens, K, top_k, blank, **options), beam_ref(lp, lens, K, top_k, blank, **options)
    for n in range(N):
        assert_same_hypotheses(got[n], want[n])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_reads_exactly_the_upcast_values(dtype):
    g = torch.Generator().manual_seed(0)
    lp = random_log_probs(20, 16, 9, generator=g, dtype=dtype)
    lens = torch.randint(0, 21, (16,), generator=g)
    for op, args in [(ops.ctc_greedy_decode, (0,)), (ops.ctc_beam_search, (8, 3, 0))]:
        low, full = op(lp, lens, *args), op(lp.float(), lens, *args)
        for a, b in zip(low, full):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 30), N=st.integers(1, 6), C=st.integers(1, 12),
       peaky=st.booleans(), data=st.data())
def test_greedy_matches_reference(seed, T, N, C, peaky, data):
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    lp = random_log_probs(T, N, C, peaky=peaky, blank=blank, generator=g)
    lens = torch.randint(0, T + 1, (N,), generator=g)
    tokens, lengths, scores = ops.ctc_greedy_decode(lp, lens, blank)
    for n in range(N):
        label, score = greedy_decode_reference(lp[: lens[n], n].double().tolist(), blank)
        assert tuple(tokens[n, : lengths[n]].tolist()) == label
        assert (tokens[n, lengths[n]:] == -1).all()
        assert scores[n].item() == pytest.approx(score, abs=TOL)


def test_greedy_breaks_ties_like_argmax():
    lp = torch.zeros(4, 1, 5).log_softmax(-1)  # all classes tie: class 0 (blank) wins
    lp[1, 0, 3] = lp[1, 0, 2] = 0.0            # 2 and 3 tie: 2 wins
    tokens, lengths, _ = ops.ctc_greedy_decode(lp, torch.tensor([4]), 0)
    assert tokens[0, : lengths[0]].tolist() == [2]


def test_known_label_needs_blank_between_repeats():
    # Frames read a, a, blank, a: the best label is "aa", not "a" nor "aaa".
    p = torch.full((4, 1, 3), 1e-4)
    for t, c in enumerate([1, 1, 0, 1]):
        p[t, 0, c] = 1.0
    lp = (p / p.sum(-1, keepdim=True)).log()
    [[(label, _)]] = beam_cpp(lp, torch.tensor([4]), 4, 1)
    assert label == (1, 1)
    tokens, lengths, _ = ops.ctc_greedy_decode(lp, torch.tensor([4]), 0)
    assert tokens[0, : lengths[0]].tolist() == [1, 1]


def test_beam_merges_alignments_greedy_misses():
    # Best path is blank-blank (p = .36) but "a" sums .4*.6*2 + .4*.4 = .64 over its alignments.
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()[:, None, :]
    [[(label, score)]] = beam_cpp(lp, torch.tensor([2]), 2, 1)
    assert label == (1,) and score == pytest.approx(math.log(0.64), abs=1e-6)
    tokens, lengths, _ = ops.ctc_greedy_decode(lp, torch.tensor([2]), 0)
    assert lengths[0] == 0


def test_pruned_equals_exact_on_peaky_inputs():
    g = torch.Generator().manual_seed(1)
    lp = random_log_probs(50, 200, 37, generator=g)
    lens = torch.full((200,), 50)
    exact = ops.ctc_beam_search(lp, lens, 10, 1, 0)
    pruned = ops.ctc_beam_search(lp, lens, 10, 1, 0, -8.0, 0.999)
    torch.testing.assert_close(pruned[0], exact[0], rtol=0, atol=0)
    # pruning drops alignments of tiny probability: scores move only slightly
    torch.testing.assert_close(pruned[2], exact[2], rtol=0, atol=0.02)


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(2)
    lp = random_log_probs(30, 257, 11, peaky=False, generator=g)
    lens = torch.randint(0, 31, (257,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ops.ctc_beam_search(lp, lens, 8, 4, 0), ops.ctc_greedy_decode(lp, lens, 0)]
        torch.set_num_threads(2)
        two = [ops.ctc_beam_search(lp, lens, 8, 4, 0), ops.ctc_greedy_decode(lp, lens, 0)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_any_layout_is_read_in_place():
    g = torch.Generator().manual_seed(3)
    base = random_log_probs(12, 5, 7, generator=g)
    lens = torch.randint(0, 13, (5,), generator=g)
    views = [base.transpose(0, 1).contiguous().transpose(0, 1),  # (N, T, C) memory
             torch.cat([base, base], 2)[:, :, ::2],               # stride 2 over classes
             base.flip(1).flip(1)]
    want_beam, want_greedy = ops.ctc_beam_search(base, lens, 5, 2, 0), ops.ctc_greedy_decode(base, lens, 0)
    for v in views[:1] + views[2:]:
        for a, b in zip(ops.ctc_beam_search(v, lens, 5, 2, 0), want_beam):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(ops.ctc_greedy_decode(v, lens, 0), want_greedy):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    strided = views[1]
    assert strided.stride(2) == 2
    tokens, _, _ = ops.ctc_beam_search(strided, lens, 5, 2, 0)
    assert tokens.shape == (5, 2, 12)


def test_output_shapes_and_padding():
    lp = random_log_probs(10, 3, 5, generator=torch.Generator().manual_seed(4))
    lens = torch.tensor([10, 0, 4], dtype=torch.int32)
    tokens, lengths, scores = ops.ctc_beam_search(lp, lens, 6, 6, 0, None, None, 0, 3)
    assert tokens.shape == (3, 6, 3) and tokens.dtype == torch.int32
    assert lengths.shape == scores.shape == (3, 6) and scores.dtype == torch.float32
    assert lengths.max() <= 3
    # sequence 1 has no frames: the empty label, probability 1, and nothing else
    assert lengths[1, 0] == 0 and scores[1, 0] == 0 and (scores[1, 1:] == -math.inf).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


def test_min_length_impossible_gives_no_hypothesis():
    lp = random_log_probs(5, 2, 4, generator=torch.Generator().manual_seed(5))
    _, lengths, scores = ops.ctc_beam_search(lp, torch.tensor([5, 2]), 4, 2, 0, None, None, 3)
    assert (lengths[0] >= 3).all() or scores[0, 1] == -math.inf
    assert (scores[1] == -math.inf).all() and (lengths[1] == 0).all()  # 2 frames cannot hold 3 characters


def test_empty_batch():
    lp = torch.empty(7, 0, 5)
    lens = torch.empty(0, dtype=torch.long)
    tokens, lengths, scores = ops.ctc_beam_search(lp, lens, 4, 2, 0)
    assert tokens.shape == (0, 2, 7) and lengths.shape == (0, 2) and scores.shape == (0, 2)
    tokens, lengths, scores = ops.ctc_greedy_decode(lp, lens, 0)
    assert tokens.shape == (0, 7) and lengths.shape == (0,)


LP = torch.randn(6, 2, 5).log_softmax(-1)
LENS = torch.tensor([6, 3])


def _nan():
    x = LP.clone()
    x[2, 1, 3] = float("nan")
    return x


def _posinf():
    x = LP.clone()
    x[0, 0, 0] = float("inf")
    return x


@pytest.mark.parametrize("call, match", [
    (lambda: ops.ctc_beam_search(LP[0], LENS, 4, 1, 0), r"must be 3-D \(T, N, C\).*2-D"),
    (lambda: ops.ctc_greedy_decode(LP.to(torch.int64), LENS, 0), "must be float32.*Long"),
    (lambda: ops.ctc_beam_search(LP, torch.tensor([7, 3]), 4, 1, 0), r"input_lengths\[0\] = 7 is outside \[0, T\]"),
    (lambda: ops.ctc_greedy_decode(LP, torch.tensor([6, -1]), 0), r"input_lengths\[1\] = -1"),
    (lambda: ops.ctc_beam_search(LP, torch.tensor([6]), 4, 1, 0), "one length per sequence"),
    (lambda: ops.ctc_beam_search(LP, LENS.float(), 4, 1, 0), "must be int64 or int32"),
    (lambda: ops.ctc_beam_search(LP, LENS, 0, 1, 0), "beam_width must be in"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 5, 0), r"top_k must be in \[1, beam_width = 4\]"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 0, 0), "top_k must be in"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 5), r"blank must be a class index in \[0, 5\)"),
    (lambda: ops.ctc_greedy_decode(LP, LENS, -1), "blank must be a class index"),
    (lambda: ops.ctc_beam_search(_nan(), LENS, 4, 1, 0), "sequence 1 contain NaN"),
    (lambda: ops.ctc_greedy_decode(_nan(), LENS, 0), "sequence 1 contain NaN"),
    (lambda: ops.ctc_beam_search(_posinf(), LENS, 4, 1, 0), "sequence 0 contain NaN or \\+inf"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, 1.5), "blank_skip_threshold is a probability"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, float("nan")), "token_min_logp is NaN"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, None, -1), "min_length must be >= 0"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, None, 3, 2), "max_length must be -1"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, None, 0, -1, torch.ones(4, dtype=torch.bool)),
     "allowed_tokens must be a 1-D bool mask with one entry per class \\(5\\)"),
    (lambda: ops.ctc_beam_search(torch.empty(3, 2, 0), LENS, 4, 1, 0), r"no classes"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_opcheck():
    lp = random_log_probs(8, 3, 6, generator=torch.Generator().manual_seed(6))
    lens = torch.tensor([8, 5, 0])
    torch.library.opcheck(ops.ctc_greedy_decode.default, (lp, lens, 0))
    torch.library.opcheck(ops.ctc_beam_search.default, (lp, lens, 4, 2, 0, -5.0, 0.99, 1, 6, None))
    torch.library.opcheck(ops.ctc_beam_search.default, (lp, lens, 4, 2, 0, None, None, 0, -1, torch.ones(6, dtype=torch.bool)))


def test_torchscript_and_compile_call_the_ops():
    def decode(lp: torch.Tensor, lens: torch.Tensor):
        tokens, lengths, scores = torch.ops.captcha_fast.ctc_beam_search(lp, lens, 4, 2, 0, -5.0, None, 0, -1, None)
        g_tokens, g_lengths, g_scores = torch.ops.captcha_fast.ctc_greedy_decode(lp, lens, 0)
        return tokens, scores, g_tokens, g_scores

    lp = random_log_probs(8, 3, 6, generator=torch.Generator().manual_seed(7))
    lens = torch.tensor([8, 5, 2])
    want = decode(lp, lens)
    for fn in (torch.jit.script(decode), torch.compile(decode, backend="aot_eager", fullgraph=True)):
        for a, b in zip(fn(lp, lens), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
