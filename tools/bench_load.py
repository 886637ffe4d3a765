"""Recognition speed per deployment format and thread policy, idle and beside a competing process.

    python tools/bench_load.py                       # shipped model, all formats, threads 1/2/auto
    python tools/bench_load.py --quick               # fewer images and rounds (a smoke run)
    python tools/bench_load.py --json out.json --markdown

What one measurement is: captcha_fast.predict_batch on 50x200 rendered captchas given as uint8
tensors (preprocess -> model -> beam search, width 10 -> strings), `batch` images per call, in
images/s (best of the rounds; the median is in the JSON). "loaded": `--competitors` processes
spinning on a CPU each (`yes > /dev/null`) while it runs. Idle and loaded runs alternate round by
round in one process, so both see the same machine. Formats: the TorchScript .pt (precision as
captcha_fast.load picks it), the .pt2 torch.export program (float32), the AOTInductor package
(compiled here once, into --work; precision as captcha_fast.load would pick it; --fp32: float32 everywhere).

OMP_WAIT_POLICY is read when OpenMP starts, so `--wait-policy passive` reruns this script in a
child process with OMP_WAIT_POLICY=PASSIVE (and `both` runs both)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def images(n: int, seed: int = 0):
    import numpy as np
    import torch

    from captcha_fast.synth import render, sample_rng

    out = []
    for i in range(n):
        img = render("".join("ABCDEFGH23456789"[(i * 7 + k * 3) % 16] for k in range(5 + i % 3)),
                     sample_rng(seed, i), height=50).convert("L").resize((200, 50))
        out.append(torch.from_numpy(np.asarray(img).copy())[None])
    return out


def formats(model: str, work: Path, which: list, fp32: bool) -> dict:
    """{name: loaded recognizer} for the formats asked for; the .pt2 files are made once in `work`.
    fp32: float32 convolutions everywhere, else each format's default precision on this CPU."""
    from captcha_fast import api, export

    out = {}
    if "torchscript" in which:
        out["torchscript"] = api.load(model, device="cpu", amp=False if fp32 else None, compiled=False)
    if "program" in which:
        program = work / "program.pt2"
        if not program.exists():
            export.export_program(model, program)
        out["program"] = api.load(program)
    if "compiled" in which:
        compiled = work / ("compiled_fp32.pt2" if fp32 else "compiled.pt2")
        if not compiled.exists():
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            subprocess.run([sys.executable, "-c", "import sys; from captcha_fast import export; "
                            "export.compile_package(sys.argv[1], sys.argv[2], dtype=sys.argv[3] or None)",
                            model, str(compiled), "float32" if fp32 else ""], check=True, env=env)
        out["compiled"] = api.load(compiled)
    return out


def measure(args) -> list:
    import torch

    import captcha_fast
    from captcha_fast import api
    from captcha_fast.formats import resolve_dtype

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recs = formats(args.model, work, args.formats, args.fp32)
    pool = images(max(args.batches))
    thread_settings = [None if t == "auto" else int(t) for t in args.threads]
    for rec in recs.values():  # warm-up, and the reads must agree across formats
        api.predict_batch(pool[:8], rec, threads=1)
    reads = {name: api.predict_batch(pool[:64], rec, threads=1) for name, rec in recs.items()}
    agree = {name: sum(a == b for a, b in zip(r, reads[next(iter(reads))])) / len(r) for name, r in reads.items()}
    results = {}
    for rnd in range(args.rounds):
        for loaded in (False, True):
            competitors = [subprocess.Popen("yes > /dev/null", shell=True, start_new_session=True)
                           for _ in range(args.competitors if loaded else 0)]
            try:
                time.sleep(0.2 if loaded else 0)
                for name, rec in recs.items():
                    for threads in thread_settings:
                        for batch in args.batches:
                            calls = max(1, args.images // batch)
                            start = time.perf_counter()
                            for _ in range(calls):
                                api.predict_batch(pool[:batch], rec, batch_size=batch, threads=threads)
                            rate = calls * batch / (time.perf_counter() - start)
                            results.setdefault((name, threads or "auto", batch, loaded), []).append(rate)
            finally:
                for c in competitors:
                    os.killpg(c.pid, 15)
                    c.wait()
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    ts_dtype = resolve_dtype(None, torch.device("cpu"))  # what api.load gave the .pt
    env = {"torch": torch.__version__, "captcha_fast": captcha_fast.__version__, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "competitors": args.competitors,
           "dtypes": {name: str(getattr(rec, "dtype", ts_dtype)) for name, rec in recs.items()},
           "agreement_with_first_format": agree}
    return [{"format": k[0], "threads": k[1], "batch": k[2], "loaded": k[3], "best": max(v),
             "median": statistics.median(v), "env": env} for k, v in results.items()]


def markdown(rows: list) -> str:
    batches = sorted({r["batch"] for r in rows})
    head = "| format | threads | " + " | ".join(f"batch {b} idle | batch {b} loaded" for b in batches) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(batches))]
    keys = []
    for r in rows:
        if (r["format"], r["threads"], r["env"]["omp_wait_policy"]) not in keys:
            keys.append((r["format"], r["threads"], r["env"]["omp_wait_policy"]))
    for fmt, threads, policy in keys:
        cells = []
        for b in batches:
            for loaded in (False, True):
                hit = [r for r in rows if (r["format"], r["threads"], r["batch"], r["loaded"], r["env"]["omp_wait_policy"])
                       == (fmt, threads, b, loaded, policy)]
                cells.append(f"{hit[0]['best']:,.0f}" if hit else "")
        label = f"{threads}" + ("" if policy == "(default)" else f" (OMP_WAIT_POLICY={policy})")
        lines.append(f"| {fmt} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="recognizer .pt (default: the shipped model)")
    p.add_argument("--formats", nargs="+", default=["torchscript", "program", "compiled"],
                   choices=["torchscript", "program", "compiled"])
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"], help="thread counts, or auto")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--images", type=int, default=512, help="images per measurement (whole batches)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--competitors", type=int, default=1, help="spinning processes while loaded")
    p.add_argument("--wait-policy", choices=["default", "passive", "both"], default="default")
    p.add_argument("--fp32", action="store_true", help="float32 convolutions in every format (default: "
                   "each format's default on this CPU: bf16 where oneDNN has native bf16)")
    p.add_argument("--work", default="bench_load_work", help="folder for the .pt2 files (kept, reused)")
    p.add_argument("--quick", action="store_true", help="--images 128 --rounds 1")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", action="store_true", help="print a README table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.images, args.rounds = 128, 1
    if args.model is None:
        from captcha_fast.api import DEFAULT_MODEL
        args.model = str(DEFAULT_MODEL)
    if args.child or args.wait_policy == "default":
        rows = measure(args)
    else:
        rows = []
        for policy in (["default", "passive"] if args.wait_policy == "both" else [args.wait_policy]):
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True)
            rows += json.loads(out.stdout)
    if args.child:
        print(json.dumps(rows))
        return
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown or not args.json:
        print(markdown(rows))
        env = rows[0]["env"]
        print(f"\ntorch {env['torch']}, {env['cpus']} CPUs, torch threads {env['torch_threads']}, "
              f"conv dtypes {env['dtypes']}, reads agreeing with {rows[0]['format']}: {env['agreement_with_first_format']}, "
              f"loaded = {env['competitors']} x `yes > /dev/null`")


if __name__ == "__main__":
    main()
