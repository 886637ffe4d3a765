"""Install Google Fonts families from the npm registry into a font folder for the synthetic styles.

    python tools/google_fonts.py --out DIR                               # every Latin family (~750, 190 MB)
    python tools/google_fonts.py --out DIR --categories display,handwriting
    python tools/google_fonts.py --out DIR2 --from DIR/fonts.tsv         # exactly another install's versions

Each family comes from its `@expo-google-fonts/<family>` package (the family's TTF files, its font
licence and metadata); the list of families and their categories from the `google-fonts-complete`
package (FAMILY_LIST): those made for Latin (CJK families, 10-30 MB a face, are left out). Only the
regular and bold faces are kept, one folder per family (synth.font_pool makes each folder one group,
so a family with many faces does not dominate). OUT/fonts.tsv records each family installed:
package, version, category, licence and files — what a model card cites. Families the registry
lacks (this registry has about half), or with a face FreeType fails to render (renders), are listed
on stderr and skipped. Needs `npm`. The fonts shape training images only: none ships with the
package or a model."""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FAMILY_LIST = "google-fonts-complete@2.2.3"     # google-fonts.json: family -> category, variants
CATEGORIES = ("sans-serif", "serif", "display", "handwriting", "monospace")
CJK = {"japanese", "korean", "chinese-simplified", "chinese-traditional", "chinese-hongkong"}  # 10-30 MB a face
WEIGHTS = ("400Regular", "700Bold")              # the faces kept (a family without them: its first face)
CHECK_SIZES = (12, 41, 90)                       # px: a face must render every letter and digit at these
FIELDS = ("family", "package", "version", "category", "licence", "files")


def npm_pack(spec: str, dest: Path) -> Path:
    """`npm pack SPEC` into dest -> the tarball; CalledProcessError if the registry lacks it."""
    out = subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(dest), spec],
                         check=True, capture_output=True, text=True).stdout.split()
    return dest / out[-1]


def package_name(family: str) -> str:
    """The expo package of a family: "Rubik Mono One" -> "@expo-google-fonts/rubik-mono-one"."""
    return "@expo-google-fonts/" + re.sub(r"[^a-z0-9]+", "-", family.lower()).strip("-")


def families(categories) -> dict:
    """family -> category of the Google Fonts families in `categories` made for Latin: with the latin
    subset and without a CJK one (FAMILY_LIST)."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(npm_pack(FAMILY_LIST, Path(tmp))) as tar:
            listing = json.load(tar.extractfile("package/google-fonts.json"))
    return {f: v["category"] for f, v in sorted(listing.items())
            if v["category"] in categories and "latin" in v["subsets"] and not CJK & set(v["subsets"])}


def licence(text: str) -> str:
    """The licence a family's LICENSE_FONT states, by name."""
    for pattern, name in (("Open Font License", "SIL OFL 1.1"), ("Apache License", "Apache 2.0"),
                          ("Ubuntu Font Licen[cs]e", "Ubuntu Font Licence 1.0")):
        if re.search(pattern, text, re.I):
            return name
    return "see LICENSE_FONT"


def renders(path: Path) -> bool:
    """Whether FreeType draws each letter and digit, plain and stroked, at CHECK_SIZES: one face (Rubik
    Pixels, thousands of tiny squares) passed synth.font_fits at 40 px and failed a render at 41."""
    from PIL import ImageFont

    try:
        for size in CHECK_SIZES:
            font = ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
            for ch in string.ascii_letters + string.digits:
                font.getmask2(ch)
                font.getmask2(ch, stroke_width=1)
    except (OSError, ValueError):
        return False
    return True


def install(family: str, category: str, spec: str, out: Path) -> dict | None:
    """Unpack one family's regular and bold TTFs and its licence into out/<slug>/ -> its fonts.tsv row."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tarball = npm_pack(spec, Path(tmp))
        except subprocess.CalledProcessError:
            return None
        with tarfile.open(tarball) as tar:
            names = tar.getnames()
            meta = json.load(tar.extractfile("package/package.json"))
            ttfs = [n for n in names if n.endswith(".ttf") and n.split("/")[1] in WEIGHTS]
            ttfs = ttfs or sorted(n for n in names if n.endswith(".ttf"))[:1]
            if not ttfs or "package/LICENSE_FONT" not in names:
                return None
            folder = out / meta["name"].split("/")[1]
            folder.mkdir(parents=True, exist_ok=True)
            text = tar.extractfile("package/LICENSE_FONT").read()
            (folder / "LICENSE_FONT").write_bytes(text)
            for n in ttfs:
                with open(folder / Path(n).name, "wb") as f:
                    shutil.copyfileobj(tar.extractfile(n), f)
    if not all(renders(folder / Path(n).name) for n in ttfs):
        shutil.rmtree(folder)
        return None
    return {"family": family, "package": meta["name"], "version": meta["version"], "category": category,
            "licence": licence(text.decode("utf-8", "replace")), "files": " ".join(Path(n).name for n in ttfs)}


def read_list(path: Path) -> list:
    """The rows of a fonts.tsv (FIELDS), as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_list(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="font folder to fill (one subfolder per family)")
    p.add_argument("--categories", default=",".join(CATEGORIES), help="Google Fonts categories, comma-separated")
    p.add_argument("--from", dest="pinned", type=Path, default=None,
                   help="another install's fonts.tsv: install exactly its families and versions")
    p.add_argument("--jobs", type=int, default=8, help="packages fetched at once")
    args = p.parse_args(argv)
    if args.pinned:
        wanted = [(r["family"], r["category"], f"{r['package']}@{r['version']}") for r in read_list(args.pinned)]
    else:
        wanted = [(f, c, package_name(f)) for f, c in families(set(args.categories.split(","))).items()]
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda w: install(*w, args.out), wanted))
    missing = [w[0] for w, r in zip(wanted, rows) if r is None]
    write_list([r for r in rows if r], args.out / "fonts.tsv")
    print(f"{len(wanted) - len(missing)} families installed into {args.out} ({args.out / 'fonts.tsv'}); "
          f"{len(missing)} missing or unrenderable", file=sys.stderr)
    if missing:
        print("missing: " + ", ".join(missing), file=sys.stderr)


if __name__ == "__main__":
    main()
