"""Evaluate a recognizer on labelled images: accuracy, character error rate, confusions.

    from captcha_fast.evaluate import evaluate, load_labelled
    images, labels, paths = load_labelled("captchas/", split="val")   # training's held-out split
    report = evaluate(captcha_fast.load("runs/a/model.pt"), images, labels, paths)   # -> EvalReport

Scoring is captcha_fast.metrics.score, the scorer training validates with."""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from captcha_fast import preprocess
from captcha_fast.api import predict_batch
from captcha_fast.data import list_samples, load_samples, split_samples
from captcha_fast.metrics import EvalReport, score


def evaluate(recognizer, images: Sequence[Tensor], labels: Sequence[str], paths: Optional[Sequence[str]] = None,
             batch_size: int = 64, decoder: Optional[str] = None, beam_width: Optional[int] = None,
             merge: Optional[str] = None, ignore_case: bool = False) -> EvalReport:
    """Read `images` with a loaded recognizer (captcha_fast.load: .pt or .pt2) and score the reads
    against `labels`. decoder/beam_width: default the recognizer's own."""
    t0 = time.perf_counter()
    reads = predict_batch(list(images), recognizer, decoder=decoder or recognizer.decoder,
                          beam_width=beam_width or recognizer.beam_width, batch_size=batch_size)
    report = score(labels, reads, paths, merge, ignore_case)
    report.seconds = time.perf_counter() - t0
    return report


def load_labelled(data: str, skip_bad: bool = False, split: str = "all", val_fraction: float = 0.15, seed: int = 0,
                  synth=None, synth_n: int = 1000) -> Tuple[List[Tensor], List[str], List[str]]:
    """(images as (C, H, W) uint8 tensors, labels, paths) of a folder, a .tsv manifest, or
    `synthetic` (synth_n captchas of the SynthConfig `synth`). split "train"/"val" keeps that
    side of training's split (the same val_fraction and seed as the training run)."""
    if data == "synthetic":
        from captcha_fast.synth import SyntheticCaptchas
        paths = [f"synthetic:{synth.seed}:{i}" for i in range(synth_n)]
        images, labels = [], []
        for path, (image, text) in zip(paths, SyntheticCaptchas(synth, synth_n)):
            images.append(preprocess.from_pil(image, path))
            labels.append(text)
        return images, labels, paths
    samples = list_samples(data)
    if split != "all":
        train, val = split_samples(samples, val_fraction, seed)
        samples = val if split == "val" else train
        if not samples:
            raise ValueError(f"the {split} split of {data!r} (val fraction {val_fraction}, seed {seed}) is empty")
    samples, images = load_samples(samples, skip_bad)
    return images, [s.label for s in samples], [s.path for s in samples]
