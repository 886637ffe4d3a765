"""Scoring reads against truths: the edit-distance alignment, CER, confusions, merge, ignore_case."""
import itertools
import random

import pytest

from captcha_fast.metrics import align, edit_distance, merge_table, score


def _levenshtein(a, b):
    """Textbook recursion, memoised: the reference for the DP."""
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_edit_distance_and_alignment_against_the_recursion():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2 and edit_distance("ab", "ab") == 0
    rng = random.Random(0)
    words = ["".join(rng.choice("ab1") for _ in range(rng.randint(0, 6))) for _ in range(40)]
    for a, b in itertools.product(words[:20], words[20:]):
        pairs = align(a, b)
        assert "".join(t for t, _ in pairs) == a and "".join(r for _, r in pairs) == b  # it covers both texts
        assert all(t or r for t, r in pairs)
        assert sum(t != r for t, r in pairs) == edit_distance(a, b) == _levenshtein(a, b)


def test_score_and_confusions():
    r = score(["AB0", "I1C", "XY"], ["AB0", "11C", "XYZ"], merge="0O,1I")
    assert r.n == 3 and r.correct == 1 and r.accuracy == pytest.approx(1 / 3)
    assert r.char_errors == 2 and r.chars == 8 and r.cer == pytest.approx(2 / 8)
    assert r.accuracy_merged == pytest.approx(2 / 3)
    assert sorted(r.confusions) == [("I", "1", 1), ("∅", "Z", 1)]
    assert r.errors == [("1", "I1C", "11C"), ("2", "XY", "XYZ")]  # paths default to the indices
    assert merge_table("0O,1Il") == {"O": "0", "I": "1", "l": "1"}
    with pytest.raises(ValueError, match="3 labels but 2 reads"):
        score(["a", "b", "c"], ["a", "b"])


def test_ignore_case():
    truths, reads = ["aB3", "xyz", "Q"], ["Ab3", "xY", "o"]
    exact, folded = score(truths, reads, paths=["p0", "p1", "p2"]), score(truths, reads, ignore_case=True)
    assert exact.correct == 0 and exact.char_errors == 2 + 2 + 1
    assert folded.correct == 1 and folded.char_errors == 1 + 1 and folded.ignore_case
    assert sorted(folded.confusions) == [("q", "o", 1), ("z", "∅", 1)]
    # the merge groups are case-folded too: with 0O merged, "o" reads as "0"
    assert score(["0"], ["o"], merge="0O", ignore_case=True).accuracy_merged == 1.0
    assert score(["0"], ["o"], merge="0O").accuracy_merged == 0.0
