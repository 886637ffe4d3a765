"""Training throughput: images/s of `captcha-fast train`'s default path (ink map, augmentation,
fine-tuning the shipped model's shape: 32/64 convs, 128 GRU, height 32) on rendered captchas
(the `captcha` package at 160x60, 4-6 characters), one epoch after a warm-up epoch:

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --threads 1      # the quiet measurement
    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --threads 2
    pytest --benchmark benchmarks/bench_train.py                        # the same, as a benchmark

An epoch is everything a training step does: augmentation, collate, forward, CTC loss, backward,
optimizer step. The images are prepared (ink map, resize) once before timing, as train() does.
Prints images/s by wall clock and by this process's CPU time (less sensitive to other work on a
shared machine), the CPU, threads and the precision of the convolutions."""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_run(folder: Path, n: int, threads: int, batch_size: int = 32, **options):
    """A training run (train._setup) on n rendered captchas written to `folder`."""
    from captcha_fast import synth
    from captcha_fast.distributed import Dist
    from captcha_fast.train import TrainConfig, _setup

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = synth.sample_rng(4242, i)
        text = "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))
        path = folder / f"{text}_{i}.png"
        if not path.exists():
            synth.render_package(text, rng, 160, 60).save(path)
    if "min_steps" in TrainConfig.__dataclass_fields__:  # one pass per epoch, so epochs count images (older
        options.setdefault("min_steps", 0)                # checkouts, the baseline, have no step floor)
    cfg = TrainConfig(data=str(folder), out=str(folder / "run"), val_fraction=0.0, threads=threads, progress=False,
                      batch_size=batch_size, export=False, **options)
    torch.set_num_threads(threads)
    return _setup(cfg, Dist(torch.device("cpu")))


def epoch_rate(run, epochs: int = 1) -> dict:
    """Images/s of `epochs` training epochs (after one warm-up epoch), by wall clock and CPU time."""
    from captcha_fast.train import _train_epoch

    _train_epoch(run, 0)
    n = sum(len(b) for b in run.sampler.batches()) * epochs
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for e in range(epochs):
        _train_epoch(run, 1 + e)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return {"images": n, "img_per_s": n / wall, "img_per_cpu_s": n / cpu, "seconds": wall}


def test_training_throughput(benchmark, tmp_path):
    run = make_run(tmp_path / "data", 256, torch.get_num_threads())
    epoch = iter(range(1, 10_000))
    from captcha_fast.train import _train_epoch

    _train_epoch(run, 0)
    benchmark.pedantic(lambda: _train_epoch(run, next(epoch)), rounds=3, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one call, no timing)
        benchmark.extra_info.update(img_per_s=len(run.train_ds) / benchmark.stats.stats.min, cpu=_cpu_name(),
                                    threads=torch.get_num_threads())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-n", type=int, default=512, help="images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="float32 (the rate before bf16 autocast)")
    p.add_argument("--data", type=Path, default=None, help="folder for the rendered images (default: a temp folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(args.data or Path(tmp), args.n, args.threads, args.batch_size, amp=args.amp)
        result = epoch_rate(run, args.epochs)
    result.update(cpu=_cpu_name(), threads=args.threads, batch_size=args.batch_size, autocast=str(run.amp_dtype),
                  torch=torch.__version__)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
