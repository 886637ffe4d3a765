"""What a model's size costs a user: `predict_batch` throughput of checkpoints of different widths,
each as its compiled package (what `captcha_fast.load` serves), interleaved in one process.

    python tools/model_cost.py --images ../shared/data/captcha_images_v2 \\
        narrow=runs/build/round_0039/last.ckpt h192=captcha_fast/pretrained/default.ckpt
    python tools/model_cost.py --images DIR narrow=CKPT wider=CKPT:48,96,192

NAME=CKPT times that checkpoint; NAME=CKPT:C1,C2,H[,R] times it grown to conv channels C1/C2, GRU
width H (`model.widen`) and R residual blocks (zero-scale, as `train --res-blocks` grows them): the
same reads, the larger shape's cost: how to price a shape before training it. Per model: images one per call (what a server does) and 256 in one call, img/s, the
best of --runs interleaved runs (a busy machine slows every model alike; run it on a quiet one).
The number of parameters and the TorchScript recognizer's size on disk come with each row."""
from __future__ import annotations

import argparse
from dataclasses import replace
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captcha_fast import api  # noqa: E402
from captcha_fast.checkpoint import load_model  # noqa: E402
from captcha_fast.data import list_samples  # noqa: E402
from captcha_fast.export import compile_package, save_recognizer  # noqa: E402
from captcha_fast.model import CRNN, widen  # noqa: E402
from captcha_fast.preprocess import load_image  # noqa: E402


def parse_model(spec: str):
    """NAME=CKPT[:C1,C2,H[,R]] -> (name, CRNN)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise SystemExit(f"model_cost: {spec!r} is not NAME=CKPT[:C1,C2,H[,R]]")
    path, _, shape = rest.partition(":")
    model = load_model(path)
    if shape:
        c1, c2, hidden, *blocks = (int(v) for v in shape.split(","))
        model = widen(model, (c1, c2), hidden)
        if blocks:
            deep = CRNN(replace(model.config, res_blocks=blocks[0])).eval()
            deep.load_state_dict(model.state_dict(), strict=False)  # the new blocks: their zero-scale init
            model = deep
    return name, model


def throughput(model, images, big) -> tuple:
    """(one image per call, batch of 256) in img/s, one run."""
    api.predict_batch(images[:4], model)  # warm-up
    t = time.perf_counter()
    for image in images:
        api.predict_batch([image], model)
    one = len(images) / (time.perf_counter() - t)
    t = time.perf_counter()
    api.predict_batch(big, model, batch_size=len(big))
    return one, len(big) / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="NAME=CKPT or NAME=CKPT:C1,C2,H[,R]")
    ap.add_argument("--images", required=True, help="a folder of captchas (the first -n are read)")
    ap.add_argument("-n", type=int, default=98, help="images timed one per call (default 98)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    paths = [s.path for s in list_samples(args.images)][: args.n]
    if not paths:
        raise SystemExit(f"model_cost: no labelled images in {args.images}")
    images = [load_image(p) for p in paths]
    big = (images * (256 // len(images) + 1))[:256]
    loaded = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, model = parse_model(spec)
            script, package = Path(tmp, f"{name}.pt"), Path(tmp, f"{name}.pt2")
            save_recognizer(model, script)
            compile_package(model, package)
            params = sum(p.numel() for p in model.parameters())
            loaded[name] = (api.load(package), params, script.stat().st_size)
        best = {name: (0.0, 0.0) for name in loaded}
        for run in range(args.runs):
            for name, (model, _, _) in loaded.items():
                one, batch = throughput(model, images, big)
                best[name] = (max(best[name][0], one), max(best[name][1], batch))
                print(f"run {run}: {name}: one per call {one:,.0f} img/s, batch 256 {batch:,.0f} img/s", flush=True)
    print(f"\n{len(images)} images of {args.images}, predict_batch's defaults (its own thread count), "
          f"best of {args.runs} runs, {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| model | parameters | recognizer MB | one image per call, img/s | batch 256, img/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, params, size) in loaded.items():
        one, batch = best[name]
        print(f"| {name} | {params / 1e6:.2f} M | {size / 1e6:.1f} | {one:,.0f} | {batch:,.0f} |")


if __name__ == "__main__":
    main()
