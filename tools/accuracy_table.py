"""Accuracy of recognizers on the README's held-out sets, case-insensitive, as one table.

    python tools/accuracy_table.py MODEL [MODEL ...] --folder v2=../shared/data/captcha_images_v2 \
        --folder varlen=../shared/data/varlen_upper -n 300 --json acc.json \
        --manifest thsr=../shared/data/real/thsr/val.tsv --manifest tii=../shared/data/real/tii/all.tsv

Sets (the same as tools/compare_ddddocr.py's, so the peer's numbers sit beside ours):
  NAME (val split)          a labelled folder's validation split (data.split_samples: 15%, seed 0 —
                            what `captcha-fast train` holds out), first n in name order
  NAME (manifest)           n images of a path<TAB>label manifest (tools/real_sets.py writes each real
                            set's val.tsv and all.tsv), picked by real_sets.manifest_sample
  captcha package WxH       fresh `captcha` package images (its defaults), 0-9a-zA-Z, 4-6 long,
                            render seed 12345 (never used for training)
  synth STYLE               each synthetic style, 0-9a-zA-Z, 4-8 long, render seed 12345
Scores: whole-captcha accuracy ignoring case, and the same with 0/O and 1/I/l merged. --known adds a
read that knows what a user of that site knows: its alphabet and its label lengths (predict_batch's
allowed=, min_length=, max_length=; taken from the set's own labels, case-folded). --symbols 0o1il adds a
table of how often each of those symbols is read right where it stands (case folded, in reads of the
label's length): where the merged score only says 0/O, this says which of the two the model gets wrong."""
from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import captcha_fast
from captcha_fast import synth
from captcha_fast.data import list_samples, split_samples
from captcha_fast.preprocess import load_image

LETTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase
PACKAGE_SIZES = ((160, 60), (200, 50), (280, 90))
MERGE = str.maketrans("oil", "011")  # after lower(): o->0, i and l->1


def folder_val(folder: str, n: int, val_fraction: float = 0.15, seed: int = 0):
    _, val = split_samples(list_samples(folder), val_fraction, seed)
    val = sorted(val, key=lambda s: Path(s.path).name)[:n]
    return [load_image(s.path) for s in val], [s.label for s in val]


def package_renders(width: int, height: int, n: int, seed: int = 12345):
    items = [synth.package_captcha(seed, i, (width, height), LETTERS) for i in range(n)]
    return [im for im, _ in items], [t for _, t in items]


def style_renders(style: str, n: int, seed: int = 12345, font_dirs=()):
    items = list(synth.SyntheticCaptchas(synth.SynthConfig(style=style, charset=LETTERS, min_len=4, max_len=8,
                                                           seed=seed, font_dirs=tuple(font_dirs)), n))
    return [im for im, _ in items], [t for _, t in items]


def manifest_items(tsv: str, n: int):
    import real_sets  # tools/real_sets.py, beside this file

    items = real_sets.manifest_sample(tsv, n)
    return [load_image(path) for path, _ in items], [label for _, label in items]


def held_out_sets(folders, n: int, styles, font_dirs=(), manifests=(), package=True):
    sets = {f"{name} (val split)": folder_val(path, n) for name, path in folders}
    sets.update({f"{name} (manifest)": manifest_items(path, n) for name, path in manifests})
    for w, h in PACKAGE_SIZES if package else ():
        sets[f"captcha package {w}x{h}"] = package_renders(w, h, n)
    for style in styles:
        sets[f"synth {style}"] = style_renders(style, n, font_dirs=font_dirs)
    return sets


def score(reads, labels):
    right = sum(r.lower() == t.lower() for r, t in zip(reads, labels))
    merged = sum(r.lower().translate(MERGE) == t.lower().translate(MERGE) for r, t in zip(reads, labels))
    return right / len(labels), merged / len(labels)


def symbol_recall(reads, labels, symbols: str) -> dict:
    """symbol -> (read right, seen): each symbol of `symbols` where it stands in a label whose read has
    the label's length (a read of another length has no position to compare), case folded."""
    right, seen = dict.fromkeys(symbols, 0), dict.fromkeys(symbols, 0)
    for read, label in zip(reads, labels):
        read, label = read.lower(), label.lower()
        if len(read) == len(label):
            for want, got in zip(label, read):
                if want in seen:
                    seen[want] += 1
                    right[want] += got == want
    return {c: (right[c], seen[c]) for c in symbols}


