"""The C++ ops against the pure-Python references (captcha_fast._reference)."""
import functools
import math
from typing import List

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings, strategies as st

import captcha_fast  # noqa: F401  (registers the ops)
from captcha_fast._reference import greedy_decode_reference, prefix_beam_search
from captcha_fast.testing import random_log_probs

ops = torch.ops.captcha_fast
TOL = 1e-4


def beam_cpp(lp, lens, K, top_k, blank=0, certify=False, **opt):
    """The op's hypotheses as (label, score) lists; by default the search itself (no
    certificate), which is what the reference implements."""
    tokens, lengths, scores = ops.ctc_beam_search(
        lp, lens, K, top_k, blank, opt.get("token_min_logp"), opt.get("blank_skip_threshold"),
        opt.get("min_length", 0), opt.get("max_length", -1), opt.get("allowed"), certify)
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


def test_autocast_changes_nothing():
    # The ops read any float dtype and sum in double, so they have no autocast kernel:
    # under autocast they see the tensors they are given.
    g = torch.Generator().manual_seed(8)
    lp = random_log_probs(20, 6, 9, generator=g)
    lens = torch.randint(0, 21, (6,), generator=g)
    calls = [lambda x: ops.ctc_greedy_decode(x, lens, 0), lambda x: ops.ctc_beam_search(x, lens, 8, 3, 0)]
    for call in calls:
        want = call(lp)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                got = call(lp)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        texts, _ = ops.ctc_beam_search_strings(lp.bfloat16(), lens, list("abcdefgh"), 8)
    assert texts == ops.ctc_beam_search_strings(lp.bfloat16().float(), lens, list("abcdefgh"), 8)[0]


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
    for a, b in zip(ops.ctc_beam_search(strided, lens, 5, 2, 0), ops.ctc_beam_search(strided.contiguous(), lens, 5, 2, 0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ops.ctc_greedy_decode(strided, lens, 0), ops.ctc_greedy_decode(strided.contiguous(), lens, 0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
    assert ((lengths[0] >= 3) | (scores[0] == -math.inf)).all() and scores[0, 0] > -math.inf
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
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, None, -1), r"min_length must be in \[0, 4096\]"),
    (lambda: ops.ctc_beam_search(LP, LENS, 4, 1, 0, None, None, 2**62), r"min_length must be in \[0, 4096\]"),
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


# ---------------------------------------------------------------------------- the strings ops

# Symbols of several characters, non-ASCII ones, and one that is a prefix of another: strings
# are concatenated bytes, whatever the symbols.
SYMBOL_POOL = ["a", "b", "7", "é", "ab", "Ωx", "中", "th", "-", "zz", "0", "β"]


def label_text(label, charset, blank):
    return "".join(charset[c if c < blank else c - 1] for c in label)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 14), N=st.integers(1, 4), C=st.integers(1, 8),
       K=st.integers(1, 8), peaky=st.booleans(), options=search_options, data=st.data())
def test_beam_strings_are_the_reference_labels(seed, T, N, C, K, peaky, options, data):
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    top_k = data.draw(st.integers(1, K), label="top_k")
    charset = data.draw(st.lists(st.sampled_from(SYMBOL_POOL), min_size=C - 1, max_size=C - 1), label="charset")
    if options["max_length"] != -1:
        options["max_length"] = max(options["max_length"], options["min_length"], 1)
    lp = random_log_probs(T, N, C, peaky=peaky, blank=blank, generator=g)
    lens = torch.randint(0, T + 1, (N,), generator=g)
    texts, scores = ops.ctc_beam_search_strings(
        lp, lens, charset, K, top_k, blank, options["token_min_logp"], options["blank_skip_threshold"],
        options["min_length"], options["max_length"], None, False)
    assert len(texts) == N and all(len(t) == top_k for t in texts)
    assert scores.shape == (N, top_k) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    # The same search as the tokens op, bit for bit...
    tokens, lengths, token_scores = ops.ctc_beam_search(
        lp, lens, K, top_k, blank, options["token_min_logp"], options["blank_skip_threshold"],
        options["min_length"], options["max_length"], None, False)
    assert torch.equal(scores, token_scores)
    for n in range(N):
        for k in range(top_k):
            assert texts[n][k] == label_text(tokens[n, k, : lengths[n, k]].tolist(), charset, blank)
    # ...and the reference's labels: missing hypotheses are "" with score -inf.
    want = beam_ref(lp, lens, K, top_k, blank, **options)
    for n in range(N):
        got = [(texts[n][k], scores[n, k].item()) for k in range(top_k)]
        assert all(t == "" for t, s in got[len(want[n]):]) and all(s == -math.inf for t, s in got[len(want[n]):])
        ref = [(label_text(label, charset, blank), s) for label, s in want[n]]
        assert_same_hypotheses(got[: len(want[n])], ref)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 30), N=st.integers(1, 6), C=st.integers(1, 12),
       peaky=st.booleans(), data=st.data())
def test_greedy_strings_are_the_reference_labels(seed, T, N, C, peaky, data):
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    charset = data.draw(st.lists(st.sampled_from(SYMBOL_POOL), min_size=C - 1, max_size=C - 1), label="charset")
    lp = random_log_probs(T, N, C, peaky=peaky, blank=blank, generator=g)
    lens = torch.randint(0, T + 1, (N,), generator=g).to(torch.int32)
    texts, scores = ops.ctc_greedy_decode_strings(lp, lens, charset, blank)
    packed, label_scores = ops.ctc_greedy_decode_labels(lp, lens, charset, blank)
    assert scores.shape == (N, 1) and scores.dtype == torch.float32
    assert label_scores.shape == (N,) and label_scores.dtype == torch.float32
    want = [greedy_decode_reference(lp[: lens[n], n].double().tolist(), blank) for n in range(N)]
    assert packed == "".join(label_text(label, charset, blank) + "\0" for label, _ in want)  # each ended by a NUL
    for n, (label, score) in enumerate(want):
        assert texts[n] == [label_text(label, charset, blank)]
        assert scores[n, 0].item() == pytest.approx(score, abs=TOL)
        assert label_scores[n].item() == scores[n, 0].item()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 20), N=st.integers(1, 5), C=st.integers(2, 9),
       K=st.integers(1, 6), certify=st.booleans(), options=search_options, data=st.data())
