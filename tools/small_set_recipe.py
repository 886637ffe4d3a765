"""The small-set recipe, measured: `captcha-fast train` with its defaults (fine-tuning the shipped
model) on k labelled images of one style, then the held-out accuracy on other images of that
style (case ignored), beside the fine-tuned weights' own (last.ckpt: what --blend 1 saves) and the
blend share the run saved, the optimizer steps (of the main run), the time and the steps per CPU second.

    python tools/small_set_recipe.py --set pkg160 --set php_heavy --set varlen=../shared/data/varlen_upper \
        --set v2=../shared/data/captcha_images_v2 --labels 25 100 400 --threads 1 --out runs/recipe

A set is NAME=FOLDER (a labelled folder: k images from its training split, data.split_samples
(..., 0.15, 0), seeded shuffle; held out: the first 200 of its validation split, never trained on)
or a rendered style: `pkg160` (the `captcha` package at 160x60) or a captcha_fast.synth style name
(0-9a-z, 4-6 long; training renders seed 777, held out seed 12345). One JSON line per run, also
appended to OUT/results.jsonl; a run already there (same set, labels and options) is not run again,
so the command resumes. OUT/curve.png plots held-out accuracy against the labels, per set, with
the shipped model's own accuracy on the same images (this replaces the old learning-curve tool)."""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever is installed (runs from a frozen copy)

from captcha_fast import api, synth  # noqa: E402
from captcha_fast.cli import main as cli  # noqa: E402
from captcha_fast.data import list_samples, split_samples  # noqa: E402

SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return sum(x.ru_utime + x.ru_stime for x in r)


def rendered(style: str, seed: int, n: int, folder: Path) -> list:
    """n captchas of `style` written to folder as LABEL_i.png; (path, label) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    styled = None if style == "pkg160" else synth.SyntheticCaptchas(
        synth.SynthConfig(style=style, charset=SYMBOLS, min_len=4, max_len=6, seed=seed), n)
    rows = []
    for i in range(n):
        if styled is None:
            image, text = synth.package_captcha(seed, i, (160, 60), SYMBOLS)
        else:
            image, text = styled[i]
        path = folder / f"{text}_{i}.png"
        if not path.exists():
            image.save(path)
        rows.append((str(path.resolve()), text))
    return rows


def split(spec: str, k: int, out: Path):
    """(training rows, held-out rows) of a set spec."""
    name, _, folder = spec.partition("=")
    if folder:
        train, val = split_samples(list_samples(folder), 0.15, 0)
        random.Random(0).shuffle(train)
        return ([(str(Path(s.path).resolve()), s.label) for s in train[:k]],
                [(s.path, s.label) for s in sorted(val, key=lambda s: Path(s.path).name)[:200]])
    images = out / "images" / name
    return rendered(name, 777, k, images / "train"), rendered(name, 12345, 200, images / "held")


def accuracy(model, held) -> float:
    reads = api.predict_batch([p for p, _ in held], model)
    return sum(r.lower() == t.lower() for r, (_, t) in zip(reads, held)) / len(held)


def run(spec: str, k: int, out: Path, threads: int, extra: list) -> dict:
    name = spec.partition("=")[0]
    train_rows, held = split(spec, k, out)
    tag = f"{name}_{k}" + ("_" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8] if extra else "")
    run_dir, manifest = out / tag, out / f"{tag}.tsv"
    manifest.write_text("".join(f"{p}\t{t}\n" for p, t in train_rows))
    cpu, wall = _cpu_seconds(), time.time()
    resume = ["--resume"] if (run_dir / "last.ckpt").is_file() else []  # a run the last invocation left unfinished
    assert cli(["train", str(manifest), "--out", str(run_dir), "--threads", str(threads), "--quiet", *resume,
                *extra]) == 0
    cpu, wall = _cpu_seconds() - cpu, time.time() - wall
    from captcha_fast.checkpoint import load_checkpoint, model_from_checkpoint
    from captcha_fast.export import save_recognizer
    last, best = load_checkpoint(run_dir / "last.ckpt"), load_checkpoint(run_dir / "best.ckpt")
    steps = last["scheduler"]["total_steps"]
    blend = best.get("blend", {})
    # last.ckpt holds the fine-tuned weights themselves: what the run saves with --blend 1 (a run with a
    # validation split saves its best epoch, blended)
    fine_tuned = accuracy(save_recognizer(model_from_checkpoint(last), run_dir / "fine_tuned.pt"), held)
    return dict(set=name, requested=k, labels=len(train_rows), held_out=len(held), shipped=accuracy(None, held),
                accuracy=accuracy(run_dir / "model.pt", held), fine_tuned=fine_tuned,
                share=blend.get("share", 1.0), share_by=blend.get("by"), steps=steps, wall_s=round(wall, 1),
                cpu_s=round(cpu, 1), steps_per_cpu_s=round(steps / cpu, 2), threads=threads, options=" ".join(extra))


def plot(results: list, path: Path) -> None:
    """Held-out accuracy against labelled images, one panel per set; the shipped model's start dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    sets = list(dict.fromkeys(r["set"] for r in results))
    fig = Figure(figsize=(3.2 * len(sets), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(sets):
        rows = sorted((r for r in results if r["set"] == name), key=lambda r: r["labels"])
        ax = fig.add_subplot(1, len(sets), i + 1)
        ax.plot([r["labels"] for r in rows], [100 * r["accuracy"] for r in rows], "o-", label="fine-tuned")
        ax.axhline(100 * rows[0]["shipped"], color="grey", linestyle="--", label="shipped model")
        ax.axhline(90, color="tab:red", linestyle=":", label="target 90%")
        ax.set_xscale("log")
        ax.set_xticks([r["labels"] for r in rows], [str(r["labels"]) for r in rows])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=name, xlabel="labelled images", ylim=(0, 100))
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.set_ylabel("held-out accuracy (%)")
            ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True, metavar="NAME[=FOLDER]")
    p.add_argument("--labels", type=int, nargs="+", default=[25, 100, 400])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/recipe"))
    p.add_argument("train_options", nargs=argparse.REMAINDER, help="after --: more `captcha-fast train` options")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.train_options if a != "--"]
    log = args.out / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    results = []
    for spec in args.set:
        for k in args.labels:
            name, options = spec.partition("=")[0], " ".join(extra)
            result = next((r for r in done if (r["set"], r.get("requested", r["labels"]), r["options"]) == (name, k, options)), None)
            if result is None:
                result = run(spec, k, args.out, args.threads, extra)
                with open(log, "a") as f:
                    f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
            results.append(result)
    plot(results, args.out / "curve.png")


if __name__ == "__main__":
    main()
