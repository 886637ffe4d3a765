"""Which server library for `captcha-fast serve`: the same batched reader on each, measured alike.

    python tools/serve_libraries.py                    # all three, 10 s a cell (needs: pip install litserve "ray[serve]")
    python tools/serve_libraries.py --seconds 3 --only starlette litserve

Each server reads JSON {"images": [base64 PNG]} at POST /predict with the shipped model through
predict_batch, batching up to 32 images waiting at most 5 ms:
  starlette  captcha_fast.serve itself (Starlette + uvicorn + its asyncio batcher, one worker thread)
  litserve   LitServe's LitAPI with max_batch_size=32, batch_timeout=0.005 (inference in a worker process)
  rayserve   Ray Serve: one replica, @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005),
             on a local Ray instance with 2 CPUs (its HTTP proxy, controller and replica are Ray actors)
One at a time (Ray's background processes would load the others), each gets 1 and 32 closed-loop
clients (tools/bench_serve.py's raw-socket client; every answer checked). Reported: requests/s,
p50/p99 latency, the server's CPU seconds per request (its whole process tree, from /proc: less
sensitive to other load than wall time), its resident memory, and the seconds from start to the
first answer."""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ROOT, captchas, load, percentile  # noqa: E402

BATCH, WAIT_S = 32, 0.005


try:  # module level: LitServe pickles the API into its worker process
    import litserve as ls

    class LitReader(ls.LitAPI):
        def __init__(self, model: str, **kw):
            super().__init__(**kw)
            self.model_path = model

        def setup(self, device):
            from captcha_fast import api
            self.model = api.load(self.model_path, device="cpu")

        def decode_request(self, request):
            return base64.b64decode(request["images"][0])

        def predict(self, images):  # a list: LitServe batches
            from captcha_fast import api
            return api.predict_batch(list(images), self.model, batch_size=BATCH)

        def encode_response(self, text):
            return {"results": [{"text": text}]}
except ImportError:
    pass


def serve_litserve(model: str, port: int):
    ls.LitServer(LitReader(model, max_batch_size=BATCH, batch_timeout=WAIT_S), accelerator="cpu",
                 workers_per_device=1).run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def serve_rayserve(model: str, port: int):
    import ray
    from ray import serve
    from starlette.requests import Request

    from captcha_fast import api

    @serve.deployment(max_ongoing_requests=256)
    class Reader:
        def __init__(self):
            self.model = api.load(model, device="cpu")

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=WAIT_S)
        async def read(self, images: list) -> list:
            return api.predict_batch(images, self.model, batch_size=BATCH)

        async def __call__(self, request: Request):
            body = await request.json()
            return {"results": [{"text": await self.read(base64.b64decode(body["images"][0]))}]}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Reader.bind(), route_prefix="/predict")
    while True:
        time.sleep(3600)


def tree_stats(pid: int):
    """(CPU seconds, resident MB) of a process and all its descendants."""
    children, stats = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                rss = next(int(l.split()[1]) for l in (d / "status").read_text().splitlines() if l.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
            children.setdefault(int(fields[1]), []).append(int(d.name))
            stats[int(d.name)] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), rss / 1024)
    cpu = mem = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        c, m = stats.get(p, (0.0, 0.0))
        cpu, mem = cpu + c, mem + m
        todo += children.get(p, [])
    return cpu, mem


class Target:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child: run one server
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", nargs="+", default=["starlette", "litserve", "rayserve"])
    args = parser.parse_args()
    from captcha_fast import api

    model = args.model or str(api.DEFAULT_MODEL)
    if args.serve:
        return {"litserve": serve_litserve, "rayserve": serve_rayserve}[args.serve](model, args.port) or 0
    blobs = captchas(128)
    texts = api.predict_batch(blobs, model)
    requests = []
    for b in blobs:
        body = json.dumps({"images": [base64.b64encode(b).decode()]}).encode()
        requests.append(f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    print(f"{'server':>10} {'clients':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/req':>10} {'RSS MB':>7} "
          f"{'start s':>7}")
    for name in args.only:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if name == "starlette":
            cmd = [sys.executable, "-m", "captcha_fast", "serve", "--model", model, "--port", str(port),
                   "--max-batch", str(BATCH), "--max-wait-ms", str(WAIT_S * 1000)]
        else:
            cmd = [sys.executable, __file__, "--serve", name, "--port", str(port), "--model", model]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        target = Target("127.0.0.1", port)
        try:
            while True:  # ready: the first answer comes back right
                try:
                    asyncio.run(load(target, 1, 60.0, requests, texts, budget=1))
                    break
                except (OSError, RuntimeError, asyncio.IncompleteReadError):
                    if proc.poll() is not None or time.perf_counter() - t0 > 300:
                        raise RuntimeError(f"{name} did not start")
                    time.sleep(0.5)
            started = time.perf_counter() - t0
            asyncio.run(load(target, 8, 2.0, requests, texts))  # warm-up
            for clients in (1, 32):
                cpu0 = tree_stats(proc.pid)[0]
                rate, lat = asyncio.run(load(target, clients, args.seconds, requests, texts))
                cpu, mem = tree_stats(proc.pid)
                print(f"{name:>10} {clients:>8} {rate:7.0f} {1000 * percentile(lat, .5):7.1f} "
                      f"{1000 * percentile(lat, .99):7.1f} {1000 * (cpu - cpu0) / len(lat):10.2f} {mem:7.0f} "
                      f"{started:7.1f}", flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(60)
            if name == "rayserve":
                subprocess.run(["ray", "stop", "--force"], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
