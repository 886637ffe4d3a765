"""Can the `captcha` package's glyphs be told apart at all? A small CNN trained to tell symbols apart
from single glyphs drawn exactly as the package draws them (ImageCaptcha._draw_character: one of its
font sizes, its rotation and its warp, every choice seeded), then shrunk as the recognizer sees them
(the package's squeeze of text wider than the image, then about 0.55x to the model's 32-px band).
Its held-out accuracy is a floor on how well the symbols can be told apart, to set beside how often
the shipped model reads them (`tools/accuracy_table.py --symbols 0o1il`).

    python tools/glyph_separability.py --classes 0 oO --epochs 8
    python tools/glyph_separability.py --classes 0 oO --epochs 8 --crnn   # the recognizer's shape, CTC

Classes are strings of symbols (case matters to the package's font; the recognizer folds case):
`0 oO` asks "digit zero or letter o, either case?", each symbol drawn equally often.

In context, with a trained recognizer: where does CKPT decide between 0 and O, and could it do better
from what it is given? Whole package renders (0, O and o five times as likely as another symbol, render
seed 777, never trained on), read by CKPT; at each 0, O and o of a read of the label's length, the
head's choice at the frame that emits it, and a 32-px-wide crop of the model's own input around that
frame. The CNN above, trained on half of the 0 and O crops, scores the other half: how well the
recognizer's input tells 0 from O with neighbours, noise and squeeze as they come (a floor again).

    python tools/glyph_separability.py --in-context captcha_fast/pretrained/default.ckpt --images 30000 --epochs 12"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captcha_fast import preprocess, synth  # noqa: E402
from captcha_fast.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from captcha_fast.model import CRNN, CRNNConfig  # noqa: E402

CANVAS = 48  # a glyph at the model's scale is at most about 40 px
CONTEXT_SEED, CONTEXT_EXTRA = 777, "0Oo" * 4  # --in-context renders: 0, O and o 5x as likely, still 1:1:1
CROP = 32  # --in-context crops: input columns around the emitting frame (a glyph is about 15-25 px wide)


def glyph(symbol: str, rng: random.Random, squeeze: tuple, scale: float) -> np.ndarray:
    """One glyph as the package draws it, squeezed and scaled, centred on a CANVAS x CANVAS square."""
    gen = synth._package_generator(160, 60, None, synth._captcha_image.DEFAULT_FONTS[0])
    with synth._seeded_package(rng):
        drawn = gen._draw_character(symbol, ImageDraw.Draw(Image.new("RGB", (1, 1))), (0, 0, 0, 255))
    ink = drawn.split()[-1]
    sx = rng.uniform(*squeeze) * scale
    ink = ink.resize((max(1, round(ink.width * sx)), max(1, round(ink.height * scale))), Image.BILINEAR)
    a = np.asarray(ink, dtype=np.float32)[:CANVAS, :CANVAS] / 255
    out = np.zeros((CANVAS, CANVAS), np.float32)
    y, x = (CANVAS - a.shape[0]) // 2, (CANVAS - a.shape[1]) // 2
    out[y:y + a.shape[0], x:x + a.shape[1]] = a
    return out


def make_set(classes: list, start: int, n: int, squeeze: tuple, scale: float):
    xs, ys = [], []
    for i in range(start, start + n):
        rng = random.Random(f"glyph_separability:{i}")
        k = rng.randrange(len(classes))
        xs.append(glyph(rng.choice(classes[k]), rng, squeeze, scale))
        ys.append(k)
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def classifier(n_classes: int) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 96),
                         nn.MaxPool2d(2), *block(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, n_classes))


class GlyphCRNN(nn.Module):
    """The shipped recognizer's shape (32/64 channels, GRU 192) on the glyph canvas, trained with CTC
    on one-symbol labels; its class is the symbol with the strongest frame."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.net = CRNN(CRNNConfig(charset="".join(map(str, range(n_classes))), height=CANVAS, channels=(32, 64),
                                   hidden_dim=192, ink=True))

    def forward(self, x):
        log_probs, _ = self.net(x, torch.full((len(x),), CANVAS, dtype=torch.long))  # (T, N, 1 + classes)
        return log_probs[:, :, 1:].max(0).values

    def loss(self, x, y):
        log_probs, widths = self.net(x, torch.full((len(x),), CANVAS, dtype=torch.long))
        return F.ctc_loss(log_probs, (y + 1)[:, None], widths, torch.ones_like(y), zero_infinity=True)


def spike_frames(best: list) -> list:
    """The frames where a greedy CTC path emits a symbol (a new non-blank class)."""
    return [t for t, c in enumerate(best) if c != 0 and (t == 0 or c != best[t - 1])]


