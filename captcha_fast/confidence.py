"""Confidence: the probability that a read is right, from its score, calibrated on held-out reads.

A read's score is its label's log-probability under the model (beam search: summed over the
alignments the beam kept; greedy: the best path's). exp(score) is the model's own belief, and a
CTC model's belief is not a frequency: it is sharp on styles it knows and on styles it misreads.
So the confidence is a map fitted on labelled images the model never trained on (Platt scaling):

    confidence = sigmoid(slope * logit(exp(score)) + intercept),    slope >= 0

two numbers per decoder, monotone in the score, kept in the model file (formats.CALIBRATION_FILE in
a TorchScript .pt, the settings JSON of a .pt2, the "calibration" key of a training checkpoint).
A model without them (one saved before this existed, or trained without a validation split)
gives exp(score): the model's own, uncalibrated, probability. A hypothesis decoded from bare
log-probs (captcha_fast.decode) knows no model and carries NaN.

    reads = read_labelled(rec, images, labels, ignore_case=True)   # held-out images
    cal = fit_calibration(reads, source="v2 val split")             # -> Calibration
    reliability(apply(cal, "beam", reads["beam"].scores), reads["beam"].right)   # bins, ECE, >= 0.9 check

Why Platt and not isotonic regression: two numbers that travel in any file, a smooth monotone
map that does not overfit a few hundred reads, and it measured as well calibrated (docs/accuracy.md,
"Confidence"). The score alone is the feature: the gap to the second hypothesis would need
top_k >= 2 on every read."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

DECODERS = ("beam", "greedy")
_MAX_SCORE = -1e-6  # scores closer to 0 (float32 round-off of a sure read) count as this: logit <= 13.8
HIGH = 0.9  # the confidence the "reads at >= HIGH are right >= HIGH of the time" check is made at


@dataclass(frozen=True)
class Calibration:
    """P(right) = sigmoid(slope * logit(exp(score)) + intercept), per decoder, and what it was fitted on."""

    beam: tuple  # (slope, intercept)
    greedy: tuple  # (slope, intercept)
    n: int = 0  # reads fitted on
    source: str = ""  # which images

    def to_dict(self) -> dict:
        return {"method": "platt", **asdict(self), "beam": list(self.beam), "greedy": list(self.greedy)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Calibration"]:
        """None for None or {} (no calibration); ValueError for a method or shape this version cannot read."""
        if not d:
            return None
        if d.get("method") != "platt" or any(len(d.get(k, ())) != 2 for k in DECODERS):
            raise ValueError(f"unknown calibration {json.dumps(d)[:200]}: this captcha_fast reads method 'platt' "
                             f"with (slope, intercept) for beam and greedy")
        return cls(tuple(map(float, d["beam"])), tuple(map(float, d["greedy"])), int(d.get("n", 0)),
                   str(d.get("source", "")))

    @classmethod
    def from_json(cls, text: str) -> Optional["Calibration"]:
        return cls.from_dict(json.loads(text)) if text else None


def calibration_of(recognizer) -> Optional[Calibration]:
    """The calibration a loaded recognizer carries (formats.load_recognizer and load_program set it), or None."""
    return getattr(recognizer, "calibration", None)


def _logit_prob(scores: np.ndarray) -> np.ndarray:
    """logit(exp(score)) = score - log(1 - exp(score)), scores clipped to _MAX_SCORE; -inf stays -inf."""
    s = np.minimum(np.asarray(scores, dtype=np.float64), _MAX_SCORE)
    with np.errstate(divide="ignore"):
        return s - np.log(-np.expm1(s))


def apply(calibration: Optional[Calibration], decoder: str, scores: Sequence[float]) -> List[float]:
    """The confidence of reads with these scores, in [0, 1]; exp(score) without a calibration. A
    score of -inf (no label meets the constraints) has confidence 0."""
    s = np.asarray(scores, dtype=np.float64)
    if calibration is None:
        return np.exp(np.minimum(s, 0.0)).tolist()
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    slope, intercept = getattr(calibration, decoder)
    z = _logit_prob(s)
    with np.errstate(invalid="ignore", over="ignore"):
        conf = 1.0 / (1.0 + np.exp(-(slope * z + intercept)))
    return np.where(np.isneginf(s), 0.0, conf).tolist()


def fit_platt(scores: Sequence[float], right: Sequence[bool]) -> tuple:
    """(slope >= 0, intercept) of the logistic regression of right on logit(exp(score)), with Platt's
    targets (n+ + 1) / (n+ + 2) and 1 / (n- + 2), which keep it finite when every read is right or
    wrong. Newton's method; a negative slope (scores that say nothing) becomes 0: the base rate."""
    z = _logit_prob(np.asarray(scores, dtype=np.float64))
    y = np.asarray(right, dtype=bool)
    if z.shape != y.shape or z.ndim != 1:
        raise ValueError(f"scores and right must be two lists of one length, got {z.shape} and {y.shape}")
    keep = np.isfinite(z)  # a -inf score reads nothing: confidence 0 whatever the fit
    z, y = z[keep], y[keep]
    if len(z) == 0:
        raise ValueError("no reads with a finite score to fit the calibration on")
    n_pos = int(y.sum())
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (len(y) - n_pos + 2))
    X = np.stack([z, np.ones_like(z)], 1)

    def loss(w):
        m = X @ w
        return float(np.sum(np.logaddexp(0, m) - t * m))

    w = np.array([0.0, math.log(t.mean() / (1 - t.mean()))])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - t)
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        size, before = 1.0, loss(w)
        while loss(w - size * step) > before and size > 1e-8:  # backtracking: Newton may overshoot
            size /= 2
        w = w - size * step
        if np.abs(size * step).max() < 1e-10:
            break
    if w[0] < 0:
        base = t.mean()
        w = np.array([0.0, math.log(base / (1 - base))])
    return float(w[0]), float(w[1])


