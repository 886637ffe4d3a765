"""Rebuild the shipped model, captcha_fast/pretrained/default.pt (+ default.ckpt, its training
weights, where `captcha-fast train` starts fine-tuning):

    sudo apt-get install -y --no-install-recommends $(python -c "from captcha_fast.synth import \
        DEBIAN_FONT_PACKAGES as p; print(*p)")                 # optional: more fonts for the mix
    python tools/build_pretrained.py --data ../shared/data --out runs/general --threads 1

Stage 1 ("synthetic"): a CRNN from scratch on seeded synthetic captchas of every style in
synth.MIX (0-9a-zA-Z, 3-10 characters), plus images with no text (uniform, gradient, noise,
lines) labelled "": a model that has never seen the shared sets (the learning curve's start).
Stage 2 ("shipped"): stage 1 fine-tuned on part of the same synthetic mix plus the TRAIN split of
each folder in --data (data.split_samples: 15% held out by a hash of the file name, seed 0 — the
validation split that `captcha-fast train`/`eval --split val` use is never read here).
Labels are case-folded (lower case): the charset is 0-9a-z. The images of --data are read in
place, never copied."""
from __future__ import annotations

import argparse
import random
import shutil
import string
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from captcha_fast import synth
from captcha_fast.checkpoint import PRETRAINED_CHECKPOINT, load_checkpoint, save_checkpoint
from captcha_fast.cli import main as cli
from captcha_fast.data import list_samples, split_samples

CHARSET = string.digits + string.ascii_lowercase
SYNTH_SEED = 1  # evaluation renders use 12345 (tools/accuracy_table.py)


def blank(rng: random.Random) -> Image.Image:
    """An image with no text: a uniform or gradient background, maybe noise, maybe lines."""
    w, h = rng.randint(80, 400), rng.randint(30, 100)
    c0, c1 = (np.array([rng.randint(0, 255) for _ in range(3)], float) for _ in range(2))
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    a = c0 + (c1 - c0) * t if rng.random() < 0.6 else c0 + 0 * t
    a = np.broadcast_to(a, (h, w, 3)).copy()
    if rng.random() < 0.4:
        a += np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, rng.uniform(3, 30), a.shape)
    image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.line([(rng.randint(0, w), rng.randint(0, h)), (rng.randint(0, w), rng.randint(0, h))], colour,
                  rng.randint(1, 2))
    return image


def render(folder: Path, n: int, n_blank: int) -> list:
    """Render n mix captchas and n_blank images with no text into folder; (path, label) rows."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    dirs = tuple(d for d in synth.DEBIAN_FONT_DIRS if Path(d).is_dir())
    cfg = synth.SynthConfig(style="mix", charset=synth.DIGITS_LETTERS, min_len=3, max_len=10, seed=SYNTH_SEED,
                            font_dirs=dirs)
    captchas = synth.SyntheticCaptchas(cfg, n)
    rows = []
    for i in tqdm(range(n), desc="rendering", mininterval=10):
        path = folder / f"s{i:06d}.png"
        if not path.exists():
            captchas[i][0].save(path)
        rows.append((path, captchas.label(i).lower()))
    for i in range(n_blank):
        path = folder / f"b{i:05d}.png"
        if not path.exists():
            blank(random.Random(f"blank:{i}")).save(path)
        rows.append((path, ""))
    return rows


def train_split(folder: str, copies: int) -> list:
    train, _ = split_samples(list_samples(folder), 0.15, 0)
    return [(Path(s.path), s.label.lower()) for s in train] * copies


def manifest(path: Path, rows) -> Path:
    path.write_text("".join(f"{p}\t{label}\n" for p, label in rows))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding captcha_images_v2/ and varlen_upper/")
    p.add_argument("--out", default="runs/general")
    p.add_argument("--synth", type=int, default=40000, help="synthetic captchas for stage 1")
    p.add_argument("--epochs1", type=int, default=3)
    p.add_argument("--epochs2", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--install", action="store_true", help="copy the result into captcha_fast/pretrained/")
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.time()
    rows = render(out / "images", args.synth, args.synth // 40)
    common = ["--charset", CHARSET, "--bucket", "16", "--batch-size", "32", "--threads", str(args.threads),
              "--skip-bad", "--no-progress"]
    stage1 = out / "stage1"
    if not (stage1 / "model.pt").exists():
        assert cli(["train", str(manifest(out / "stage1.tsv", rows)), "--out", str(stage1), "--from-scratch",
                    "--epochs", str(args.epochs1), "--val-fraction", "0.02", *common]) == 0
    print(f"stage 1 done after {time.time() - t0:.0f} s")
    data = Path(args.data)
    real = train_split(data / "captcha_images_v2", 4) + train_split(data / "varlen_upper", 2)
    mixed = rows[: len(real)] + rows[args.synth:] + real  # as much synthetic as real, and the blanks
    stage2 = out / "stage2"
    if not (stage2 / "model.pt").exists():
        assert cli(["train", str(manifest(out / "stage2.tsv", mixed)), "--out", str(stage2), "--init-from",
                    str(stage1 / "best.ckpt"), "--epochs", str(args.epochs2), "--val-fraction", "0.05", *common]) == 0
    print(f"stage 2 done after {time.time() - t0:.0f} s")
    if args.install:
        shutil.copy(stage2 / "model.pt", "captcha_fast/pretrained/default.pt")
        ckpt = load_checkpoint(stage2 / "best.ckpt")
        save_checkpoint({"model": ckpt["model"], "model_config": ckpt["model_config"], "charset": ckpt["charset"],
                         "epoch": ckpt["epoch"], "best": ckpt["best"]}, PRETRAINED_CHECKPOINT)
        print(f"installed captcha_fast/pretrained/default.pt and {PRETRAINED_CHECKPOINT}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
