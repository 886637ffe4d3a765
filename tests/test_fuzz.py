"""Fuzzing the ops: 10k random inputs (extreme values, -inf, odd strides),
zero crashes, and results checked against oracles that do not depend on how
ties are broken:
  - greedy equals the reference exactly (ties go to the lowest class);
  - every beam hypothesis is a well-formed label whose score is at most the
    label's true log-probability (CTC forward algorithm, torch's ctc_loss);
  - with a beam wide enough to never prune, the scores ARE those
    log-probabilities and the top label is the most probable one;
  - the strings ops return the tokens ops' labels and scores."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import captcha_fast  # noqa: F401
from captcha_fast._reference import greedy_decode_reference

ops = torch.ops.captcha_fast
values = st.one_of(st.floats(-30, 5), st.floats(-1e30, 0), st.just(-math.inf), st.just(0.0))


def layout(x: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values (T, N, C) in another memory layout."""
    if kind == 1:  # (N, T, C) in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == 2:  # every other class slot in memory
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    if kind == 3:  # classes outermost
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return x


def label_log_prob(frames: torch.Tensor, label, blank: int) -> float:
    """log p(label | frames) summed over all alignments (frames: (T, C) float64)."""
    T = frames.shape[0]
    if not label:
        return float(frames[:, blank].sum())
    loss = F.ctc_loss(frames[:, None, :], torch.tensor([label]), torch.tensor([T]), torch.tensor([len(label)]),
                      blank=blank, reduction="none", zero_infinity=False)
    return -float(loss[0])


# Fewer under tools/sanitize.sh, where everything runs ~10x slower.
EXAMPLES = int(os.environ.get("CAPTCHA_FAST_FUZZ_EXAMPLES", 10_000))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(0, 6), N=st.integers(1, 3), C=st.integers(1, 4), data=st.data())
@pytest.mark.slow
def test_fuzz_ops(T, N, C, data):
    raw = data.draw(st.lists(values, min_size=T * N * C, max_size=T * N * C), label="values")
    x = torch.tensor(raw, dtype=torch.float32).reshape(T, N, C)
    lp = layout(x, data.draw(st.integers(0, 3), label="layout"))
    lens = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=N, max_size=N), label="lengths"))
    blank = data.draw(st.integers(0, C - 1), label="blank")
    K = data.draw(st.integers(1, 40), label="beam")
    top_k = data.draw(st.integers(1, K), label="top_k")
    min_len = data.draw(st.integers(0, 3), label="min_length")
    max_len = data.draw(st.sampled_from([-1, max(min_len, 1), 5]), label="max_length")
    prune = data.draw(st.booleans(), label="prune")
    opts = (-5.0, 0.9) if prune else (None, None)

    tokens, lengths, scores = ops.ctc_greedy_decode(lp, lens, blank)
    for n in range(N):
        label, score = greedy_decode_reference(x[: lens[n], n].double().tolist(), blank)
        assert tuple(tokens[n, : lengths[n]].tolist()) == label
        assert scores[n].item() == pytest.approx(score, rel=1e-5, abs=1e-3) or (score == -math.inf == scores[n])

    charset = [f"<{c}>" for c in range(C) if c != blank]  # class c < blank is charset[c], above it charset[c - 1]
    texts, text_scores = ops.ctc_greedy_decode_strings(lp, lens, charset, blank)
    assert torch.equal(text_scores[:, 0], scores)
    assert texts == [["".join(f"<{c}>" for c in tokens[n, : lengths[n]].tolist())] for n in range(N)]

    tokens, lengths, scores = ops.ctc_beam_search(lp, lens, K, top_k, blank, *opts, min_len, max_len, None)
    texts, text_scores = ops.ctc_beam_search_strings(lp, lens, charset, K, top_k, blank, *opts, min_len, max_len)
    assert torch.equal(text_scores, scores)
    assert texts == [["".join(f"<{c}>" for c in tokens[n, k, : lengths[n, k]].tolist()) for k in range(top_k)]
                     for n in range(N)]
    L = T if max_len < 0 else min(T, max_len)
    assert tokens.shape == (N, top_k, L)
    # Without pruning, a beam this wide keeps every prefix of these short inputs.
    exhaustive = not prune and K >= sum((C - 1) ** l for l in range(T + 1))
    for n in range(N):
        frames = x[: lens[n], n].double()
        s = scores[n].tolist()
        assert s == sorted(s, reverse=True)
        hyps = set()
        for k in range(top_k):
            label = tuple(tokens[n, k, : lengths[n, k]].tolist())
            assert (tokens[n, k, lengths[n, k]:] == -1).all()
            if s[k] == -math.inf:
                assert lengths[n, k] == 0
                continue
            assert label not in hyps and all(0 <= c < C and c != blank for c in label)
            assert min_len <= len(label) <= (lens[n] if max_len < 0 else min(lens[n], max_len))
            hyps.add(label)
            truth = label_log_prob(frames, list(label), blank)
            assert s[k] <= truth + 1e-3 + 1e-5 * abs(truth), (label, s[k], truth)
            if exhaustive:
                assert s[k] == pytest.approx(truth, rel=1e-4, abs=1e-3)