class Reads(NamedTuple):
    """Best reads of labelled images by one decoder: their scores and whether each is right."""

    texts: List[str]
    scores: List[float]
    right: List[bool]


def read_labelled(recognizer, images: Sequence[Tensor], labels: Sequence[str], *, ignore_case: bool = False,
                  batch_size: int = 64, beam_width: Optional[int] = None,
                  prepared: bool = False) -> Dict[str, Reads]:
    """decoder -> Reads of `images` by a loaded recognizer, for "beam" (its beam width, or
    `beam_width`) and "greedy" from one forward pass per batch. ignore_case: compare case-folded.
    prepared: the images are already the model's input ((C, height, W) as training's data set
    holds them: resized, ink-mapped), so the recognizer's own preprocessing is skipped."""
    from captcha_fast.preprocess import collate

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    beam_width = beam_width or int(recognizer.beam_width)
    out = {d: Reads([], [], []) for d in DECODERS}
    fold = str.casefold if ignore_case else (lambda s: s)
    device = getattr(recognizer, "device", None) or torch.device("cpu")
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = [img.to(device) for img in images[start:start + batch_size]]
            if prepared:
                batch, widths = collate(chunk, int(recognizer.height), int(recognizer.in_channels),
                                        int(recognizer.max_width))
            else:
                batch, widths = recognizer.preprocess(chunk)
            log_probs, lengths = recognizer.log_probs(batch, widths)
            for decoder in DECODERS:
                texts, scores = recognizer.decode(log_probs, lengths, decoder, beam_width if decoder == "beam" else 1, 1)
                reads = out[decoder]
                for text, score, label in zip(texts, scores[:, 0].tolist(), labels[start:start + batch_size]):
                    reads.texts.append(text[0])
                    reads.scores.append(score)
                    reads.right.append(fold(text[0]) == fold(label))
    return out


def fit_calibration(reads: Dict[str, Reads], source: str = "", groups: Optional[Sequence[str]] = None,
                    min_high: int = 10, paid_for: Optional[dict] = None) -> Calibration:
    """A Calibration fitted on read_labelled's reads (both decoders). groups: each read's set (its
    style): then each decoder's intercept is lowered, as little as needed, until every set with at
    least min_high reads at confidence >= HIGH keeps the promise on them (keeps_promise) -- made per
    style, not only on the pool (a style the model is overconfident on would break it), paid for with
    some under-confidence on the others. paid_for (a dict) receives each decoder's per_set_shift:
    (the shift, the sets it is paid for)."""
    fits = {}
    for d in DECODERS:
        slope, intercept = fit_platt(reads[d].scores, reads[d].right)
        if groups is not None:
            shift, broken = per_set_shift(slope, intercept, reads[d], groups, min_high)
            intercept -= shift
            if paid_for is not None:
                paid_for[d] = (shift, broken)
        fits[d] = (slope, intercept)
    return Calibration(fits["beam"], fits["greedy"], len(reads["beam"].scores), source)