def test_beam_labels_are_the_strings_ops_top1(seed, T, N, C, K, certify, options, data):
    g = torch.Generator().manual_seed(seed)
    charset = data.draw(st.lists(st.sampled_from(SYMBOL_POOL), min_size=C - 1, max_size=C - 1), label="charset")
    if options["max_length"] != -1:
        options["max_length"] = max(options["max_length"], options["min_length"], 1)
    allowed = torch.rand(C, generator=g) < 0.8 if data.draw(st.booleans(), label="use mask") else None
    lp = random_log_probs(T, N, C, peaky=bool(seed % 2), generator=g)
    lens = torch.randint(0, T + 1, (N,), generator=g)
    args = (K, 0, options["token_min_logp"], options["blank_skip_threshold"], options["min_length"],
            options["max_length"], allowed, certify)
    texts, scores = ops.ctc_beam_search_strings(lp, lens, charset, args[0], 1, *args[1:])
    packed, label_scores = ops.ctc_beam_search_labels(lp, lens, charset, *args)
    assert packed == "".join(t[0] + "\0" for t in texts)
    assert label_scores.shape == (N,) and torch.equal(label_scores, scores[:, 0])


def test_strings_of_repeats_and_empty_labels():
    # frames: a a _ a | _ _ _ _ | b b b b  ->  "aa", "", "b"
    lp = torch.full((4, 3, 3), -20.0)
    for n, path in enumerate([[1, 1, 0, 1], [0, 0, 0, 0], [2, 2, 2, 2]]):
        for t, c in enumerate(path):
            lp[t, n, c] = 0.0
    lens = torch.tensor([4, 4, 4])
    charset = ["x", "yz"]
    assert ops.ctc_greedy_decode_strings(lp, lens, charset)[0] == [["xx"], [""], ["yz"]]
    assert ops.ctc_greedy_decode_labels(lp, lens, charset)[0] == "xx\0\0yz\0"  # each label ended by a NUL
    texts, scores = ops.ctc_beam_search_strings(lp, lens, charset, 4, 3)
    assert [t[0] for t in texts] == ["xx", "", "yz"]
    assert scores[1, 0] > -1e-3  # "" is certain


def test_long_sequences_accumulate_in_double():
    # T = 5000 identical frames: a float32 running sum drifts by ~0.1 here (a peer's T = 5000
    # case read -2599.25 for float64's -2599.302); the ops sum in double, so both the best
    # path and the beam's label probability match the float64 references to float32 precision.
    T = 5000
    lp = torch.tensor([1.0, 0.2, 0.1]).log_softmax(-1).expand(T, 1, 3).contiguous()
    lens = torch.tensor([T])
    frames = lp[:, 0].double().tolist()
    _, best_path = greedy_decode_reference(frames)
    float32_sum = torch.zeros((), dtype=torch.float32)
    for row in lp[:, 0]:
        float32_sum += row.max()
    assert abs(float32_sum.item() - best_path) > 0.05  # the drift is real for this input
    assert ops.ctc_greedy_decode(lp, lens, 0)[2][0].item() == pytest.approx(best_path, abs=1e-3)
    ref_label, ref_score = prefix_beam_search(frames, 3)[0]
    [[(label, score)]] = beam_cpp(lp, lens, 3, 1)
    assert len(ref_label) == 1000 and label == ref_label
    assert score == pytest.approx(ref_score, abs=1e-3)  # float32 sums gave -1591.2897 for -1591.3082
    assert ops.ctc_beam_search_strings(lp, lens, ["a", "b"], 3)[1][0, 0].item() == score


