"""Reads against truths: accuracy, character error rate, confusions (no model involved).

    score(["AB0", "XY"], ["AB0", "XYZ"]) -> EvalReport(n=2, accuracy=0.5, cer=0.2, ...)

CER = sum of edit distances / sum of label lengths. Confusions are the substitutions,
deletions (read '∅') and insertions (truth '∅') of an edit-distance alignment of each
misread. Training's validation and `captcha-fast eval` both score with this module."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

NOTHING = "∅"  # the empty side of an insertion or deletion in a confusion


@dataclass
class EvalReport:
    n: int                               # images evaluated
    accuracy: float                      # whole captcha right, 0-1
    cer: float                           # character error rate: char_errors / chars
    correct: int
    char_errors: int                     # summed edit distance
    chars: int                           # summed label length
    confusions: List[Tuple[str, str, int]] = field(default_factory=list)  # (truth, read, count), most first
    accuracy_merged: Optional[float] = None  # with look-alike groups (e.g. 0/O, 1/I) merged
    merge: Optional[str] = None
    ignore_case: bool = False            # upper and lower case counted as the same symbol
    errors: List[Tuple[str, str, str]] = field(default_factory=list)      # (path, truth, read) of misreads
    seconds: float = 0.0

    def to_json(self, max_errors: int = 50) -> dict:
        d = asdict(self)
        d["confusions"] = [{"truth": t, "read": r, "count": c} for t, r, c in self.confusions]
        d["errors"] = [{"path": p, "truth": t, "read": r} for p, t, r in self.errors[:max_errors]]
        return d


def align(truth: str, read: str) -> List[Tuple[str, str]]:
    """A minimal edit-distance alignment as (truth symbol or '', read symbol or '') pairs;
    the pairs that differ are the edits."""
    n, m = len(truth), len(read)
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (truth[i - 1] != read[j - 1]))
    pairs, i, j = [], n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i][j] == d[i - 1][j - 1] + (truth[i - 1] != read[j - 1]):
            pairs.append((truth[i - 1], read[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and d[i][j] == d[i - 1][j] + 1:
            pairs.append((truth[i - 1], ""))
            i -= 1
        else:
            pairs.append(("", read[j - 1]))
            j -= 1
    return pairs[::-1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute cost 1)."""
    return sum(x != y for x, y in align(a, b))


def merge_table(groups: str) -> Dict[str, str]:
    """'0O,1I' -> {'O': '0', 'I': '1'}: every symbol of a group maps to the group's first."""
    table = {}
    for group in groups.split(","):
        for ch in group[1:]:
            table[ch] = group[0]
    return table


def score(truths: Sequence[str], reads: Sequence[str], paths: Optional[Sequence[str]] = None,
          merge: Optional[str] = None, ignore_case: bool = False) -> EvalReport:
    """The report of `reads` against `truths` (paths name the misreads; default: their indices).
    merge: look-alike groups ('0O,1I') for accuracy_merged. ignore_case: compare case-folded
    texts everywhere (accuracy, CER, confusions; errors keep the texts as given)."""
    if len(truths) != len(reads):
        raise ValueError(f"{len(truths)} labels but {len(reads)} reads")
    paths = list(paths) if paths is not None else [str(i) for i in range(len(truths))]
    if len(paths) != len(truths):
        raise ValueError(f"{len(truths)} labels but {len(paths)} paths")
    fold = str.casefold if ignore_case else (lambda s: s)
    table = {fold(k): fold(v) for k, v in merge_table(merge).items()} if merge else {}
    confusions: Counter = Counter()
    correct = edits = chars = merged_ok = 0
    errors = []
    for p, truth, read in zip(paths, truths, reads):
        t, r = fold(truth), fold(read)
        chars += len(t)
        if t == r:
            correct += 1
        else:
            errors.append((p, truth, read))
            pairs = align(t, r)
            edits += sum(a != b for a, b in pairs)
            confusions.update((a, b) for a, b in pairs if a != b)
        if table and "".join(table.get(c, c) for c in t) == "".join(table.get(c, c) for c in r):
            merged_ok += 1
    n = len(truths)
    return EvalReport(n=n, accuracy=correct / max(n, 1), cer=edits / max(chars, 1), correct=correct,
                      char_errors=edits, chars=chars,
                      confusions=[(a or NOTHING, b or NOTHING, c) for (a, b), c in confusions.most_common()],
                      accuracy_merged=merged_ok / max(n, 1) if table else None, merge=merge,
                      ignore_case=ignore_case, errors=errors)
