"""Can the `captcha` package's glyphs be told apart at all? A small CNN trained to tell symbols apart
from single glyphs drawn exactly as the package draws them (ImageCaptcha._draw_character: one of its
font sizes, its rotation and its warp, every choice seeded), then shrunk as the recognizer sees them
(the package's squeeze of text wider than the image, then about 0.55x to the model's 32-px band).
Its held-out accuracy is a floor on how well the symbols can be told apart, to set beside how often
the shipped model reads them (`tools/accuracy_table.py --symbols 0o1il`).

    python tools/glyph_separability.py --classes 0 oO --epochs 8
    python tools/glyph_separability.py --classes 0 oO --epochs 8 --crnn   # the recognizer's shape, CTC

Classes are strings of symbols (case matters to the package's font; the recognizer folds case):
`0 oO` asks "digit zero or letter o, either case?", each symbol drawn equally often."""
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
from captcha_fast import synth  # noqa: E402
from captcha_fast.model import CRNN, CRNNConfig  # noqa: E402

CANVAS = 48  # a glyph at the model's scale is at most about 40 px


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
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x, y = make_set(args.classes, 0, args.train, tuple(args.squeeze), args.scale)
    xt, yt = make_set(args.classes, 10 ** 7, args.test, tuple(args.squeeze), args.scale)
    net = GlyphCRNN(len(args.classes)) if args.crnn else classifier(len(args.classes))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    steps = len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.epochs * steps)
    for epoch in range(1, args.epochs + 1):
        net.train()
        order = torch.randperm(len(x))
        for b in range(steps):
            idx = order[b * 128:(b + 1) * 128]
            loss = net.loss(x[idx], y[idx]) if args.crnn else F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xt[i:i + 512]).argmax(1) for i in range(0, len(xt), 512)])
        per_class = " ".join(f"{c}: {(pred[yt == k] == k).float().mean():.3f}" for k, c in enumerate(args.classes))
        print(f"epoch {epoch}: held-out accuracy {(pred == yt).float().mean():.4f} ({per_class})", flush=True)


if __name__ == "__main__":
    main()
