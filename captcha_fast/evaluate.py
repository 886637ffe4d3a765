"""Evaluate a recognizer on labelled images: accuracy, character error rate, confusions, a gallery.

    captcha-fast eval MODEL DATA [--json] [--gallery misreads.png]
    DATA: a folder of LABEL.png / LABEL_x.png, a .tsv manifest (path<TAB>label), or `synthetic`

    from captcha_fast.evaluate import evaluate
    report = evaluate(recognizer, images, labels)   # -> EvalReport

CER = sum of edit distances / sum of label lengths. Confusions are the substitutions
of an edit-distance alignment of each misread (truth symbol -> read symbol)."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class EvalReport:
    n: int                               # images evaluated
    accuracy: float                      # whole captcha right, 0-1
    cer: float                           # character error rate
    correct: int
    char_errors: int                     # summed edit distance
    chars: int                           # summed label length
    confusions: List[Tuple[str, str, int]] = field(default_factory=list)  # (truth, read, count), most first
    accuracy_merged: Optional[float] = None  # with look-alike groups (e.g. 0/O, 1/I) merged
    merge: Optional[str] = None
    errors: List[Tuple[str, str, str]] = field(default_factory=list)      # (path, truth, read) of misreads
    seconds: float = 0.0

    def to_json(self, max_errors: int = 50) -> dict:
        d = asdict(self)
        d["confusions"] = [{"truth": t, "read": r, "count": c} for t, r, c in self.confusions]
        d["errors"] = [{"path": p, "truth": t, "read": r} for p, t, r in self.errors[:max_errors]]
        return d


def align(truth: str, read: str) -> List[Tuple[str, str]]:
    """Edit-distance alignment as (truth symbol or '', read symbol or '') pairs."""
    n, m = len(truth), len(read)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
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


def merge_table(groups: str) -> Dict[str, str]:
    """'0O,1I' -> {'O': '0', 'I': '1'}: every symbol of a group maps to the group's first."""
    table = {}
    for group in groups.split(","):
        for ch in group[1:]:
            table[ch] = group[0]
    return table


def score(truths: Sequence[str], reads: Sequence[str], paths: Optional[Sequence[str]] = None,
          merge: Optional[str] = None) -> EvalReport:
    """The report of reads against truths (no model involved)."""
    if len(truths) != len(reads):
        raise ValueError(f"{len(truths)} labels but {len(reads)} reads")
    paths = list(paths) if paths is not None else [str(i) for i in range(len(truths))]
    confusions: Counter = Counter()
    correct = edits = chars = merged_ok = 0
    errors = []
    table = merge_table(merge) if merge else {}
    for p, t, r in zip(paths, truths, reads):
        chars += len(t)
        if t == r:
            correct += 1
        else:
            errors.append((p, t, r))
            pairs = align(t, r)
            edits += sum(a != b for a, b in pairs)
            confusions.update((a, b) for a, b in pairs if a != b)
        if table and "".join(table.get(c, c) for c in t) == "".join(table.get(c, c) for c in r):
            merged_ok += 1
    n = len(truths)
    return EvalReport(n=n, accuracy=correct / max(n, 1), cer=edits / max(chars, 1), correct=correct,
                      char_errors=edits, chars=chars,
                      confusions=[(a or "∅", b or "∅", c) for (a, b), c in confusions.most_common()],
                      accuracy_merged=merged_ok / max(n, 1) if table else None, merge=merge, errors=errors)


def predict(recognizer, images: Sequence, batch_size: int = 64, decoder: Optional[str] = None,
            beam_width: Optional[int] = None) -> List[str]:
    """Texts read by a recognizer (scripted or eager) from (C, H, W) tensors, in batches."""
    decoder = decoder or recognizer.decoder
    beam_width = beam_width or recognizer.beam_width
    reads: List[str] = []
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            texts, _ = recognizer.recognize(list(images[k:k + batch_size]), decoder, beam_width, 1)
            reads.extend(t[0] for t in texts)
    return reads


def evaluate(recognizer, images: Sequence[Tensor], labels: Sequence[str], paths: Optional[Sequence[str]] = None,
             batch_size: int = 64, decoder: Optional[str] = None, beam_width: Optional[int] = None,
             merge: Optional[str] = None) -> EvalReport:
    t0 = time.perf_counter()
    reads = predict(recognizer, images, batch_size, decoder, beam_width)
    report = score(labels, reads, paths, merge)
    report.seconds = time.perf_counter() - t0
    return report