@pytest.mark.parametrize("call, match", [
    (lambda: ops.ctc_greedy_decode_strings(LP, LENS, ["a", "b", "c"]),
     r"charset must have one symbol per class except the blank \(C - 1 = 4\), got 3"),
    (lambda: ops.ctc_beam_search_strings(LP, LENS, ["a"] * 5, 4), r"\(C - 1 = 4\), got 5"),
    (lambda: ops.ctc_beam_search_strings(LP, torch.tensor([7, 3]), ["a"] * 4, 4),
     r"input_lengths\[0\] = 7 is outside \[0, T\]"),
    (lambda: ops.ctc_beam_search_strings(_nan(), LENS, ["a"] * 4, 4), "sequence 1 contain NaN"),
    (lambda: ops.ctc_greedy_decode_strings(_posinf(), LENS, ["a"] * 4), "sequence 0 contain NaN or \\+inf"),
    (lambda: ops.ctc_greedy_decode_labels(LP, LENS, ["a"] * 5), r"\(C - 1 = 4\), got 5"),
    (lambda: ops.ctc_greedy_decode_labels(_nan(), LENS, ["a"] * 4), "sequence 1 contain NaN"),
    (lambda: ops.ctc_greedy_decode_labels(LP, torch.tensor([6, 7]), ["a"] * 4), r"input_lengths\[1\] = 7"),
    (lambda: ops.ctc_beam_search_strings(LP, LENS, ["a"] * 4, 4, 5), r"top_k must be in \[1, beam_width = 4\]"),
    (lambda: ops.ctc_beam_search_labels(LP, LENS, ["a"] * 5, 4), r"\(C - 1 = 4\), got 5"),
    (lambda: ops.ctc_beam_search_labels(_nan(), LENS, ["a"] * 4, 4), "sequence 1 contain NaN"),
    (lambda: ops.ctc_beam_search_labels(LP, torch.tensor([6, 7]), ["a"] * 4, 4), r"input_lengths\[1\] = 7"),
    (lambda: ops.ctc_greedy_decode_labels(LP, LENS, ["a", "b", "c\0", "d"]), r"charset\[2\] contains a NUL"),
    (lambda: ops.ctc_beam_search_labels(LP, LENS, ["a\0", "b", "c", "d"], 4), r"charset\[0\] contains a NUL"),
])
def test_strings_ops_bad_input_raises_clear_error(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_torchscript_calls_the_strings_ops():
    from typing import List, Tuple

    def decode(lp: torch.Tensor, lens: torch.Tensor, charset: List[str]) -> Tuple[List[List[str]], torch.Tensor,
                                                                                    List[List[str]], str, str]:
        texts, scores = torch.ops.captcha_fast.ctc_beam_search_strings(lp, lens, charset, 4, 2, 0, -5.0, None, 0, -1,
                                                                        None)
        greedy, _ = torch.ops.captcha_fast.ctc_greedy_decode_strings(lp, lens, charset, 0)
        labels, _ = torch.ops.captcha_fast.ctc_greedy_decode_labels(lp, lens, charset, 0)
        beam_labels, _ = torch.ops.captcha_fast.ctc_beam_search_labels(lp, lens, charset, 4, 0, -5.0, None, 0, -1,
                                                                        None)
        return texts, scores, greedy, labels, beam_labels

    lp = random_log_probs(8, 3, 6, generator=torch.Generator().manual_seed(7))
    lens = torch.tensor([8, 5, 2])
    charset = ["a", "b", "c", "dd", "é"]
    want = decode(lp, lens, charset)
    got = torch.jit.script(decode)(lp, lens, charset)
    assert got[0] == want[0] and got[2] == want[2] and got[3] == want[3] and torch.equal(got[1], want[1])
    assert want[3] == "".join(t[0] + "\0" for t in want[2]) and got[4] == want[4] == "".join(t[0] + "\0" for t in want[0])


# ---------------------------------------------------------------------------- the top-label certificate
# csrc/ctc_decode.h: a label l is returned without searching when S(l), the CTC forward recursion over
# l's prefixes run only through prefixes holding more than Z_{1:t} / (K + 1) (which the search provably
# keeps), exceeds the probability of every rival (the greedy label and the labels of the greedy path
# flipped to the second-best class at its 3 least sure frames) and all the mass the rivals leave:
# provably the exact search's top-1 for beam width K, with score log P(l) over all alignments.
# Checked here against the search itself (certify=False) and torch's CTC forward algorithm, with the
# certificate recomputed in float64.

CERT_SLACK = 4e-6  # kCertSlackPerFrame
CERT_RIVALS = 3  # kCertRivals


def path_ratio(frames: torch.Tensor) -> float:
    """prod_t sum_c p_t(c) / max_c p_t(c) for (T, C) log-probs, in float64."""
    x = frames.double()
    return math.exp(float((x - x.max(-1, keepdim=True).values).logsumexp(-1).sum())) if len(x) else 1.0


def chain_mass(frames: torch.Tensor, label, blank: int, K: int, min_len: int, factor: float = 1.0) -> float:
    """S(label) / Z in float64, every bar Z_{1:t} / (K + 1) multiplied by `factor` (> 1: harder to keep)."""
    x = frames.double()
    T, L = len(x), len(label)
    e = (x - x.max(-1, keepdim=True).values).exp()
    g = torch.zeros(L + 1, 2, dtype=torch.float64)  # (pb, pnb) per prefix, relative to prod max
    g[0, 0] = 1.0
    z = 1.0
    for t in range(T):
        z *= float(e[t].sum())
        new = torch.zeros_like(g)
        new[:, 0] = g.sum(1) * e[t, blank]
        for j in range(1, L + 1):
            c = label[j - 1]
            source = g[j - 1, 0] if j >= 2 and label[j - 2] == c else g[j - 1].sum()
            new[j, 1] = (g[j, 1] + source) * e[t, c]
        need = max(min_len, L) - (T - t - 1)
        keep = (new.sum(1) > factor * z / (K + 1)) & (torch.arange(L + 1) >= need)
        g = new * keep[:, None]
    return float(g[L].sum()) / z


def chain_holds(frames: torch.Tensor, label, blank: int, K: int, min_len: int, factor: float) -> bool:
    """S(label) > Z / 2 with every bar multiplied by `factor`: the certificate with no rival needed."""
    return chain_mass(frames, label, blank, K, min_len, factor) > factor / 2


def certified_label(frames: torch.Tensor, blank: int, K: int, min_len: int, max_len: int, allowed, factor: float):
    """The label the certificate proves (None: none), in float64, with every lower bound divided by
    `factor` and every upper bound multiplied by it (> 1: harder to pass)."""
    def meets(label):
        return (min_len <= len(label) and (max_len < 0 or len(label) <= max_len)
                and (allowed is None or all(allowed[c] for c in label)))

    greedy = greedy_label(frames, blank)
    if len(frames) < min_len or not meets(greedy):
        return None
    total = math.exp(float(frames.double().logsumexp(-1).sum()))  # Z
    rivals = {greedy: math.exp(label_log_prob(frames, greedy, blank)) / total}
    top2 = frames.float().topk(2, -1) if frames.shape[1] > 1 else None
    if top2 is not None:
        gaps = (top2.values[:, 1] - top2.values[:, 0]).tolist()
        path = frames.float().argmax(-1).tolist()  # first index of the maximum, as the op
        doubt = sorted((t for t in range(len(frames)) if gaps[t] > -20), key=lambda t: -gaps[t])[:CERT_RIVALS]
        for t in doubt:
            second = next(c for c in range(frames.shape[1]) if c != path[t] and frames[t, c] == top2.values[t, 1])
            flipped = greedy_decode_reference([[1.0 if c == (second if u == t else path[u]) else 0.0
                                                for c in range(frames.shape[1])] for u in range(len(frames))], blank)[0]
            rivals.setdefault(flipped, math.exp(label_log_prob(frames, flipped, blank)) / total)
    best = max(rivals, key=rivals.get)  # the first of the most probable (greedy first)
    if not meets(best):
        return None
    lower = chain_mass(frames, best, blank, K, min_len, factor) / factor
    rest = 1.0 * factor - sum(rivals.values()) / factor
    others = max((p for r, p in rivals.items() if r != best), default=0.0) * factor
    return best if lower > max(others, rest) else None


def greedy_label(frames: torch.Tensor, blank: int):
    return greedy_decode_reference(frames.double().tolist(), blank)[0]


def label_log_prob(frames: torch.Tensor, label, blank: int) -> float:
    """log P(label | frames) over all alignments: torch's CTC forward algorithm (frames need not be normalised)."""
    x = frames.double()
    if not label:
        return float(x[:, blank].sum())
    loss = F.ctc_loss(x[:, None, :], torch.tensor([list(label)]), torch.tensor([len(x)]), torch.tensor([len(label)]),
                      blank=blank, reduction="none", zero_infinity=False)
    return -float(loss[0])


def near_half_log_probs(T: int, N: int, C: int, blank: int, g: torch.Generator) -> torch.Tensor:
    """(T, N, C) log-probs whose greedy path holds about a share r in [0.3, 0.7] of the mass
    (r drawn per sequence): each frame gives its best class r^(1/T) and spreads the rest."""
    r = 0.3 + 0.4 * torch.rand(N, generator=g, dtype=torch.float64)
    q = r ** (1.0 / max(T, 1))
    rest = torch.rand(T, N, C, generator=g, dtype=torch.float64) + 1e-3
    best = torch.where(torch.rand(T, N, generator=g) < 0.5, torch.full((T, N), blank),
                       torch.randint(0, C, (T, N), generator=g))
    rest.scatter_(2, best[..., None], 0.0)
    p = rest / rest.sum(-1, keepdim=True) * (1 - q)[None, :, None]
    p.scatter_(2, best[..., None], q[None, :, None].expand(T, N, 1))
    return p.log().float()


def boundary_log_probs(T: int, N: int, C: int, blank: int, g: torch.Generator) -> torch.Tensor:
    """(T, N, C) log-probs like a CTC model's at its runs' edges: a path of runs (1-3 frames, a
    blank between two runs of one class) whose class at each frame shares its mass (up to a half at
    two frames in five, else up to 3%) with the class of the frame before or after, or half the time
    with the class the path test's flips would put there, the rest spread thin."""
    out = torch.empty(T, N, C, dtype=torch.float64)
    for n in range(N):
        path = []
        while len(path) < T:
            c = int(torch.randint(0, C, (1,), generator=g))
            if path and c == path[-1] and c != blank:
                path.append(blank)
            path.extend([c] * int(torch.randint(1, 4, (1,), generator=g)))
        p = torch.rand(T, C, generator=g, dtype=torch.float64) * (0.05 / C)
        for t in range(T):
            before, after = path[max(t - 1, 0)], path[min(t + 1, T - 1)]
            if torch.rand(1, generator=g) < 0.5:  # the class a flip would put there, where one may
                neighbour = before if path[t] == blank else blank if after != path[t] else after
            else:
                neighbour = before if torch.rand(1, generator=g) < 0.5 else after
            u = float(torch.rand(1, generator=g))
            share = 1.25 * u if u < 0.4 else (u - 0.4) / 20  # a frame in doubt, or nearly sure
            p[t, path[t]] += 1.0 - share
            p[t, neighbour] += share
        out[:, n] = p / p.sum(-1, keepdim=True)
    return out.log().float()


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 14), N=st.integers(1, 4), C=st.integers(2, 7),
       K=st.integers(1, 8), kind=st.sampled_from(["near_half", "peaky", "flat"]), options=search_options,
       data=st.data())