def keeps_promise(right: int, n: int) -> bool:
    """Whether n reads at confidence >= HIGH, `right` of them right, keep the promise on the style they
    sample: the accuracy expected of its next such read (the posterior mean under a uniform prior,
    (right + 1) / (n + 2)) is at least HIGH. A dozen reads prove little: 12 of 13 right (92%) do not
    keep it, 10 of 10 do; at hundreds of reads it is the plain accuracy."""
    return (right + 1) / (n + 2) >= HIGH


def per_set_shift(slope: float, intercept: float, reads: Reads, groups: Sequence[str],
                  min_high: int) -> Tuple[float, List[str]]:
    """The least intercept shift (steps of 0.05, at most 20) after which every group keeps the >= HIGH
    promise (fewer than min_high reads at >= HIGH, or keeps_promise on them), and the groups that
    broke it one step before (what the shift is paid for)."""
    z = _logit_prob(np.asarray(reads.scores))
    right, groups = np.asarray(reads.right, bool), np.asarray(groups)
    if len(groups) != len(right):
        raise ValueError(f"{len(groups)} groups for {len(right)} reads")
    members = {str(g): groups == g for g in np.unique(groups)}
    broken: List[str] = []
    for shift in np.arange(0.0, 20.0, 0.05):
        with np.errstate(invalid="ignore"):
            high = slope * z + intercept - shift >= math.log(HIGH / (1 - HIGH))
        counts = {g: (int((high & m).sum()), int(right[high & m].sum())) for g, m in members.items()}
        failing = [g for g, (n, ok) in counts.items() if n >= min_high and not keeps_promise(ok, n)]
        if not failing:
            return float(shift), broken
        broken = failing
    return 20.0, broken


@dataclass
class Reliability:
    """How well confidences match accuracy on one set of reads."""

    n: int
    accuracy: float
    ece: float  # expected calibration error: sum over bins of |accuracy - mean confidence| * share of reads
    bins: List[dict]  # {"lo", "hi", "n", "confidence" (mean), "accuracy"}, the non-empty ones
    n_high: int  # reads with confidence >= HIGH
    accuracy_high: float  # their accuracy (NaN if none)

    @property
    def high_ok(self) -> bool:
        """Reads at confidence >= HIGH are right at least HIGH of the time (vacuously true when there are none)."""
        return self.n_high == 0 or self.accuracy_high >= HIGH


def reliability(confidences: Sequence[float], right: Sequence[bool], n_bins: int = 10) -> Reliability:
    """Reliability of confidences against right/wrong: equal-width bins over [0, 1], ECE, the >= HIGH check."""
    c = np.asarray(confidences, dtype=np.float64)
    y = np.asarray(right, dtype=bool)
    if c.shape != y.shape or len(c) == 0:
        raise ValueError(f"confidences and right must be two non-empty lists of one length, got {c.shape}, {y.shape}")
    index = np.minimum((c * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        member = index == b
        if member.any():
            conf, acc = float(c[member].mean()), float(y[member].mean())
            bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int(member.sum()), "confidence": conf,
                         "accuracy": acc})
            ece += abs(acc - conf) * member.mean()
    high = c >= HIGH
    return Reliability(len(c), float(y.mean()), float(ece), bins, int(high.sum()),
                       float(y[high].mean()) if high.any() else float("nan"))


def calibrate_file(model_path, images: Sequence[Tensor], labels: Sequence[str], *, source: str,
                   ignore_case: bool = False, prepared: bool = False, also: Sequence = ()) -> Calibration:
    """Fit the calibration of the recognizer file `model_path` on these held-out images and store it
    in the file (export.with_calibration) and in each file of `also` (e.g. its training checkpoint)."""
    from captcha_fast import export, formats

    recognizer = formats.load_recognizer(model_path, dtype="float32")
    reads = read_labelled(recognizer, images, labels, ignore_case=ignore_case, prepared=prepared)
    calibration = fit_calibration(reads, source)
    for path in (model_path, *also):
        export.with_calibration(path, calibration)
    return calibration
