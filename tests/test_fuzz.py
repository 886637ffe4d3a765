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
    packed, label_scores = ops.ctc_greedy_decode_labels(lp, lens, charset, blank)
    assert packed == "".join(t[0] + "\0" for t in texts) and torch.equal(label_scores, scores)

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


# ---------------------------------------------------------------------------- sizes past 2^31
# Sizes whose products (1 + T x beam trie nodes, N x top_k x L tokens) cross 2^31 or 2^63, with
# tensors that stay small: one frame expanded (stride 0) over T frames and N sequences. Every case
# runs in one child process, so a crash fails this test instead of ending pytest.

WORKSPACE_LIMIT = 4 << 30  # csrc/ops.h kBeamWorkspaceLimit: one sequence's beam-search workspace

SIZE_CASES_SCRIPT = r"""
import json, sys
import torch
import captcha_fast  # noqa: F401
ops = torch.ops.captcha_fast
for i, (op, T, N, C, K, top_k, max_len) in enumerate(json.loads(sys.argv[1])):
    print(json.dumps({"start": i}), flush=True)
    frame = torch.full((C,), float("-inf"))
    frame[1 % C] = 0.0  # class 1 certain (the blank when C = 1)
    lp = frame.expand(T, N, C)
    lens = torch.full((1,), T).expand(N)
    charset = ["x"] * (C - 1)
    try:
        if op == "greedy":
            tokens, lengths, scores = ops.ctc_greedy_decode(lp, lens, 0)
            out = [tokens[0, :lengths[0]].tolist(), scores[0].item()]
        elif op == "greedy_strings":
            texts, scores = ops.ctc_greedy_decode_strings(lp, lens, charset, 0)
            out = [texts[0][0], scores[0, 0].item()]
        elif op == "beam":
            tokens, lengths, scores = ops.ctc_beam_search(lp, lens, K, top_k, 0, None, None, 0, max_len, None)
            out = [tokens[0, 0, :lengths[0, 0]].tolist(), scores[0, 0].item()]
        else:
            texts, scores = ops.ctc_beam_search_strings(lp, lens, charset, K, top_k, 0, None, None, 0, max_len)
            out = [texts[0][0], scores[0, 0].item()]
        print(json.dumps({"done": i, "out": out}), flush=True)
    except Exception as e:
        print(json.dumps({"done": i, "error": str(e).splitlines()[0], "type": type(e).__name__}), flush=True)
"""


def size_cases(seed: int = 0):
    """(op, T, N, C, beam, top_k, max_length) cases: many whose trie or token output is past
    int32 (refused), a few that fit and run (T x beam up to 2^23, a few seconds)."""
    import random

    rnd = random.Random(seed)
    near = lambda p: max(1, 2**p + rnd.choice([-1, 0, 1, rnd.randint(-1000, 1000)]))  # noqa: E731
    cases = [("beam", 1_048_577, 1, 3, 4096, 1, -1), ("beam_strings", 1_048_577, 1, 3, 4096, 1, -1),
             ("beam", 600_000, 1, 3, 4096, 1, -1), ("beam", 2**30 - 1, 1, 2, 1, 1, -1)]
    for _ in range(40):  # 1 + T x beam around 2^31 .. 2^42: far past the limit
        beam = rnd.choice([1, 2, 7, 64, 1000, 4095, 4096, rnd.randint(1, 4096)])
        T = min(2**30 - 1, max(1, near(rnd.randint(31, 42)) // beam))
        cases.append((rnd.choice(["beam", "beam_strings"]), T, rnd.randint(1, 3), rnd.randint(1, 40), beam,
                      rnd.randint(1, beam), rnd.choice([-1, 1, 10**6])))
    # Token outputs past 2^63 bytes (N x top_k x L int32), workspace within the limit.
    cases += [("beam", 2**22, 2**40, 1, 1, 1, -1), ("beam_strings", 2**21, 2**40, 2, 2, 2, -1),
              ("greedy", 2**22, 2**40, 1, 1, 1, -1), ("greedy_strings", 2**22, 2**40, 1, 1, 1, -1),
              ("greedy", 2**20, 2**40, 3, 1, 1, -1)]  # 2^62 bytes: representable, refused by the allocator
    # Within the limit: these run, over 2^20 .. 2^21 frames.
    cases += [("beam", 2**20 + 1, 1, 3, 3, 2, -1), ("beam_strings", 2**21 - 1, 2, 2, 1, 1, 1),
              ("greedy", 2**21 + 3, 2, 3, 1, 1, -1), ("greedy_strings", 2**20 + 1, 1, 1, 1, 1, -1),
              ("beam", 2**20, 1, 1, 4, 1, -1)]
    return cases


def test_sizes_past_int32_are_refused_by_name_or_run():
    import json
    import subprocess
    import sys

    cases = size_cases()
    proc = subprocess.run([sys.executable, "-c", SIZE_CASES_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, timeout=600)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    done = {e["done"]: e for e in events if "done" in e}
    started = [e["start"] for e in events if "start" in e]
    assert proc.returncode == 0, (f"the process ended (rc {proc.returncode}) in case {cases[started[-1]]}:\n"
                                  f"{proc.stderr[-2000:]}")
    assert sorted(done) == list(range(len(cases)))
    for i, (op, T, N, C, K, top_k, max_len) in enumerate(cases):
        result = done[i]
        assert result.get("type", "RuntimeError") == "RuntimeError", (cases[i], result)
        nodes = 1 + T * K
        L = T if max_len < 0 else min(T, max_len)
        tokens = N * (top_k * L if op.startswith("beam") else T)
        if op.startswith("beam") and 20 * nodes > WORKSPACE_LIMIT:  # 5 int32 per node, table aside
            assert "error" in result, (cases[i], result)
            assert f"T = {T} frames x beam_width {K} needs a " in result["error"], result
            assert "workspace per sequence" in result["error"] and "above the limit of 4.0 GiB" in result["error"]
        elif tokens * 4 >= 2**63:
            assert "error" in result and f"N = {N} sequences" in result["error"], (cases[i], result)
            assert "larger than 2^63 bytes" in result["error"], result
        elif tokens * 4 >= 2**40:
            assert "error" in result, (cases[i], result)  # the allocator's refusal, not a crash
        else:
            assert 40 * nodes < WORKSPACE_LIMIT and "out" in result, (cases[i], result)
            text, score = result["out"]
            one = [1] if C > 1 else []  # class 1 in every frame reads as one character
            assert text == (one if op in ("beam", "greedy") else "x" * len(one)) and score == 0.0, (cases[i], result)