def test_certificate_returns_the_search_top1(seed, T, N, C, K, kind, options, data):
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    top_k = data.draw(st.sampled_from([1, 1, 1, min(2, K)]), label="top_k")
    if options["max_length"] != -1:
        options["max_length"] = max(options["max_length"], options["min_length"], 1)
    if data.draw(st.booleans(), label="use mask"):
        options["allowed"] = torch.rand(C, generator=g) < 0.8
    if kind == "near_half":
        lp = near_half_log_probs(T, N, C, blank, g)
    else:
        lp = random_log_probs(T, N, C, peaky=kind == "peaky", blank=blank, generator=g)
    if data.draw(st.booleans(), label="unnormalised"):  # a constant per frame changes no ratio of the chain
        lp = lp + torch.randn(T, N, 1, generator=g) * 3
    lens = torch.randint(0, T + 1, (N,), generator=g)
    got = beam_cpp(lp, lens, K, top_k, blank, certify=True, **options)
    search = beam_cpp(lp, lens, K, top_k, blank, certify=False, **options)  # with the pruning options
    constraints = {k: v for k, v in options.items() if k in ("min_length", "max_length", "allowed")}
    exact = beam_cpp(lp, lens, K, top_k, blank, certify=False, **constraints)  # the exact search
    for n in range(N):
        if top_k > 1:  # the certificate says nothing about the second label: always the search
            assert got[n] == search[n]
            continue
        frames = lp[: lens[n], n]
        reference = functools.partial(certified_label, frames, blank, K, options["min_length"], options["max_length"],
                                      options.get("allowed"))
        certified = got[n] != search[n]
        sure = reference(1.1)
        if sure is not None:  # the certificate clearly holds (the op bounds each Z_t within 1%): it must answer...
            certified = True
            assert got[n][0][0] == sure
        elif reference(0.95) is None:
            assert got[n] == search[n]  # ...it clearly fails: the op must search (with the options given)
        event("certified" if certified else "searched")
        if certified:  # the exact search's top-1, with its full probability
            label = got[n][0][0]
            assert label == exact[n][0][0], (got[n], exact[n])
            assert got[n][0][1] == pytest.approx(label_log_prob(frames, label, blank), abs=1e-4, rel=1e-5)
            assert got[n][0][1] >= exact[n][0][1] - 1e-5  # all alignments, not only those the beam kept