def in_context(ckpt_path: str, n: int, batch: int = 64):
    """CKPT's reads of n package renders: per 0/O/o glyph of reads of the label's length, (symbol,
    whether the head preferred the right one of 0 and o at its frame, CROP x height input crop)."""
    model = model_from_checkpoint(load_checkpoint(ckpt_path)).eval()
    cfg = model.config
    zero, oh = cfg.charset.index("0") + 1, cfg.charset.index("o") + 1  # class 0 is the blank
    found = []
    for start in range(0, n, batch):
        texts, images = [], []
        for i in range(start, min(n, start + batch)):
            image, text = synth.package_captcha(CONTEXT_SEED, i, synth.PACKAGE_SIZES[i % len(synth.PACKAGE_SIZES)],
                                                synth.DIGITS_LETTERS + CONTEXT_EXTRA)
            texts.append(text)
            images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        x, widths = preprocess.collate(images, cfg.height, cfg.in_channels, ink=cfg.ink)
        with torch.no_grad():
            log_probs, lengths = model(x, widths)
        padded = F.pad(x[:, 0], (CROP // 2, CROP // 2))
        for j, text in enumerate(texts):
            frames = spike_frames(log_probs[: lengths[j], j].argmax(-1).tolist())
            if len(frames) != len(text):
                continue
            for t, symbol in zip(frames, text):
                if symbol in "0Oo":
                    prefers_zero = bool(log_probs[t, j, zero] > log_probs[t, j, oh])
                    centre = 4 * t + 2  # frame t pools input columns 4t..4t+3
                    found.append((symbol, prefers_zero == (symbol == "0"), padded[j, :, centre: centre + CROP]))
    return found


def fit(net: nn.Module, loss_fn, x, y, xt, yt, epochs: int, names: list, jitter: int = 0) -> None:
    """Train net on (x, y) with AdamW and a one-cycle schedule; per epoch, its held-out accuracy on (xt, yt).
    jitter: each batch shifted sideways by up to this many px (a crop's centre is only near the glyph's)."""
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    steps = len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * steps)
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(x))
        for b in range(steps):
            idx = order[b * 128:(b + 1) * 128]
            shift = int(torch.randint(-jitter, jitter + 1, ())) if jitter else 0
            loss = loss_fn(net, torch.roll(x[idx], shift, -1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xt[i:i + 512]).argmax(1) for i in range(0, len(xt), 512)])
        per_class = " ".join(f"{c}: {(pred[yt == k] == k).float().mean():.3f}" for k, c in enumerate(names))
        print(f"epoch {epoch}: held-out accuracy {(pred == yt).float().mean():.4f} ({per_class})", flush=True)


def report_in_context(args) -> None:
    found = in_context(args.in_context, args.images)
    for symbol in "0Oo":
        right = [ok for s, ok, _ in found if s == symbol]
        print(f"{symbol}: the head prefers the right one of 0 and o at {sum(right)} of {len(right)} "
              f"({sum(right) / max(1, len(right)):.3f})")
    big = [f for f in found if f[0] in "0O"]
    half = len(big) // 2
    print(f"0 against O: the head {sum(f[1] for f in big[half:]) / max(1, len(big) - half):.4f} on the CNN's "
          f"held-out half ({len(big) - half} glyphs); the CNN on {half} crops of the model's input:", flush=True)
    if args.head_only or not big:
        return
    x = torch.stack([f[2] for f in big])[:, None]
    y = torch.tensor([int(f[0] == "O") for f in big])
    fit(classifier(2), lambda net, xb, yb: F.cross_entropy(net(xb), yb), x[:half], y[:half], x[half:], y[half:],
        args.epochs, ["0", "O"], jitter=3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", nargs="+", default=["0", "oO"], help="each a string of symbols (default: 0 oO)")
    p.add_argument("--train", type=int, default=30000, help="training glyphs")
    p.add_argument("--test", type=int, default=6000, help="held-out glyphs (their own seeds)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--squeeze", type=float, nargs=2, default=(0.55, 1.0), metavar=("MIN", "MAX"),
                   help="the package's horizontal squeeze of wide text, drawn per glyph")
    p.add_argument("--scale", type=float, default=0.55, help="then both ways: 0.55 is 60 px to a 32-px band")
    p.add_argument("--crnn", action="store_true", help="train the recognizer's shape (CTC) instead of the CNN")
    p.add_argument("--in-context", metavar="CKPT", default=None,
                   help="instead: CKPT's choices between 0 and O in whole renders, and the CNN on its input crops")
    p.add_argument("--images", type=int, default=30000, help="--in-context: package renders read")
    p.add_argument("--head-only", action="store_true", help="--in-context: only the head's choices (no CNN)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.in_context:
        return report_in_context(args)
    x, y = make_set(args.classes, 0, args.train, tuple(args.squeeze), args.scale)
    xt, yt = make_set(args.classes, 10 ** 7, args.test, tuple(args.squeeze), args.scale)
    net = GlyphCRNN(len(args.classes)) if args.crnn else classifier(len(args.classes))
    loss_fn = (lambda net, xb, yb: net.loss(xb, yb)) if args.crnn else \
        (lambda net, xb, yb: F.cross_entropy(net(xb), yb))
    fit(net, loss_fn, x, y, xt, yt, args.epochs, args.classes)


if __name__ == "__main__":
    main()
