"""A gallery of the synthetic captcha styles and effects: a few samples each, with name and label.

    python tools/synth_gallery.py                          # -> docs/synth_gallery.png (pip fonts only)
    python tools/synth_gallery.py --font-dirs /usr/share/fonts/truetype /usr/share/fonts/opentype

A row per style of captcha_fast.synth.STYLES (without effects; its share of the mix in the
label), then a row per effect of EFFECTS (on every image of the mix there; its rate in the
label), drawn from SyntheticCaptchas (seeded: the same command draws the same gallery)."""
import argparse
import string
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from captcha_fast.synth import (EFFECTS, MIX, STYLES, SynthConfig, SyntheticCaptchas,  # noqa: E402
                                 effect_rates, mix_shares)


def gallery(out: Path, per_style: int, seed: int, font_dirs, styles, effects) -> None:
    shares, rates = mix_shares(), effect_rates()
    rows = [(f"{s} ({100 * shares.get(s, 0):.0f}%)", dict(style=s, effects="none")) for s in styles]
    rows += [(f"+{e} ({100 * rates[e]:.0f}%)", dict(style="mix", effects=e)) for e in effects]
    fig, axes = plt.subplots(len(rows), per_style, figsize=(2.6 * per_style, 0.95 * len(rows)),
                             gridspec_kw=dict(wspace=0.05, hspace=0.5), squeeze=False)
    for row, (name, kind) in enumerate(rows):
        config = SynthConfig(charset=string.digits + string.ascii_letters, min_len=4, max_len=8,
                             seed=seed + row, font_dirs=tuple(font_dirs), **kind)  # other labels per row
        captchas = SyntheticCaptchas(config, per_style)
        for col in range(per_style):
            image, label = captchas[col]
            ax = axes[row, col]
            ax.imshow(image, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)  # the images' own frames must show
            ax.set_title(f"{label}  {image.width}x{image.height}", fontsize=7, pad=2)
            if col == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fonts = "pip fonts" + (f" + {', '.join(font_dirs)}" if font_dirs else "")
    fig.suptitle(f"captcha_fast.synth styles (share of the mix) and effects (rate) (seed {seed}; {fonts})",
                 fontsize=9, y=0.91)
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
    p.add_argument("--effects", default=",".join(EFFECTS), help=f"comma-separated, from {list(EFFECTS)} ('' for none)")
    args = p.parse_args(argv)
    if args.per_style < 1:
        p.error(f"--per-style must be at least 1, got {args.per_style}")
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    effects = [e.strip() for e in args.effects.split(",") if e.strip()]
    unknown = [s for s in styles if s not in STYLES] + [e for e in effects if e not in EFFECTS]
    if unknown:
        p.error(f"unknown style(s) or effect(s) {unknown}; choose from {sorted(STYLES)} and {list(EFFECTS)}")
    if not styles + effects:
        p.error("nothing to draw: give --styles or --effects")
    gallery(args.out, args.per_style, args.seed, args.font_dirs, styles, effects)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