def path_upper_bounds(frames: torch.Tensor) -> List[float]:
    """The path test's bound of each Z_t / max_t p_t as the op computes it (csrc/ctc_decode.h,
    exp_upper), its float32 steps replayed: x = row - max, clamped to -40, times 2^23 / ln 2 rounded
    down, truncated, plus 127 2^23 + 64, read as a float's bits; summed in float64 (the op's float
    partial sums differ by < 1e-6), times 1 + 1e-5. inf: a frame of -inf (the op then leaves the
    sequence to the certificate)."""
    x = frames.float()
    m = x.max(-1, keepdim=True).values
    if len(x) and not bool(torch.isfinite(m).all()):
        return [math.inf] * len(x)
    r = (x - m).clamp(min=-40.0) * torch.tensor(12102203.0)
    bits = r.to(torch.int32) + ((127 << 23) + 64)
    return [float(z) * (1 + 1e-5) for z in bits.view(torch.float32).double().sum(-1)]


def exp_lower(x: torch.Tensor) -> torch.Tensor:
    """The op's lower bound of exp(x) for float32 x in (-16, 0] (csrc/ctc_decode.h), replayed: x times
    2^23 / ln 2 rounded up, truncated, plus 127 2^23 - 64, read as a float's bits, times 0.942."""
    bits = (x.float() * torch.tensor(12102204.0)).to(torch.int32) + ((127 << 23) - 64)
    return bits.view(torch.float32) * torch.tensor(0.942)


def path_flip_gains(frames: torch.Tensor, blank: int, K: int, tolerance: float = 0.0) -> List[float]:
    """The path test's flips (csrc/ctc_decode.h, PathFlips) replayed: after each frame t, the largest
    product of the flip frames' factors 1 + Σ p_s(a) / max_s p_s over non-adjacent frames s < t.
    Kept-prefix flips: a blank after a run of c becomes c unless the next frame is c; the last frame
    of a run of c (two frames or more) a blank. Moved-prefix flips, counted where both groups (the
    path's class with the kept-prefix one, and the moved one) hold more than 2 margin^2 / (K + 1) of
    the frame's Z bound (times 1 + tolerance): the next run d (not a blank) starts at a blank or a
    run's last frame, unless the frame before is d; or a run's first frame (two frames or more) takes
    its left neighbour's class. Ratios from exp_lower, below e^-16 counted 0. The last entry: all frames."""
    path = frames.float().argmax(-1).tolist()
    x = frames.float()
    rel = x - x.max(-1, keepdim=True).values if len(x) else x
    ratio = lambda s, c: float(exp_lower(rel[s, c])) if float(rel[s, c]) > -16 else 0.0
    bounds = path_upper_bounds(frames)
    bar = 2 * math.exp(CERT_SLACK * len(frames) + 1e-9) ** 2 / (K + 1) * (1 + tolerance)
    factors = []
    for s, here in enumerate(path):
        before = path[s - 1] if s > 0 else -1
        after = path[s + 1] if s + 1 < len(path) else -1
        same = 1.0
        if here == blank and before not in (-1, blank) and after != before:
            same += ratio(s, before)  # the run before, one frame longer
        elif here != blank and here == before and after != here:
            same += ratio(s, blank)  # the run's last frame, a blank
        moved = 0.0
        if after not in (-1, blank, here, before) and (here == blank or here == before):
            moved = ratio(s, after)  # the next run starts here
        elif here != blank and after == here and before not in (-1, here):
            moved = ratio(s, before)  # this run starts one frame later
        limit = bar * bounds[s]
        factors.append(same + moved if moved > limit and same > limit else same)
    flipped, kept, gains = 1.0, 1.0, []
    for f in factors:
        gains.append(max(flipped, kept))  # frames before s decided
        flipped, kept = kept * f, max(flipped, kept)
    gains.append(max(flipped, kept))
    return gains


def path_test(frames: torch.Tensor, blank: int, K: int, tolerance: float) -> bool:
    """Whether the path test answers, its bounds replayed with every limit tightened by the share
    `tolerance` (negative: loosened): the product of Z_t bounds over the flips' gain below
    2 / margin^2, and the pass not given up on the way (the product so far at 8 times the limit
    times the gain so far)."""
    limit = 2 / math.exp(CERT_SLACK * len(frames) + 1e-9) ** 2
    z, gains = 1.0, path_flip_gains(frames, blank, K, tolerance)
    for t, bound in enumerate(path_upper_bounds(frames)):
        if not z < 8 * limit * gains[t] * (1 - tolerance):
            return False
        z *= bound
    return z / gains[-1] < limit * (1 - tolerance)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 14), N=st.integers(1, 4), C=st.integers(2, 40),
       K=st.integers(1, 8), kind=st.sampled_from(["boundaries", "boundaries", "near_half", "peaky", "flat"]), options=search_options,
       data=st.data())
