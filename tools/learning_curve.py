"""What a few labels buy: validation accuracy against the number of labelled training images,
from scratch versus fine-tuned from a model that has never seen the set.

    python tools/learning_curve.py --folder v2=../shared/data/captcha_images_v2 \
        --folder varlen=../shared/data/varlen_upper --init runs/general/stage1/best.ckpt \
        --sizes 25 100 400 0 --minutes 4 --out runs/curve      # 0: all the training split

For each folder and size k: the first k images of its training split (seeded shuffle) are
trained on with `captcha-fast train` (default recipe; --from-scratch, or --init-from INIT),
stopping after --minutes or at 100% validation accuracy; validation is the folder's own 15%
split (the same images for every run). Writes RUN/curve.json and RUN/curve.png (matplotlib)."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from captcha_fast.checkpoint import load_checkpoint
from captcha_fast.cli import main as cli
from captcha_fast.data import list_samples, split_samples


def run(name: str, folder: str, k: int, init: str | None, minutes: float, out: Path, threads: int) -> dict:
    train, val = split_samples(list_samples(folder), 0.15, 0)
    random.Random(0).shuffle(train)
    subset = train if k == 0 else train[:k]
    tag = f"{name}_{len(subset)}_{'finetuned' if init else 'scratch'}"
    run_dir = out / tag
    if not (run_dir / "best.ckpt").exists():
        manifest = out / f"{tag}.tsv"
        manifest.write_text("".join(f"{Path(s.path).resolve()}\t{s.label}\n" for s in subset + val))
        epochs = max(12, min(60, 6000 // len(subset)))  # enough steps for a small set
        start = ["--init-from", init] if init else ["--from-scratch"]
        assert cli(["train", str(manifest), "--out", str(run_dir), *start, "--epochs", str(epochs),
                    "--max-minutes", str(minutes), "--stop-at-accuracy", "1.0", "--val-fraction", "0.15",
                    "--seed", "0", "--threads", str(threads), "--no-progress", "--no-export"]) == 0
    best = load_checkpoint(run_dir / "best.ckpt")
    rows = load_checkpoint(run_dir / "last.ckpt")["metrics"]
    return dict(set=name, images=len(subset), start="fine-tuned" if init else "scratch",
                val_acc=best["best"]["val_acc"], val_cer=best["best"]["val_cer"], val_n=best["best"]["val_n"],
                seconds=rows[-1]["seconds"], best_epoch=best["epoch"] + 1,
                seconds_to_best=next(r["seconds"] for r in rows if r["epoch"] == best["epoch"] + 1))


def plot(results: list, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    sets = sorted({r["set"] for r in results})
    fig = Figure(figsize=(5 * len(sets), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for start, style in (("fine-tuned", "o-"), ("scratch", "s--")):
            pts = sorted((r["images"], 100 * r["val_acc"]) for r in results if r["set"] == name and r["start"] == start)
            if pts:
                ax.plot(*zip(*pts), style, label=start)
        ax.set_xscale("log")
        sizes = sorted({r["images"] for r in results if r["set"] == name})
        ax.set_xticks(sizes, [str(k) for k in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labelled training images")
        ax.set_ylabel("held-out whole-captcha accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--init", required=True, help="checkpoint to fine-tune from (one that never saw these sets)")
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400, 0])
    p.add_argument("--minutes", type=float, default=4.0, help="training time cap per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/curve")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.folder:
        name, folder = spec.split("=", 1)
        for k in args.sizes:
            for init in (args.init, None):
                results.append(run(name, folder, k, init, args.minutes, out, args.threads))
                print(json.dumps(results[-1]), flush=True)
                (out / "curve.json").write_text(json.dumps(results, indent=1))
                plot(results, out / "curve.png")


if __name__ == "__main__":
    main()
