"""A picture of a model's misreads: each wrong read's image beside what the model sees (the ink map
cropped to the text, at the model's height), with the truth and the read.

    python tools/error_gallery.py captcha_fast/pretrained/default.pt --package 160x60 --out docs/errors_pkg.png
    python tools/error_gallery.py MODEL --folder varlen=../shared/data/varlen_upper --out errors.png

The held-out sets are tools/accuracy_table.py's (a folder's validation split, the `captcha` package
renders of seed 12345); -n images are read, the first --show misreads (case ignored) are drawn."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import captcha_fast  # noqa: E402
from captcha_fast.preprocess import prepare_image, to_tensor  # noqa: E402

import accuracy_table  # noqa: E402

ROW_H, COL_W, TEXT_W = 64, 300, 170  # pixels of one row: the image and the model's input scaled to ROW_H


def _fit(grey: np.ndarray, width: int) -> Image.Image:
    """A uint8 (H, W) array scaled to ROW_H high (at most `width` wide), on a grey strip."""
    im = Image.fromarray(grey)
    w = max(1, round(im.width * ROW_H / im.height))
    im = im.resize((min(w, width), ROW_H), Image.BILINEAR)
    strip = Image.new("L", (width, ROW_H), 128)
    strip.paste(im, (0, 0))
    return strip


def gallery(model, images, labels, reads, show: int) -> Image.Image:
    wrong = [i for i, (t, r) in enumerate(zip(labels, reads)) if t.lower() != r.lower()][:show]
    sheet = Image.new("L", (2 * COL_W + TEXT_W, max(1, len(wrong)) * (ROW_H + 4)), 255)
    draw = ImageDraw.Draw(sheet)
    for row, i in enumerate(wrong):
        x = to_tensor(images[i])
        seen = prepare_image(x, model.height, model.in_channels, ink=model.ink)[0].numpy()
        y = row * (ROW_H + 4)
        sheet.paste(_fit(x.float().mean(0).numpy().astype(np.uint8), COL_W), (0, y))
        sheet.paste(_fit((seen * 255).astype(np.uint8), COL_W), (COL_W, y))
        draw.text((2 * COL_W + 8, y + 14), f"truth {labels[i]}", fill=0)
        draw.text((2 * COL_W + 8, y + 34), f"read  {reads[i] or '(nothing)'}", fill=0)
    return sheet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--folder", metavar="NAME=DIR", help="a labelled folder (its validation split)")
    group.add_argument("--package", metavar="WxH", help="`captcha` package renders at this size")
    p.add_argument("-n", type=int, default=300, help="images read")
    p.add_argument("--show", type=int, default=8, help="misreads drawn")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.folder:
        images, labels = accuracy_table.folder_val(args.folder.partition("=")[2], args.n)
    else:
        w, _, h = args.package.partition("x")
        images, labels = accuracy_table.package_renders(int(w), int(h), args.n)
    model = captcha_fast.load(args.model)
    reads = captcha_fast.predict_batch(images, model)
    wrong = sum(t.lower() != r.lower() for t, r in zip(labels, reads))
    gallery(model, images, labels, reads, args.show).save(args.out)
    print(f"{wrong} of {len(labels)} misread; the first {min(wrong, args.show)} in {args.out}")


if __name__ == "__main__":
    main()