def test_labels_without_scores_answer_by_the_path_test_alone(seed, T, N, C, K, kind, options, data):
    """with_scores=False: a sequence whose greedy label provably holds over half the mass, by the
    exp-free bounds of Z_t and the greedy path with its flips, is answered by its greedy label with a
    NaN score (not computed); the op's bound replayed says which must be and which must not. Every
    label is still the exact search's top-1, and every other sequence gets the label and score of
    with_scores=True."""
    g = torch.Generator().manual_seed(seed)
    blank = data.draw(st.integers(0, C - 1), label="blank")
    if options["max_length"] != -1:
        options["max_length"] = max(options["max_length"], options["min_length"], 1)
    allowed = torch.rand(C, generator=g) < 0.8 if data.draw(st.booleans(), label="use mask") else None
    if kind == "boundaries":
        lp = boundary_log_probs(T, N, C, blank, g)
    elif kind == "near_half":
        lp = near_half_log_probs(T, N, C, blank, g)
    else:
        lp = random_log_probs(T, N, C, peaky=kind == "peaky", blank=blank, generator=g)
    if data.draw(st.booleans(), label="unnormalised"):
        lp = lp + torch.randn(T, N, 1, generator=g) * 3
    lens = torch.randint(0, T + 1, (N,), generator=g)
    charset = [chr(ord("A") + c) for c in range(C - 1)]
    args = (K, blank, options["token_min_logp"], options["blank_skip_threshold"], options["min_length"],
            options["max_length"], allowed, True)
    packed, scores = ops.ctc_beam_search_labels(lp, lens, charset, *args, with_scores=False)
    full, full_scores = ops.ctc_beam_search_labels(lp, lens, charset, *args)
    assert packed == full and scores.shape == (N,)
    exact = beam_cpp(lp, lens, K, 1, blank, certify=False, min_length=options["min_length"],
                     max_length=options["max_length"], allowed=allowed)
    for n in range(N):
        frames = lp[: lens[n], n]
        label = greedy_label(frames, blank)
        meets = (options["min_length"] <= len(label) <= (options["max_length"] if options["max_length"] > 0 else T)
                 and (allowed is None or all(allowed[c] for c in label)))
        answered = bool(torch.isnan(scores[n]))
        if answered:  # sound: the greedy label holds over half of all the mass, and the search returns it
            assert meets and path_test(frames, blank, K, -1e-4)
            total = float(frames.double().logsumexp(-1).sum())
            assert label_log_prob(frames, label, blank) - total > math.log(0.5)
            assert exact[n][0][0] == label
        else:
            assert scores[n].item() == full_scores[n].item()
            assert not (meets and path_test(frames, blank, K, 1e-4))  # ...and it answers every sequence the bound covers
        path_alone = math.prod(path_upper_bounds(frames)) < 2 / math.exp(CERT_SLACK * len(frames) + 1e-9) ** 2
        event("answered" + ("" if path_alone else " thanks to the flips") if answered else "certificate or search")


def test_the_path_test_with_flips_on_many_run_edges():
    """Sequences in doubt at their runs' edges, where the flips decide: each answered one is the exact
    search's top-1 and holds over half the mass; each the replayed bound covers is answered."""
    g = torch.Generator().manual_seed(5)
    thanks_to_flips = 0
    for C in (3, 6, 12, 37):
        lp = boundary_log_probs(16, 100, C, 0, g)
        lens = torch.randint(6, 17, (100,), generator=g)
        charset = [chr(ord("A") + c) for c in range(C - 1)]
        packed, scores = ops.ctc_beam_search_labels(lp, lens, charset, 10, with_scores=False)
        exact = beam_cpp(lp, lens, 10, 1)
        for n, label in enumerate(packed.split("\0")[:-1]):
            frames = lp[: lens[n], n]
            assert [ord(c) - ord("A") + 1 for c in label] == list(exact[n][0][0])
            if torch.isnan(scores[n]):  # answered by the path test
                total = float(frames.double().logsumexp(-1).sum())
                assert label_log_prob(frames, exact[n][0][0], 0) - total > math.log(0.5)
                limit = 2 / math.exp(CERT_SLACK * len(frames) + 1e-9) ** 2
                thanks_to_flips += not math.prod(path_upper_bounds(frames)) < limit
            else:
                assert not path_test(frames, 0, 10, 1e-4)
    assert thanks_to_flips >= 50  # 75 of the 400 with this seed


def answer_by_path_test(p: List[List[float]], K: int = 10):
    """The labels op on one sequence of probabilities (class 0 the blank): (label, answered by the path test)."""
    lp = torch.tensor(p, dtype=torch.float64).log()[:, None, :].float()
    packed, scores = ops.ctc_beam_search_labels(lp, torch.tensor([len(p)]), ["a", "b"], K, with_scores=False)
    return packed[:-1], bool(torch.isnan(scores[0]))


def test_the_path_test_counts_the_flips_that_keep_the_label():
    # "a" then a blank, each frame split 0.6 / 0.4 between them: the path a_ holds 0.36, but the
    # blank after the run of "a" may become "a" (aa: 0.24), so B = 0.6 > 1/2 proves "a" (P = 0.76).
    assert answer_by_path_test([[0.4, 0.6, 0.0], [0.6, 0.4, 0.0]]) == ("a", True)
    # The run's end may become a blank: aa_ with the second "a" at 0.55 / 0.45 blank.
    assert answer_by_path_test([[0.01, 0.99, 0.0], [0.45, 0.55, 0.0], [0.9, 0.1, 0.0]]) == ("a", True)
    # A moved-prefix flip: the blank before the run of "a" may start it (_a 0.36, aa 0.24). The paths
    # then sit on two prefixes at frame 1, "" and "a", and the beam provably keeps both only where
    # each holds more than 2 / (K + 1) of the frame: with K = 10, not with K = 2.
    p = [[0.6, 0.4, 0.0], [0.4, 0.6, 0.0]]
    assert answer_by_path_test(p, K=10) == ("a", True) and answer_by_path_test(p, K=2) == ("a", False)


def test_the_path_test_never_flips_the_blank_between_two_runs_of_one_class():
    # a_a with the blank at 0.55 / 0.45 "a": the path holds 0.4455, and "aa" (its only alignment) no
    # more, while "a" holds 0.549. Turning that blank into "a" would merge the runs: not a flip, so
    # the test cannot prove "aa", and the search returns "a".
    p = [[0.1, 0.9, 0.0], [0.55, 0.45, 0.0], [0.1, 0.9, 0.0]]
    assert answer_by_path_test(p) == ("a", False)


