"""ddddocr (the pip OCR peer) on our validation splits, fresh `captcha` package renders and each
synthetic style: case-insensitive whole-captcha accuracy.

Runs in its own venv, without torch (ddddocr pulls onnxruntime; captcha_fast's synth.py is
imported by path, so the package and torch are not needed):

    python3.11 -m venv /work/venv-ddddocr
    /work/venv-ddddocr/bin/pip install ddddocr captcha matplotlib
    OMP_NUM_THREADS=1 /work/venv-ddddocr/bin/python tools/compare_ddddocr.py \\
        --folder v2=../shared/data/captcha_images_v2 --folder varlen=../shared/data/varlen_upper \\
        --manifest tii=../shared/data/real/tii/all.tsv --manifest sysu=../shared/data/real/sysu/all.tsv \
        -n 300 --json ddddocr.json

Folders: LABEL.png / LABEL_x.png files; only the validation split is read, by the rule of
captcha_fast.data.split_samples (sha256 of f"{seed}:{file name}" as a fraction < val_fraction),
so the numbers are on the same held-out images as ours. Manifests (path<TAB>label, tools/real_sets.py's
val.tsv / all.tsv): n images in real_sets.manifest_sample's order (the sha256 of the path as written),
as tools/accuracy_table.py and tools/build_pretrained.py pick them. Nothing is copied anywhere.
ddddocr is scored as a user calls it (classification(png bytes)), and again restricted to the
symbols 0-9a-zA-Z (set_ranges), its option for a known charset; --known adds a third read restricted
to the set's own alphabet (its labels' symbols, both cases), as tools/accuracy_table.py --known reads
ours (ddddocr has no option for the length)."""
import argparse
import hashlib
import importlib.util
import io
import json
import string
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PACKAGE_SIZES = ((160, 60), (200, 50), (280, 90))
LETTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase


def load_synth():
    """captcha_fast/synth.py as a module of its own (no captcha_fast package, no torch)."""
    spec = importlib.util.spec_from_file_location("captcha_fast_synth", ROOT / "captcha_fast" / "synth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def in_val(name: str, val_fraction: float, seed: int) -> bool:
    """captcha_fast.data.split_samples' rule, for one file name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction


def label_from_name(path: Path) -> str:
    stem = path.stem
    cut = min((i for i in (stem.find("_"), stem.find("-")) if i >= 0), default=len(stem))
    return stem[:cut]


def folder_val(folder: Path, val_fraction: float, seed: int, n: int):
    """(png bytes, label) of the first n validation images of a folder, in name order."""
    if not folder.is_dir():
        raise SystemExit(f"data folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and in_val(p.name, val_fraction, seed))
    if not files:
        raise SystemExit(f"data folder {str(folder)!r} has no validation images (val_fraction {val_fraction})")
    return [(p.read_bytes(), label_from_name(p)) for p in files[:n]]


def manifest_sample(tsv: Path, n: int):
    """(file bytes, label) of n images of a manifest: tools/real_sets.manifest_sample's pick, without its imports."""
    if not tsv.is_file():
        raise SystemExit(f"manifest {str(tsv)!r} does not exist")
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda row: hashlib.sha256(row[0].encode()).hexdigest())
    return [((tsv.parent / path).read_bytes(), label) for path, label in rows[:n]]


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def package_renders(synth, width: int, height: int, n: int, seed: int):
    """n fresh `captcha` package images (its defaults at width x height), labels 0-9a-zA-Z, 4-6 long."""
    return [(png(image), text) for image, text in
            (synth.package_captcha(seed, i, (width, height), LETTERS) for i in range(n))]


def style_renders(synth, style: str, n: int, seed: int, font_dirs):
    config = synth.SynthConfig(style=style, charset=LETTERS, min_len=4, max_len=8, seed=seed, font_dirs=font_dirs)
    return [(png(image), label) for image, label in synth.SyntheticCaptchas(config, n)]


MERGE = str.maketrans("oil", "011")  # after lower(): o->0, i and l->1


