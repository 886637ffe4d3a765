"""The public labelled real-captcha sets the shipped model learns from (../shared/data/REAL_SETS.md),
as manifests with a train/validation split.

    python tools/real_sets.py --repos /work/.mirror --out ../shared/data/real

--repos holds one git clone per repository, at REPOS/<owner>+<name>/repo (a bare git directory or
a clone with a work tree; only the commit below has to be in it). Each set's files are read from
that commit with git (git archive, or the RAR archive the repository stores, opened with `unar`)
into OUT/<set>/, keeping the repository's paths and the source bytes unchanged:
`check-training-data` hashes the files, so an image must never be decoded and saved again.

Per set, OUT/<set>/ gets train.tsv, val.tsv and all.tsv (both; path<TAB>label, paths relative to the manifest):
labels case-folded (the model's charset is 0-9a-z), labels outside 0-9a-z and byte-identical
copies of an earlier image (any set, in SETS order then path order) dropped, unreadable images
dropped, then data.split_samples (15% by a hash of the file name, seed 0: the split `captcha-fast
train` makes). OUT/sets.json records each set's repository, commit, paths, licence, style, whether
the build trains on it (`unseen` sets never are: the unseen-style check) and the counts.

The data stays outside the repository; nothing here is copied into it."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captcha_fast.data import Sample, split_samples  # noqa: E402
from captcha_fast.preprocess import IMAGE_SUFFIXES, load_image  # noqa: E402

CHARSET = set(string.digits + string.ascii_lowercase)
VAL_FRACTION, SPLIT_SEED = 0.15, 0


class Repo:
    """Files of one commit of a git repository, read without a work tree."""

    def __init__(self, git_dir: Path, commit: str):
        self.git_dir, self.commit = git_dir, commit
        if self._git("cat-file", "-t", commit).strip() != b"commit":
            raise SystemExit(f"{git_dir}: commit {commit} is not in this clone")

    def _git(self, *args: str) -> bytes:
        r = subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True)
        if r.returncode != 0:
            raise SystemExit(f"git {' '.join(args)} in {self.git_dir}: {r.stderr.decode().strip()}")
        return r.stdout

    def show(self, path: str) -> bytes:
        return self._git("show", f"{self.commit}:{path}")

    def extract(self, folders: List[str], into: Path) -> None:
        """The files under these folders at the commit, written under `into` with their repository paths."""
        with tarfile.open(fileobj=io.BytesIO(self._git("archive", "--format=tar", self.commit, "--", *folders))) as t:
            t.extractall(into, filter="data")


Labelled = List[Tuple[str, str]]  # (path relative to the set's folder, label as the source writes it)


def _lines(data: bytes) -> List[str]:
    return [line.strip() for line in data.decode("utf-8-sig").splitlines()]


def _thsr(repo: Repo, into: Path) -> Labelled:
    """Two batches: img/k.jpg (labels: lebal.csv lines 1-10000, then 1000.csv for 10001-11000) and
    `image /k.jpg` (labels: ` lebal5000.csv`); line k of a label file is image k."""
    a, b = "cnn/get_image/2/img", "cnn/python catch img session /image "
    repo.extract([a, b], into)
    labels_a = _lines(repo.show("cnn/get_image/2/lebal/lebal.csv"))[:10000] + \
        _lines(repo.show("cnn/get_image/2/lebal/1000.csv"))[:1000]
    labels_b = _lines(repo.show("cnn/img process plus/ lebal5000.csv"))[:5000]
    return [(f"{a}/{k}.jpg", t) for k, t in enumerate(labels_a, 1)] + \
           [(f"{b}/{k}.jpg", t) for k, t in enumerate(labels_b, 1)]


def _by_name(folder: Path, prefix: str) -> Labelled:
    """Images labelled by their file name up to the first dot (LABEL.png, LABEL.N.png)."""
    return [(f"{prefix}/{p.name}", p.name.split(".", 1)[0]) for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES]


def _lzu(repo: Repo, into: Path) -> Labelled:
    repo.extract(["right"], into)  # wrong/ holds labels the author marked wrong
    return _by_name(into / "right", "right")


def _cloudchamb3r(repo: Repo, into: Path) -> Labelled:
    repo.extract(["02.labeled"], into)
    return _by_name(into / "02.labeled", "02.labeled")


def _tii(repo: Repo, into: Path) -> Labelled:
    """Two RAR5 archives in the repository; labels are the file names inside them."""
    rows = []
    for archive, folder in (("CaptchaImages.rar", "CaptchaImages"), ("TestingData.rar", "TestingData")):
        with tempfile.TemporaryDirectory() as tmp:
            rar = Path(tmp) / archive
            rar.write_bytes(repo.show(archive))
            r = subprocess.run(["unar", "-q", "-f", "-o", str(into), str(rar)], capture_output=True)
            if r.returncode != 0:
                raise SystemExit(f"unar {archive}: {r.stderr.decode().strip()} (apt-get install unar)")
        rows += _by_name(into / folder, folder)
    return rows


def _sysu(repo: Repo, into: Path) -> Labelled:
    """dataset/images/0001.png... with dataset/labels/labels2.txt, line i for image i (case kept there)."""
    repo.extract(["dataset/images"], into)
    labels = [t for t in _lines(repo.show("dataset/labels/labels2.txt")) if t]
    return [(f"dataset/images/{i:04d}.png", t) for i, t in enumerate(labels, 1)]


@dataclass(frozen=True)
class RealSet:
    name: str
    repository: str
    commit: str
    paths: str
    licence: str
    style: str
    unseen: bool  # kept out of training entirely: the unseen-style check


SETS: Dict[str, Tuple[RealSet, Callable[[Repo, Path], Labelled]]] = {s.name: (s, f) for s, f in [
    (RealSet("thsr", "gary9987/Keras-TaiwanHighSpeedRail-captcha", "f36b4d0e551ba9044cdaf99d97dff230b50730c3",
             "cnn/get_image/2/img/*.jpg + cnn/get_image/2/lebal/{lebal,1000}.csv; "
             "cnn/python catch img session /image /*.jpg + cnn/img process plus/ lebal5000.csv",
             "none stated", "Taiwan High Speed Rail booking: bold capitals, a heavy arc, grey speckle", False), _thsr),
    (RealSet("lzu", "HollowMan6/Captcha-Data-Set-Marking-Tool", "39777fe678c16a69a5f17c47e3fd3f7275912c21",
             "right/*.png", "GPL-3.0",
             "Lanzhou University portal: small clean black digits on white, 1-bit", False), _lzu),
    (RealSet("cloudchamb3r", "cloudchamb3r/captcha-ds", "5a4691c6f2a687e8ce7795bee2556f99d0187616",
             "02.labeled/*.png", "MIT", "thin purple dotted digits, a wavy strike-through, scattered dots",
             False), _cloudchamb3r),
    (RealSet("tii", "YenLinWu/CRNN_with_CTC_Loss", "92449803c06419670a7ffa3fda3fc957ca751036",
             "CaptchaImages.rar, TestingData.rar (RAR5; file name = label)", "MIT",
             "Taiwan Insurance Institute statistics site: small 4-digit captchas", True), _tii),
    (RealSet("sysu", "dengzx7/Captcha_Recognition", "af49f0becfe48c0c8adf674e2334191075874ca2",
             "dataset/images/*.png + dataset/labels/labels2.txt", "none stated",
             "Sun Yat-sen University portal: mixed-case glyphs with interference lines", True), _sysu),
]}


def git_dir(repos: Path, repository: str) -> Path:
    clone = repos / repository.replace("/", "+") / "repo"
    return clone / ".git" if (clone / ".git").is_dir() else clone


def blob_id(data: bytes) -> str:
    """The id git gives a file (what check-training-data looks up)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_manifest(path: Path, samples: List[Sample]) -> None:
    path.write_text("".join(f"{Path(s.path).relative_to(path.parent)}\t{s.label}\n" for s in samples),
                    encoding="utf-8")


