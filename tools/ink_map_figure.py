"""The ink map on the cases that broke the first one: docs/ink_map.png.

    python tools/ink_map_figure.py                  # -> docs/ink_map.png

Rows: rendered captchas (a 1-px black frame, a dark-to-light gradient, text on 0.3% of the
pixels, the dot of an i, pale glyphs on white). Columns: the image; the previous map (background = the
median of the 1-px border, one colour for the image, stretched by the 99th percentile, with its
crop box); the current map (preprocess.to_ink) with its crop box (preprocess.ink_boxes)."""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from captcha_fast import preprocess, synth  # noqa: E402


def _font(size):
    return ImageFont.truetype(next(f for f in synth.pip_fonts() if f.endswith("DejaVuSans.ttf")), size)


def _cases():
    W, H = 200, 60
    framed = Image.new("RGB", (W, H), (225, 240, 200))
    ImageDraw.Draw(framed).text((30, 8), "4827", fill=(20, 20, 20), font=_font(34))
    ImageDraw.Draw(framed).rectangle([0, 0, W - 1, H - 1], outline=(0, 0, 0))
    ramp = np.linspace(40, 235, W).astype(np.uint8)[None, :, None].repeat(H, 0).repeat(3, 2)
    gradient = Image.fromarray(np.ascontiguousarray(ramp))
    ImageDraw.Draw(gradient).text((60, 8), "k7pw", fill=(200, 30, 30), font=_font(34))
    sparse = Image.new("RGB", (600, 300), "white")
    ImageDraw.Draw(sparse).text((260, 140), "a7k3", fill=(20, 20, 20), font=_font(14))
    dots = Image.new("RGB", (W, H), "white")
    ImageDraw.Draw(dots).text((15, 10), "wwwwwi", fill=(20, 20, 20), font=_font(30))
    pale = Image.new("RGB", (W, H), "white")
    ImageDraw.Draw(pale).text((30, 8), "x3fq", fill=(200, 200, 235), font=_font(34))
    return [("1-px frame", framed), ("gradient", gradient), ("0.3% ink", sparse), ("dots", dots), ("pale", pale)]


def previous_map(x):
    """The first ink map (1, C, H, W) -> (1, 1, H, W), and its crop box (top, bottom, left, right)."""
    C, H, W = x.shape[1:]
    border = torch.cat([x[0, :, 0, :], x[0, :, H - 1, :], x[0, :, :, 0], x[0, :, :, W - 1]], 1)
    ink = (x - border.median(1).values.view(1, C, 1, 1)).abs().amax(1, keepdim=True)
    strongest = ink.flatten().kthvalue(max(1, int(0.99 * ink.numel()))).values
    ink = torch.zeros_like(ink) if float(strongest) < 0.06 else (ink / strongest).clamp(0, 1)
    opened = F.max_pool2d(-F.max_pool2d(-ink, (3, 1), 1, (1, 0)), (3, 1), 1, (1, 0))
    mass = opened[0, 0] if float(opened.sum()) > 0 else ink[0, 0]
    if float(mass.sum()) <= 0:
        return ink, (0, H - 1, 0, W - 1)

    def span(m, lo, hi):
        cum = (m.cumsum(0) / m.sum()).tolist()
        return sum(c < lo for c in cum), min(sum(c < hi for c in cum), len(cum) - 1)
    (top, bottom), (left, right) = span(mass.sum(1), 0.02, 0.98), span(mass.sum(0), 0.01, 0.99)
    band = bottom - top + 1
    m, side = max(2, int(0.15 * band + 0.5)), max(2, int(0.25 * band + 0.5))
    return ink, (max(0, top - m), min(H - 1, bottom + m), max(0, left - side), min(W - 1, right + side))


def figure(out: Path) -> None:
    cases = _cases()
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 1.25 * len(cases)), gridspec_kw=dict(wspace=0.05, hspace=0.35))
    for col, title in enumerate(["image", "before: border median, 99th percentile", "now: local background"]):
        axes[0, col].set_title(title, fontsize=9)
    for row, (name, image) in enumerate(cases):
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
        old, old_box = previous_map(x)
        new = preprocess.to_ink(x)
        new_box = preprocess.ink_boxes(new)[0].tolist()
        axes[row, 0].imshow(image, interpolation="nearest")
        axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
        for ax, ink, (t, b, l, r) in ((axes[row, 1], old, old_box), (axes[row, 2], new, new_box)):
            ax.imshow(ink[0, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l + 1, b - t + 1, fill=False, ec="red", lw=1))
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("the ink map (red: the crop to the text)", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "ink_map.png")
    figure(parser.parse_args().out)