def known_format(labels) -> dict:
    """predict_batch's arguments for a site whose captchas use the labels' symbols and lengths."""
    lengths = [len(t) for t in labels]
    return dict(allowed="".join(sorted(set("".join(labels).lower()))), min_length=min(lengths),
                max_length=max(lengths))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="recognizer files (.pt / .pt2)")
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--manifest", action="append", default=[], metavar="NAME=TSV")
    p.add_argument("-n", type=int, default=300, help="images per set")
    p.add_argument("--styles", default=None, help="synthetic styles, comma-separated (default: the mix)")
    p.add_argument("--font-dirs", nargs="*", default=[d for d in synth.DEBIAN_FONT_DIRS if Path(d).is_dir()],
                   help="extra font folders for the synthetic styles (default: the Debian ones present, as the "
                        "shipped model's build and compare_ddddocr.py's README run use)")
    p.add_argument("--no-synth", action="store_true", help="skip the package renders and synthetic styles")
    p.add_argument("--known", action="store_true",
                   help="also read each set knowing its alphabet and label lengths (a column per model)")
    p.add_argument("--symbols", default="", help="also tabulate how often each of these symbols is read right, "
                                                  "e.g. 0o1il (lower case)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    symbols = args.symbols.lower()
    folders = [tuple(spec.split("=", 1)) for spec in args.folder]
    styles = [] if args.no_synth else args.styles.split(",") if args.styles else list(synth.MIX)
    manifests = [tuple(spec.split("=", 1)) for spec in args.manifest]
    sets = held_out_sets(folders, args.n, styles, args.font_dirs, manifests, package=not args.no_synth)
    rows = []
    columns = [Path(m).name for m in args.models] + [f"{Path(m).name}, known alphabet and lengths"
                                                     for m in args.models if args.known]
    print("| set | images | " + " | ".join(columns) + " |\n|---|---:|" + "---:|" * len(columns))
    for name, (images, labels) in sets.items():
        row = dict(set=name, images=len(labels), models={})
        known = known_format(labels) if args.known else None
        for m in args.models:
            t0 = time.perf_counter()
            reads = captcha_fast.predict_batch(images, m, device="cpu")
            acc, merged = score(reads, labels)
            row["models"][m] = dict(accuracy=acc, accuracy_merged=merged, seconds=time.perf_counter() - t0,
                                    misses=[(t, r) for t, r in zip(labels, reads) if t.lower() != r.lower()][:5])
            if symbols:
                row["models"][m]["symbols"] = symbol_recall(reads, labels, symbols)
            if known:
                reads = captcha_fast.predict_batch(images, m, device="cpu", **known)
                row["models"][m].update(known=known, accuracy_known=score(reads, labels)[0])
        rows.append(row)
        got = [row["models"][m] for m in args.models]
        cells = " | ".join([f"{100 * g['accuracy']:.1f}% ({100 * g['accuracy_merged']:.1f}%)" for g in got]
                           + [f"{100 * g['accuracy_known']:.1f}%" for g in got if args.known])
        print(f"| {name} | {len(labels)} | {cells} |", flush=True)
    synth_rows = [r for r in rows if r["set"].startswith("synth ")]
    if synth_rows:
        cells = " | ".join(f"{100 * sum(r['models'][m]['accuracy'] for r in synth_rows) / len(synth_rows):.1f}%"
                           for m in args.models)
        print(f"| mean of {len(synth_rows)} synthetic styles | | {cells} |")
    if symbols:
        print("\n| set | model | " + " | ".join(symbols) + " |\n|---|---|" + "---:|" * len(symbols))
        for row in rows:
            for m in args.models:
                recall = row["models"][m]["symbols"]
                print(f"| {row['set']} | {Path(m).name} | "
                      + " | ".join(f"{r}/{n}" if n else "-" for r, n in recall.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(dict(n=args.n, case_insensitive=True, rows=rows), indent=1))


if __name__ == "__main__":
    main()