def prepare(rs: RealSet, labelled: Labelled, folder: Path, seen: set) -> dict:
    """Filter `labelled` (adds each kept image's blob id to `seen`), split, write the manifests;
    the set's record for sets.json."""
    dropped = {"label outside 0-9a-z": 0, "duplicate image": 0, "unreadable": 0}
    kept = []
    for rel, label in labelled:
        path, label = folder / rel, label.lower()
        if not label or set(label) - CHARSET:
            dropped["label outside 0-9a-z"] += 1
            continue
        if not path.is_file():
            raise SystemExit(f"{rs.name}: labelled image {str(path)!r} is not in {rs.repository}@{rs.commit[:8]}")
        bid = blob_id(path.read_bytes())
        if bid in seen:
            dropped["duplicate image"] += 1
            continue
        try:
            load_image(path)
        except ValueError:
            dropped["unreadable"] += 1
            continue
        seen.add(bid)
        kept.append(Sample(str(path), label))
    train, val = split_samples(kept, VAL_FRACTION, SPLIT_SEED)
    write_manifest(folder / "train.tsv", train)
    write_manifest(folder / "val.tsv", val)
    write_manifest(folder / "all.tsv", kept)
    lengths = sorted({len(s.label) for s in kept})
    return {**asdict(rs), "labelled": len(labelled), "dropped": dropped, "train": len(train), "val": len(val),
            "label_lengths": lengths, "symbols": "".join(sorted({c for s in kept for c in s.label}))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repos", type=Path, required=True, help="folder of clones: REPOS/<owner>+<name>/repo")
    p.add_argument("--out", type=Path, required=True, help="where the sets' files and manifests go (not the repo)")
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    args = p.parse_args(argv)
    out = args.out.resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"--out {str(out)!r} is inside the repository: the data must stay outside it")
    if "tii" in args.sets and shutil.which("unar") is None:  # before any set is written
        raise SystemExit("tii's images are in RAR archives, opened with unar, which is not installed here: "
                         "apt-get install unar (or leave tii out with --sets)")
    records, seen = [], set()
    for name in args.sets:
        rs, listing = SETS[name]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        labelled = listing(Repo(git_dir(args.repos, rs.repository), rs.commit), folder)
        records.append(prepare(rs, labelled, folder, seen))
        r = records[-1]
        print(f"{name}: {r['labelled']} labelled, train {r['train']}, val {r['val']}, dropped {r['dropped']}"
              f"{' (unseen: never trained on)' if rs.unseen else ''}", flush=True)
    (out / "sets.json").write_text(json.dumps(records, indent=1) + "\n")


def load_sets(folder) -> List[dict]:
    """OUT/sets.json of a prepared folder, each record with its manifests' paths (train_tsv, val_tsv, all_tsv)."""
    folder = Path(folder)
    records = json.loads((folder / "sets.json").read_text())
    for r in records:
        for part in ("train", "val", "all"):
            r[f"{part}_tsv"] = str(folder / r["name"] / f"{part}.tsv")
    return records


def manifest_sample(tsv, n: int) -> List[Tuple[str, str]]:
    """(path, label) of n images of a manifest, in the order of the sha256 of the path as the manifest
    writes it (a fixed sample wherever the data lies; tools/compare_ddddocr.py picks the same)."""
    tsv = Path(tsv)
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda row: hashlib.sha256(row[0].encode()).hexdigest())
    return [(str(tsv.parent / path), label) for path, label in rows[:n]]


if __name__ == "__main__":
    main()