def test_certificate_scores_are_label_log_probs_on_model_like_inputs():
    g = torch.Generator().manual_seed(11)
    lp = random_log_probs(40, 300, 37, generator=g)
    lens = torch.randint(20, 41, (300,), generator=g)
    tokens, lengths, scores = ops.ctc_beam_search(lp, lens, 10, 1, 0)
    search = ops.ctc_beam_search(lp, lens, 10, 1, 0, None, None, 0, -1, None, False)
    assert torch.equal(tokens, search[0]) and torch.equal(lengths, search[1])
    certified = 0
    for n in range(300):
        frames = lp[: lens[n], n]
        if path_ratio(frames) < 1.9:
            certified += 1
            label = tokens[n, 0, : lengths[n, 0]].tolist()
            assert scores[n, 0].item() == pytest.approx(label_log_prob(frames, label, 0), abs=1e-5)
    assert certified > 100  # the certificate is exercised


def test_a_narrow_beam_can_miss_the_most_probable_label_and_the_certificate_does_not_claim_it():
    # Label (2,) has probability 0.511 > 1/2, but a beam of 3 returns (1, 2): (2,)'s alignments sit
    # in prefixes "" and "2" that it drops. The chain holds only what a beam provably keeps: "" at
    # frame 1 (0.081) is below Z / (K + 1) for any K <= 11, so (2,) ends with 0.437 < 1/2 and the
    # certificate leaves this to the search, which a beam of 4 gets right.
    p = torch.tensor([[0.768, 0.23, 0.002], [0.106, 0.322, 0.572], [0.093, 0.007, 0.9]], dtype=torch.float64)
    lp = (p / p.sum(-1, keepdim=True)).log()[:, None, :].float()
    assert math.exp(label_log_prob(lp[:, 0], (2,), 0)) > 0.5 and path_ratio(lp[:, 0]) > 2
    assert not chain_holds(lp[:, 0], (2,), 0, 3, 0, 1.0) and not chain_holds(lp[:, 0], (2,), 0, 11, 0, 1.0)
    for certify in (True, False):
        [[(label, _)]] = beam_cpp(lp, torch.tensor([3]), 3, 1, certify=certify)
        assert label == (1, 2)
    [[(label, score)]] = beam_cpp(lp, torch.tensor([3]), 4, 1, certify=True)
    assert label == (2,) and score == pytest.approx(math.log(0.51064385), abs=1e-6)


def test_the_chain_certifies_where_the_greedy_path_alone_holds_under_half():
    # A frame split between "a" and a blank (0.45 / 0.55) around a sure "a": the path holds 0.55,
    # the label "a" 1.0. For K >= 1 the chain keeps "a"'s prefixes (each above Z / 2) and certifies,
    # where a test on the path alone could not (0.55 * 0.55 < 1/2 with two such frames).
    p = torch.tensor([[0.45, 0.55], [0.0001, 0.9999], [0.45, 0.55]], dtype=torch.float64)  # class 0: blank
    lp = (p / p.sum(-1, keepdim=True)).log()[:, None, :].float()
    assert path_ratio(lp[:, 0]) > 2
    for K in (1, 3):
        assert chain_holds(lp[:, 0], (1,), 0, K, 0, 1.05)
        tokens, lengths, scores = ops.ctc_beam_search(lp, torch.tensor([3]), K, 1, 0, None, None, 0, -1, None, True)
        search = ops.ctc_beam_search(lp, torch.tensor([3]), K, 1, 0, None, None, 0, -1, None, False)
        assert tokens[0, 0, : lengths[0, 0]].tolist() == [1] == search[0][0, 0, : search[1][0, 0]].tolist()
        assert scores[0, 0].item() == pytest.approx(label_log_prob(lp[:, 0], (1,), 0), abs=1e-6)


def test_a_rival_label_is_certified_where_the_greedy_label_is_not_the_best():
    # Two frames each split blank 0.55 / "a" 0.45: the greedy path is blank, blank (label "", 0.3025),
    # but "a" holds 0.6975. Flipping either frame to its second-best class gives "a": with R = {"", "a"}
    # holding all the mass, "a" is certified once its prefixes are provably kept: "a" holds 0.45 at
    # frame 1, above Z / (K + 1) for K >= 2, not for K = 1, where the search itself returns "".
    p = torch.tensor([[0.55, 0.45], [0.55, 0.45]], dtype=torch.float64)  # class 0: blank
    lp = p.log()[:, None, :].float()
    assert certified_label(lp[:, 0], 0, 2, 0, -1, None, 1.05) == (1,)
    assert certified_label(lp[:, 0], 0, 1, 0, -1, None, 0.95) is None
    for K, want in ((1, ()), (2, (1,)), (5, (1,))):
        [[(label, score)]] = beam_cpp(lp, torch.tensor([2]), K, 1, certify=True)
        [[(exact, _)]] = beam_cpp(lp, torch.tensor([2]), K, 1, certify=False)
        assert label == exact == want
        if K >= 2:  # certified: log P("a") over all its alignments
            assert score == pytest.approx(math.log(0.6975), abs=1e-6)


def test_two_labels_sharing_the_mass_certify_the_larger():
    # One frame split "a" 0.5 / "b" 0.45 (0.05 blank) after a sure "x": the greedy path holds under
    # half, and so does "xa", but its rival "xb" (the flip of that frame) takes 0.45 and leaves the
    # rest only about 0.05, so "xa" (0.5) is certified.
    rows = [[0.001, 0.001, 0.001, 0.997], [0.998, 0.0005, 0.0005, 0.001], [0.05, 0.5, 0.45, 0.0],
            [0.998, 0.001, 0.001, 0.0]]  # classes: blank, a, b, x
    p = torch.tensor(rows, dtype=torch.float64) + 1e-9
    lp = (p / p.sum(-1, keepdim=True)).log()[:, None, :].float()
    assert math.exp(label_log_prob(lp[:, 0], (3, 1), 0)) < 0.5 and not chain_holds(lp[:, 0], (3, 1), 0, 10, 0, 1.0)
    assert certified_label(lp[:, 0], 0, 10, 0, -1, None, 1.05) == (3, 1)
    [[(label, score)]] = beam_cpp(lp, torch.tensor([4]), 10, 1, certify=True)
    [[(searched, _)]] = beam_cpp(lp, torch.tensor([4]), 10, 1, certify=False)
    assert label == searched == (3, 1)
    assert score == pytest.approx(label_log_prob(lp[:, 0], (3, 1), 0), abs=1e-6)


