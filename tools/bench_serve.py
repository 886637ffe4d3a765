"""`captcha-fast serve` under load: throughput and latency for 1, 8 and 32 concurrent clients,
batching on (--max-batch 32) against off (--max-batch 1) in the same run; and a soak that watches
the server's memory over many requests.

    python tools/bench_serve.py                        # the table (shipped model, 20 s a cell, 3 rounds)
    python tools/bench_serve.py --quick                # a smoke run (2 s a cell, 1 round)
    python tools/bench_serve.py --soak 100000          # 100k requests at 32 clients: resident memory
    python tools/bench_serve.py --json out.json --markdown

A client is one keep-alive HTTP/1.1 connection that POSTs one rendered 50x200 PNG captcha
(image/png, 256 distinct) to /predict and sends the next when the answer is in (a closed loop).
The clients are asyncio coroutines over raw sockets in this process, so little of the machine
goes to them (their CPU share is printed). Both servers run side by side, idle while the other is
measured; the cells alternate (clients x batching, round by round), so both see the same machine;
a cell's throughput is its median over the rounds, its latencies are pooled. Every answer is
checked against predict_batch's read of the same image: a wrong, failed or refused answer ends
the run with status 1. Mean batch: images per model call, from the server's /health counters.
Server CPU ms/req: the server process's CPU time per answered request (from /proc), the figure
other load on the machine disturbs least.

Soak: one server (batching on), 32 clients, N requests; the server's resident memory (VmRSS) is
sampled twice a second; after the first 10% (warm-up) it must stay within 10% of its value then."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def captchas(n: int = 256):
    """n rendered captchas (PNG bytes) and predict_batch's reads of them."""
    from captcha_fast.synth import render, sample_rng

    blobs, texts = [], []
    for i in range(n):
        text = "".join("abcdefgh23456789"[(i * 7 + k * 3 + i // 16) % 16] for k in range(4 + i % 4))
        buf = io.BytesIO()
        render(text, sample_rng(11, i), height=50).convert("RGB").resize((200, 50)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    return blobs


class Server:
    """`python -m captcha_fast serve --port 0 ARGS` in a child process."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "captcha_fast", "serve", "--port", "0", *args],
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for line in self.proc.stderr:
            if "listening on http://" in line:
                self.host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
                self.port = int(port)
                break
        else:
            raise RuntimeError(f"the server ({' '.join(args)}) did not start")

    def health(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=30) as r:
            return json.loads(r.read())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system): less disturbed by other load than wall time."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """An HTTP/1.1 response body after its head: Content-Length, or chunked (Ray Serve's proxy)."""
    fields = dict(l.split(b":", 1) for l in head.split(b"\r\n")[1:] if b":" in l)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    if b"content-length" in fields:
        return await reader.readexactly(int(fields[b"content-length"]))
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunks.append(await reader.readexactly(size + 2))
        if size == 0:
            return b"".join(c[:-2] for c in chunks)


ANSWERS = [0, 0]   # answers checked, of which read otherwise than predict_batch
DISAGREE: set = set()  # (image, server's read, predict_batch's read) that differed


async def client(host: str, port: int, requests, texts, stop_at: float, budget: list, latencies: list):
    """One connection, one request at a time until stop_at (or the shared budget of requests is spent)."""
    reader, writer = await asyncio.open_connection(host, port)
    k = random.randrange(len(requests))
    try:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            k = (k + 1) % len(requests)
            t0 = time.perf_counter()
            writer.write(requests[k])
            head = await reader.readuntil(b"\r\n\r\n")
            body = await read_body(reader, head)
            latencies.append(time.perf_counter() - t0)
            status = int(head.split(b" ", 2)[1])
            answer = json.loads(body) if status == 200 else {}
            text = answer["results"][0]["text"] if "results" in answer else answer.get("text")  # JSON or raw form
            if status != 200:
                raise RuntimeError(f"image {k}: HTTP {status} {body[:200]!r}, expected {texts[k]!r}")
            # bf16 convolutions (the default on CPUs with native bf16) read an image slightly differently
            # in another batch, so a borderline read may flip: counted, and bounded at the end
            ANSWERS[0] += 1
            if text != texts[k]:
                ANSWERS[1] += 1
                DISAGREE.add((k, text, texts[k]))
    finally:
        writer.close()


async def load(server: Server, clients: int, seconds: float, requests, texts, budget: int = 10 ** 12):
    """(requests/s, latencies in s) of `clients` closed-loop clients for `seconds` (or `budget` requests)."""
    latencies: list = []
    spent = [budget]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(server.host, server.port, requests, texts, t0 + seconds, spent, latencies)
                           for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def table(args, requests, texts) -> list:
    servers = {"on": Server("--model", args.model, "--max-batch", str(args.max_batch), "--max-wait-ms",
                            str(args.max_wait_ms)),
               "off": Server("--model", args.model, "--max-batch", "1")}
    try:
        cells = {(c, b): {"rates": [], "latencies": [], "images": 0, "batches": 0, "client_cpu": 0.0, "wall": 0.0,
                          "server_cpu": 0.0}
                 for c in args.clients for b in servers}
        for server in servers.values():  # warm-up: first requests set up caches and connections
            asyncio.run(load(server, 8, min(2.0, args.seconds), requests, texts))
        for r in range(args.rounds):
            for c in args.clients:
                for b, server in servers.items():
                    before, cpu0, t0 = server.health(), cpu_seconds(), time.perf_counter()
                    server_cpu0 = server.cpu_seconds()
                    rate, latencies = asyncio.run(load(server, c, args.seconds, requests, texts))
                    after, cell = server.health(), cells[c, b]
                    cell["server_cpu"] += server.cpu_seconds() - server_cpu0
                    cell["client_cpu"] += cpu_seconds() - cpu0
                    cell["wall"] += time.perf_counter() - t0
                    cell["rates"].append(rate)
                    cell["latencies"] += latencies
                    cell["images"] += after["images"] - before["images"]
                    cell["batches"] += after["batches"] - before["batches"]
                    print(f"round {r + 1}: {c:>3} clients, batching {b:>3}: {rate:7.1f} req/s", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (c, b), cell in cells.items():
        lat = cell["latencies"]
        rows.append({"clients": c, "batching": b, "req_per_s": statistics.median(cell["rates"]),
                     "p50_ms": 1000 * percentile(lat, 0.5), "p99_ms": 1000 * percentile(lat, 0.99),
                     "mean_batch": cell["images"] / max(1, cell["batches"]),
                     "server_cpu_ms_per_request": 1000 * cell["server_cpu"] / max(1, len(lat)),
                     "client_cpu_share": cell["client_cpu"] / cell["wall"], "requests": len(lat)})
    return rows


def soak(args, requests, texts) -> dict:
    server = Server("--model", args.model, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms))
    samples = []  # (requests done, RSS MB)
    try:
        async def run():
            done_before = server.health()["requests"]
            task = asyncio.create_task(load(server, 32, 10 ** 9, requests, texts, budget=args.soak))
            while not task.done():
                done = await asyncio.to_thread(lambda: server.health()["requests"]) - done_before
                samples.append((done, server.rss_mb()))
                await asyncio.sleep(0.5)
            return await task

        t0 = time.perf_counter()
        rate, latencies = asyncio.run(run())
        seconds = time.perf_counter() - t0
        samples.append((args.soak, server.rss_mb()))
    finally:
        server.stop()
    after = [rss for done, rss in samples if done >= args.soak // 10]
    base = after[0]
    return {"requests": len(latencies), "seconds": seconds, "req_per_s": rate,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "rss_mb_at_warm_up": base, "rss_mb_min": min(after), "rss_mb_max": max(after),
            "rss_mb_end": samples[-1][1], "growth": max(after) / base - 1, "flat": max(after) <= 1.10 * base
            and min(after) >= 0.90 * base, "samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="recognizer file (default: the shipped model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="per cell and round (default 20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="the batching server's (default 0, as serve's)")
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="instead of the table: N requests, RSS")
    parser.add_argument("--quick", action="store_true", help="2 s a cell, 1 round")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 1
    import torch

    from captcha_fast import api

    args.model = args.model or str(api.DEFAULT_MODEL)
    blobs = captchas()
    texts = api.predict_batch(blobs, args.model)
    requests = [(f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\nContent-Length: {len(b)}\r\n"
                 f"\r\n").encode() + b for b in blobs]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    header = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
              f"model {Path(args.model).name}")
    print(header)
    if args.soak:
        result = soak(args, requests, texts)
        print(f"soak: {result['requests']} requests in {result['seconds']:.0f} s ({result['req_per_s']:.0f} req/s, "
              f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms); server RSS after warm-up "
              f"{result['rss_mb_at_warm_up']:.0f} MB, then {result['rss_mb_min']:.0f}-{result['rss_mb_max']:.0f} MB, "
              f"{result['rss_mb_end']:.0f} MB at the end: {'flat' if result['flat'] else 'NOT flat'} within 10%")
        ok = result["flat"]
    else:
        rows = table(args, requests, texts)
        bar = "|" if args.markdown else " "
        cols = ["clients", "batching", "req/s", "p50 ms", "p99 ms", "mean batch", "server CPU ms/req", "client CPU"]
        print(f"{bar}{bar.join(f'{c:>10}' for c in cols)}{bar}")
        if args.markdown:
            print("|" + "|".join("---:" for _ in cols) + "|")
        for r in rows:
            cells = [r["clients"], r["batching"], f"{r['req_per_s']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{r['mean_batch']:.1f}", f"{r['server_cpu_ms_per_request']:.2f}", f"{100 * r['client_cpu_share']:.0f}%"]
            print(f"{bar}{bar.join(f'{c:>10}' for c in cells)}{bar}")
        by = {(r["clients"], r["batching"]): r["req_per_s"] for r in rows}
        for c in args.clients:
            print(f"{c} clients: batching on / off = {by[c, 'on'] / by[c, 'off']:.2f}x")
        result, ok = {"rows": rows}, True
    flipped = len({k for k, _, _ in DISAGREE})
    print(f"answers equal to predict_batch's read: {ANSWERS[0] - ANSWERS[1]} of {ANSWERS[0]} checked; "
          f"{flipped} of {len(texts)} images ever read otherwise (bf16 batch composition)")
    result["images_read_otherwise"] = sorted(DISAGREE)
    ok = ok and flipped <= 0.01 * len(texts)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, **result}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
