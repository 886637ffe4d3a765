"""A gallery of the synthetic captcha styles: a few samples per style, with style name and label.

    python tools/synth_gallery.py                          # -> docs/synth_gallery.png (pip fonts only)
    python tools/synth_gallery.py --font-dirs /usr/share/fonts/truetype /usr/share/fonts/opentype

Each row is one style of captcha_fast.synth.STYLES, drawn from SyntheticCaptchas with that style
(seeded: the same command draws the same gallery)."""
import argparse
import string
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from captcha_fast.synth import MIX, STYLES, SynthConfig, SyntheticCaptchas  # noqa: E402


def gallery(out: Path, per_style: int, seed: int, font_dirs, styles) -> None:
    fig, axes = plt.subplots(len(styles), per_style, figsize=(2.6 * per_style, 0.95 * len(styles)),
                             gridspec_kw=dict(wspace=0.05, hspace=0.5))
    for row, name in enumerate(styles):
        config = SynthConfig(style=name, charset=string.digits + string.ascii_letters, min_len=4, max_len=8,
                             seed=seed + row, font_dirs=tuple(font_dirs))  # other labels per row
        captchas = SyntheticCaptchas(config, per_style)
        for col in range(per_style):
            image, label = captchas[col]
            ax = axes[row, col]
            ax.imshow(image, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}  {image.width}x{image.height}", fontsize=7, pad=2)
            if col == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fonts = "pip fonts" + (f" + {', '.join(font_dirs)}" if font_dirs else "")
    fig.suptitle(f"captcha_fast.synth styles (seed {seed}; {fonts})", fontsize=9, y=0.925)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/synth_gallery.png"))
    p.add_argument("--per-style", type=int, default=5, help="samples per style (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--font-dirs", nargs="*", default=[], help="extra font folders (e.g. Debian fonts-* packages)")
    p.add_argument("--styles", default=",".join(MIX), help=f"comma-separated, from {sorted(STYLES)}")
    args = p.parse_args(argv)
    if args.per_style < 1:
        p.error(f"--per-style must be at least 1, got {args.per_style}")
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        p.error(f"unknown style(s) {unknown}; choose from {sorted(STYLES)}")
    gallery(args.out, args.per_style, args.seed, args.font_dirs, styles)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