def gallery(images: Sequence[Tensor], errors: Sequence[Tuple[int, str, str]], path, max_items: int = 48,
            height: int = 50) -> Path:
    """A PNG of misread images, each with its truth and read text (PIL only).

    errors: (index into images, truth, read)."""
    from PIL import Image, ImageDraw
    rows = []
    for idx, truth, read in list(errors)[:max_items]:
        t = images[idx]
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.shape[0] == 4:  # RGBA on white
            t = t[:3] * t[3:4] + (1 - t[3:4])
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        im = Image.fromarray((t.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy(), "RGB")
        im = im.resize((max(1, round(im.width * height / im.height)), height))
        rows.append((im, truth, read))
    text_w = 260
    W = max([im.width for im, _, _ in rows], default=100) + text_w + 20
    H = max(1, len(rows)) * (height + 6) + 24
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    d.text((8, 6), f"{len(rows)} misread images: truth -> read" if rows else "no misread images", fill="black")
    y = 24
    for im, truth, read in rows:
        canvas.paste(im, (8, y))
        d.text((im.width + 20, y + height // 2 - 12), f"truth {truth}", fill=(0, 110, 0))
        d.text((im.width + 20, y + height // 2 + 2), f"read  {read or '(nothing)'}", fill=(190, 0, 0))
        y += height + 6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------- loading data

def load_labelled(data: str, skip_bad: bool = False, synth_n: int = 1000, synth_seed: int = 12345,
                  synth_min_len: int = 4, synth_max_len: int = 8,
                  synth_charset: str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", split: str = "all",
                  val_fraction: float = 0.15, seed: int = 0) -> Tuple[List[Tensor], List[str], List[str]]:
    """(images as (C, H, W) uint8 tensors, labels, paths) of a folder, a manifest or `synthetic`;
    split "train"/"val" keeps that side of training's split (same val_fraction and seed)."""
    from captcha_fast.preprocess import from_pil as _from_pil, load_image
    if data == "synthetic":
        from captcha_fast.synth import SynthConfig, SyntheticCaptchas
        gen = SyntheticCaptchas(SynthConfig(charset=synth_charset, min_len=synth_min_len, max_len=synth_max_len,
                                            seed=synth_seed), synth_n)
        images, labels, paths = [], [], []
        for i, (im, text) in enumerate(gen):
            images.append(_from_pil(im, f"synthetic:{synth_seed}:{i}"))
            labels.append(text)
            paths.append(f"synthetic:{synth_seed}:{i}")
        return images, labels, paths
    from captcha_fast.data import list_samples, split_samples
    samples = list_samples(data)
    if split != "all":
        train, val = split_samples(samples, val_fraction, seed)
        samples = val if split == "val" else train
        if not samples:
            raise ValueError(f"the {split} split of {data!r} (val fraction {val_fraction}, seed {seed}) is empty")
    images, labels, paths = [], [], []
    for s in samples:
        try:
            images.append(load_image(s.path))
        except (ValueError, FileNotFoundError) as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping: {e}")
            continue
        labels.append(s.label)
        paths.append(s.path)
    return images, labels, paths


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    if not parser.description:
        parser.description = ("Accuracy, character error rate and confusions of a recognizer on labelled images. "
                              "Example: captcha-fast eval runs/v2/model.pt captchas/ --json")
    a = parser.add_argument
    a("model", help="a TorchScript recognizer (.pt, e.g. RUN_DIR/model.pt)")
    a("data", help="folder of LABEL.png files, a .tsv manifest (path<TAB>label), or `synthetic`")
    a("--json", action="store_true", help="print one JSON object (n, accuracy, cer, confusions, ...)")
    a("--gallery", default=None, help="write a PNG of misread images with truth and read text here")
    a("--greedy", action="store_true", help="greedy decoding (default: the model's own decoder)")
    a("--beam", type=int, default=None, help="beam width (default: the model's)")
    a("--batch-size", type=int, default=64)
    a("--merge", default=None, help="also report accuracy with look-alikes merged, e.g. '0O,1I'")
    a("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    a("--split", default="all", choices=["all", "train", "val"],
      help="evaluate one side of the training split (same --val-fraction and --seed as `train`)")
    a("--val-fraction", type=float, default=0.15)
    a("--seed", type=int, default=0, help="split seed")
    a("--device", default=None, help="cpu (default) or cuda")
    a("--synth-n", type=int, default=1000, help="synthetic: how many captchas")
    a("--synth-seed", type=int, default=12345, help="synthetic: render seed (training uses 0 and 1000000)")
    a("--synth-min-len", type=int, default=4)
    a("--synth-max-len", type=int, default=8)
    a("--synth-charset", default="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def run(args) -> None:
    from captcha_fast.api import load
    rec = load(args.model, device=args.device or "cpu")
    images, labels, paths = load_labelled(args.data, args.skip_bad, args.synth_n, args.synth_seed,
                                          args.synth_min_len, args.synth_max_len, args.synth_charset,
                                          args.split, args.val_fraction, args.seed)
    unknown = "".join(sorted(set("".join(labels)) - set(rec.charset)))
    if unknown:
        warnings.warn(f"labels use symbols the model cannot read: {unknown!r} (they count as errors)")
    report = evaluate(rec, images, labels, paths, args.batch_size, "greedy" if args.greedy else None, args.beam,
                      args.merge)
    if args.gallery:
        index = {p: i for i, p in enumerate(paths)}
        gallery(images, [(index[p], t, r) for p, t, r in report.errors], args.gallery)
    if args.json:
        print(json.dumps(report.to_json()))
        return
    print(f"{report.n} images: accuracy {report.accuracy:.4f} ({report.correct}/{report.n}), "
          f"CER {report.cer:.4f} ({report.char_errors}/{report.chars} chars), {report.seconds:.1f}s")
    if report.accuracy_merged is not None:
        print(f"accuracy with {report.merge} merged: {report.accuracy_merged:.4f}")
    if report.confusions:
        print("most confused (truth -> read): " + ", ".join(f"{t}->{r} x{c}" for t, r, c in report.confusions[:10]))
    if args.gallery:
        print(f"gallery of misreads: {args.gallery}")


def main(argv=None) -> int:
    """`python -m captcha_fast.evaluate` (as torchrun needs): the `captcha-fast eval` command."""
    from captcha_fast.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