# ---------------------------------------------------------------------------- the kernels' AVX2 paths
# On a CPU with AVX2 the greedy CPU kernel scans float32 frames 8 classes at a time, and so do the
# certificate's first pass and the path test's; with ATEN_CPU_CAPABILITY=default (as torch's own
# kernels) they take the SSE2/plain paths. Both must give the same tokens, lengths and scores bit for
# bit, and raise for the same sequence.

GREEDY_PATH_SCRIPT = r"""
import sys
import torch
import captcha_fast  # noqa: F401
cases = torch.load(sys.argv[1])
out = []
for lp, lens in cases:
    try:
        out.append(torch.ops.captcha_fast.ctc_greedy_decode(lp, lens, 0))
    except RuntimeError as e:
        out.append(str(e).splitlines()[0])
    try:
        out.append(torch.ops.captcha_fast.ctc_beam_search(lp, lens, 10, 1, 0, None, None, 0, -1, None, True))
    except RuntimeError as e:
        out.append(str(e).splitlines()[0])
    charset = [str(c) for c in range(1, lp.shape[2])]
    try:
        out.append(torch.ops.captcha_fast.ctc_beam_search_labels(lp, lens, charset, 10, with_scores=False))
    except RuntimeError as e:
        out.append(str(e).splitlines()[0])
torch.save(out, sys.argv[2])
"""


def greedy_path_cases():
    """float32, class-contiguous inputs (the AVX2 path's) around its 8-class blocks: ties (rounded
    values, equal maxima in one block and across blocks, the maximum in the overlapping tail
    block), -inf (whole frames too), +-0, huge finite values (sums overflow: the quick NaN test
    must not misfire), and NaN or +inf in one sequence, which both paths must name."""
    g = torch.Generator().manual_seed(19)
    cases = []
    for C in (8, 9, 15, 16, 17, 24, 37, 63, 64, 65, 100):
        T, N = 30, 24
        lp = random_log_probs(T, N, C, peaky=bool(C % 2), generator=g).round(decimals=1)
        lp[:, 0] = 0.0  # sequence 0: every class ties, class 0 wins
        lp[:, 1] = -math.inf
        lp[:, 1, C - 1] = -1.0  # the last class, only in the overlapping tail block
        lp[::2, 2] = -math.inf  # whole frames of -inf
        lp[:, 3] = -0.0
        lp[:, 3, C // 2] = 0.0
        lp[:, 4] = -3e38  # finite, but any sum of them is -inf
        lp[:, 4, 3] = 3e38
        lp[:, 5] = 3e38  # sums overflow to +inf: the exact test must clear them
        cases.append((lp, torch.randint(0, T + 1, (N,), generator=g)))
        for bad in (math.nan, math.inf):
            x = lp.clone()
            x[T - 1, N - 2, C - 1] = bad  # the last value of the tail block
            cases.append((x, torch.full((N,), T)))
    return cases


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="this CPU has no AVX2 path")
def test_avx2_paths_equal_the_sse2_paths_and_the_argmax_reference(tmp_path):
    import os
    import subprocess
    import sys

    cases = greedy_path_cases()
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", GREEDY_PATH_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=300)
    sse2 = torch.load(tmp_path / "out.pt")
    for (lp, lens), plain, plain_beam, plain_labels in zip(cases, sse2[::3], sse2[1::3], sse2[2::3]):
        # The certificate's first pass (AVX2, each frame's probabilities kept for the forward passes,
        # or SSE2, the forward passes computing their own): the same exps bit for bit, so the same
        # answers and scores, or the same error.
        try:
            beam = ops.ctc_beam_search(lp, lens, 10, 1, 0, None, None, 0, -1, None, True)
            assert not isinstance(plain_beam, str), plain_beam
            for a, b in zip(beam, plain_beam):
                assert torch.equal(a, b)
        except RuntimeError as e:
            assert str(e).splitlines()[0] == plain_beam and "sequence 22 contain NaN or +inf" in plain_beam
        # Labels only: the path test's pass (AVX2, or the plain loops) answers the same sequences.
        try:
            labels, label_scores = ops.ctc_beam_search_labels(lp, lens, [str(c) for c in range(1, lp.shape[2])], 10,
                                                              with_scores=False)
            assert not isinstance(plain_labels, str), plain_labels
            assert labels == plain_labels[0]
            torch.testing.assert_close(label_scores, plain_labels[1], rtol=0, atol=0, equal_nan=True)
        except RuntimeError as e:
            assert str(e).splitlines()[0] == plain_labels and "sequence 22 contain NaN or +inf" in plain_labels
        try:
            avx2 = ops.ctc_greedy_decode(lp, lens, 0)
        except RuntimeError as e:
            assert str(e).splitlines()[0] == plain and "sequence 22 contain NaN or +inf" in plain
            continue
        assert not isinstance(plain, str), plain
        for a, b in zip(avx2, plain):
            assert torch.equal(a, b)
        tokens, lengths, scores = avx2
        for n in range(lp.shape[1]):
            path = lp[: lens[n], n].argmax(-1).tolist()  # torch.argmax: the first maximum
            label = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
            assert tokens[n, : lengths[n]].tolist() == label
            best_path = lp[: lens[n], n].max(-1).values.double().sum().float()  # float32 output: may be +-inf
            assert scores[n].item() == pytest.approx(best_path.item(), rel=1e-6)