def score(ocr, items):
    """(case-insensitive whole-captcha accuracy, the same with 0/O and 1/I/l merged, ms per image,
    up to 5 (label, read) misses)."""
    right = merged = 0
    wrong = []
    start = time.perf_counter()
    for data, label in items:
        read = ocr.classification(data)
        right += read.lower() == label.lower()
        merged += read.lower().translate(MERGE) == label.lower().translate(MERGE)
        if read.lower() != label.lower() and len(wrong) < 5:
            wrong.append((label, read))
    seconds = time.perf_counter() - start
    return right / len(items), merged / len(items), 1000 * seconds / len(items), wrong


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", action="append", default=[], metavar="NAME=DIR",
                   help="a labelled image folder; its validation split is scored (repeatable)")
    p.add_argument("--manifest", action="append", default=[], metavar="NAME=TSV",
                   help="a path<TAB>label manifest; n of its images are scored (repeatable)")
    p.add_argument("--no-synth", action="store_true", help="skip the package renders and synthetic styles")
    p.add_argument("-n", type=int, default=300, help="images per set (default 300; a split may have fewer)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=12345, help="render seed of the package and synthetic sets")
    p.add_argument("--styles", default=None, help="synthetic styles, comma-separated (default: all but 'captcha')")
    p.add_argument("--font-dirs", nargs="*", default=[], help="extra font folders for the synthetic styles")
    p.add_argument("--known", action="store_true", help="also read each set restricted to its own alphabet")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n must be at least 1, got {args.n}")

    import ddddocr  # here, so that --help works without it
    synth = load_synth()
    styles = args.styles.split(",") if args.styles else list(synth.MIX)
    sets = {}
    for spec in args.folder:
        name, sep, folder = spec.partition("=")
        if not sep:
            p.error(f"--folder wants NAME=DIR, got {spec!r}")
        sets[f"{name} (val split)"] = folder_val(Path(folder), args.val_fraction, args.split_seed, args.n)
    for spec in args.manifest:
        name, sep, tsv = spec.partition("=")
        if not sep:
            p.error(f"--manifest wants NAME=TSV, got {spec!r}")
        sets[f"{name} (manifest)"] = manifest_sample(Path(tsv), args.n)
    for w, h in () if args.no_synth else PACKAGE_SIZES:
        sets[f"captcha package {w}x{h}"] = package_renders(synth, w, h, args.n, args.seed)
    for style in () if args.no_synth else styles:
        sets[f"synth {style}"] = style_renders(synth, style, args.n, args.seed, tuple(args.font_dirs))

    ocr = ddddocr.DdddOcr(show_ad=False)
    ocr_letters = ddddocr.DdddOcr(show_ad=False)
    ocr_letters.set_ranges(LETTERS)
    rows = []
    print("| set | images | ddddocr | 0O 1Il merged | ddddocr, 0-9a-zA-Z only | ms/image |"
          + (" ddddocr, the set's alphabet only |" if args.known else "") + "\n|---|---:|---:|---:|---:|---:|"
          + ("---:|" if args.known else ""))
    for name, items in sets.items():
        acc, acc_m, ms, wrong = score(ocr, items)
        acc_r = score(ocr_letters, items)[0]
        row = dict(set=name, images=len(items), accuracy=acc, accuracy_merged=acc_m, accuracy_restricted=acc_r,
                   ms_per_image=ms, wrong_examples=wrong)
        line = f"| {name} | {len(items)} | {100 * acc:.1f}% | {100 * acc_m:.1f}% | {100 * acc_r:.1f}% | {ms:.1f} |"
        if args.known:
            symbols = set("".join(label for _, label in items))
            row["alphabet"] = "".join(sorted(symbols | {c.swapcase() for c in symbols}))
            ocr_letters.set_ranges(row["alphabet"])
            row["accuracy_known"] = score(ocr_letters, items)[0]
            ocr_letters.set_ranges(LETTERS)
            line += f" {100 * row['accuracy_known']:.1f}% |"
        rows.append(row)
        print(line, flush=True)
    synth_rows = [r for r in rows if r["set"].startswith("synth ")]
    if synth_rows:
        mean = sum(r["accuracy"] for r in synth_rows) / len(synth_rows)
        mean_r = sum(r["accuracy_restricted"] for r in synth_rows) / len(synth_rows)
        mean_m = sum(r["accuracy_merged"] for r in synth_rows) / len(synth_rows)
        print(f"| mean of {len(synth_rows)} synthetic styles | | {100 * mean:.1f}% | {100 * mean_m:.1f}% "
              f"| {100 * mean_r:.1f}% | |")
    if args.json:
        args.json.write_text(json.dumps(dict(ddddocr=version("ddddocr"), case_insensitive=True,
                                             n=args.n, seed=args.seed, font_dirs=args.font_dirs, rows=rows), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
