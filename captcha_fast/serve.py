"""`captcha-fast serve`: reads captchas over HTTP, batching concurrent requests into one model call.

    GET  /health   200 {"status": "ok", "queued", "reading", "requests", "batches", "images",
                   "largest_batch", ...} once the model is loaded (and warmed up)
    POST /predict  one image's bytes, Content-Type image/* or application/octet-stream
                   -> {"text": "k3q9", "score": -0.12, "confidence": 0.97}
    POST /predict  application/json {"images": ["<base64>", ...], "beam": 10, "top_k": 1,
                   "min_length": 4, "max_length": 6, "allowed": "0123456789"} (all but images optional)
                   -> {"results": [{"text", "score", "confidence"[, "hypotheses": [{"text", "score",
                   "confidence"}, ...]]}, ...]}  (confidence: P(right) in [0, 1], captcha_fast.confidence)
    errors         4xx {"error": "<what is wrong>"}: 400 bad input (bad JSON included), 413 body over the
                   limit or more than --max-images images, 415 content type, 503 queue full (Retry-After: 1);
                   500 only for a fault of the server itself.

Requests wait in one bounded queue. One worker thread (the model runs off the event loop) takes
what is queued -- up to max_batch images; when the queue runs dry it waits for more until the
oldest request has waited max_wait_ms -- and reads them with one predict_batch call per set of
decoding options and per max_batch images or MAX_CALL_PIXELS pixels, decoding each call's images
just before it: however many images a request holds, the worker's memory is one call's (a bad
image fails its request only). Under load the queue fills while the model runs, so batches form
without waiting; when idle, a request waits at most max_wait_ms. max_batch = 1 turns batching off.

Built on Starlette (the ASGI toolkit FastAPI is made of) and uvicorn: docs/serving.md says why."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import re
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError as e:  # the optional extra
    raise ImportError(f"captcha-fast serve needs the serve extra: pip install \"captcha_fast[serve]\" "
                      f"({e.name} is missing)") from None

import torch

from captcha_fast import api, machine, preprocess
from captcha_fast.decode import Hypothesis
from captcha_fast.recognizer import allowed_tokens, check_decode_args


MAX_IMAGES = 256
"""Most images in one JSON request by default (--max-images); more get 413. Eight model calls at the
default max_batch of 32, under a second of the worker for captchas (~3 ms an image on 2 cores), so one
request holds the requests queued behind it that long at most; it also bounds the answer's size. A
request's memory does not grow with it: the worker decodes one model call's images at a time (Batcher._read)."""

MAX_CALL_PIXELS = 4 * preprocess.MAX_PIXELS
"""Most pixels (of the images as sent) in one model call, or --max-pixels if larger: the model's
working memory grows with them (the ink map is made at full size, ~20 bytes a pixel), so 32 images
at the 4,000,000-pixel bound would take ~3 GB in one call; this keeps a call under ~0.4 GB. A batch
of 32 captchas (~10,000 pixels each) is 2% of it: only large images make calls smaller."""

MAX_INT_DIGITS = 100
"""Longest integer a JSON body may hold (in digits; far beyond int64's 19): a longer one is bad JSON
(Python's int() of thousands of digits costs quadratic time, and refuses above 4300)."""


@dataclasses.dataclass
class ServeConfig:
    """`captcha-fast serve` settings (cli.py has the flags)."""

    model: Optional[str] = None  # recognizer file; None: the shipped model
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the line printed at start says which)
    max_batch: int = 32  # images per model call; 1: no batching
    max_wait_ms: float = 0.0  # how long an idle queue waits for more requests (0: batches form from what piles up)
    max_queue: int = 1024  # requests waiting; one more gets 503
    max_body_mb: float = 8.0  # a larger request body gets 413
    max_pixels: int = preprocess.MAX_PIXELS  # a larger image (read from its header) gets 400
    max_images: int = MAX_IMAGES  # a JSON request of more images gets 413
    device: Optional[str] = None  # cpu, cuda, ...; None: as api.load

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_body_mb <= 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


class HTTPError(Exception):
    """An answer other than 200: status and the sentence for {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Options(NamedTuple):
    """Decoding options of a request: requests with equal options share a predict_batch call."""

    beam: int = 10
    top_k: int = 1
    min_length: Optional[int] = None
    max_length: Optional[int] = None
    allowed: Optional[str] = None

    def kwargs(self) -> Dict[str, Any]:
        """predict_batch's keyword arguments (the length/charset constraints only when set)."""
        kw: Dict[str, Any] = dict(decoder="beam", beam_width=self.beam, top_k=self.top_k)
        kw.update({k: v for k, v in self._asdict().items() if k in ("min_length", "max_length", "allowed")
                   and v is not None})
        return kw


def _json_int(text: str) -> int:
    """json.loads' parse_int: ValueError for an integer too long to convert cheaply."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits:,} digits (the server reads at most {MAX_INT_DIGITS})")
    return int(text)


def parse_json(body: bytes) -> Any:
    """The JSON body, or HTTPError 400 "bad JSON: <what is wrong>" for anything json.loads refuses or
    cannot take: a syntax error, text that is not UTF-8, nesting too deep for the parser (RecursionError),
    an integer of more than MAX_INT_DIGITS digits."""
    try:
        return json.loads(body, parse_int=_json_int)
    except RecursionError:
        raise HTTPError(400, "bad JSON: arrays or objects nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, _json_int's
        raise HTTPError(400, f"bad JSON: {e}") from None


def parse_options(fields: Dict[str, Any], charset: List[str]) -> Options:
    """A JSON body's decoding options, checked as predict_batch checks them (HTTPError 400 naming
    what is wrong, by its JSON name), here per request, before it can share a batch."""
    for key in ("beam", "top_k", "min_length", "max_length"):
        value = fields.get(key)
        if value is not None and type(value) is not int:
            raise HTTPError(400, f"{key} must be an integer, got {json.dumps(value)}")
    allowed = fields.get("allowed")
    if allowed is not None and not isinstance(allowed, str):
        raise HTTPError(400, f"allowed must be a string of symbols, got {json.dumps(allowed)}")
    options = Options(fields.get("beam", 10), fields.get("top_k", 1), fields.get("min_length"),
                      fields.get("max_length"), allowed)
    max_length = -1 if options.max_length is None else options.max_length
    try:
        check_decode_args("beam", options.beam, options.top_k, options.min_length or 0, max_length, allowed is not None)
        allowed_tokens(charset, allowed, torch.device("cpu"))
    except ValueError as e:
        raise HTTPError(400, re.sub(r"\bbeam_width\b", "beam", str(e))) from None
    return options


def decode_base64(text: Any, name: str) -> bytes:
    """One JSON image: base64 (standard alphabet, padded) or a data: URL holding it."""
    if not isinstance(text, str):
        raise HTTPError(400, f"{name}: an image must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and ";base64," in text[:100]:  # canvas.toDataURL() and friends
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f"{name}: bad base64 ({e})") from None


class Pending(NamedTuple):
    """A request waiting for the model."""

    images: List[bytes]  # encoded (decoded on the worker, one model call's images at a time)
    names: List[str]  # how errors name each image: "image" (raw body) or "images[i]" (JSON)
    options: Options
    future: asyncio.Future  # -> List[List[Hypothesis]], or the HTTPError/exception to answer with
    arrived: float  # loop.time()


class Batcher:
    """The queue and the one worker thread that reads batches of requests (see the module doc)."""

    def __init__(self, model, config: ServeConfig):
        self.model, self.config = model, config
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(config.max_queue)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="captcha-fast-model")
        # requests answered (run); model calls, the images they read and the largest (_read, on the worker)
        self.counts = {"requests": 0, "batches": 0, "images": 0, "largest_batch": 0}
        self.reading = 0  # images on the worker now
        self.call_pixels = max(MAX_CALL_PIXELS, config.max_pixels)  # pixels per model call (_read)

    async def read(self, images: List[bytes], names: List[str], options: Options) -> List[List[Hypothesis]]:
        """Queue one request and wait for its hypotheses (HTTPError 503 if the queue is full)."""
        loop = asyncio.get_running_loop()
        pending = Pending(images, names, options, loop.create_future(), loop.time())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise HTTPError(503, f"the server is busy ({self.config.max_queue} requests queued): retry later") from None
        return await pending.future

    async def run(self) -> None:
        """Forever: gather a batch, read it on the worker thread, answer each request."""
        loop, carry = asyncio.get_running_loop(), None
        while True:
            batch = [carry or await self.queue.get()]
            carry, n = None, len(batch[0].images)
            deadline = batch[0].arrived + self.config.max_wait_ms / 1000
            while n < self.config.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        break
                if n + len(item.images) > self.config.max_batch:
                    carry = item  # starts the next batch
                    break
                batch.append(item)
                n += len(item.images)
            self.reading = n
            try:
                outcomes = await loop.run_in_executor(self.worker, self._read, batch)
            except Exception as e:  # noqa: BLE001 - a fault of the server: these requests fail (500), the rest go on
                outcomes = [e] * len(batch)
            self.reading = 0
            self.counts["requests"] += len(batch)
            for item, outcome in zip(batch, outcomes):
                if item.future.done():  # the client went away
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _read(self, batch: List[Pending]) -> list:
        """On the worker thread: each request's hypotheses, or the exception to answer it with.

        The images of requests with equal options are decoded one by one, in order, and read in
        model calls of at most max_batch images and at most call_pixels pixels: whatever a request's
        size (a single one may exceed max_batch), at most one call's images are decoded at a time,
        and the model's working memory, which grows with the pixels it is given, is bounded. An
        image that fails to decode fails its request, whose remaining images are skipped; the
        others go on."""
        outcomes: list = [None] * len(batch)  # None: no failure yet
        hyps: List[List[Any]] = [[None] * len(item.images) for item in batch]
        groups: Dict[Options, List[Tuple[int, int]]] = {}  # options -> (request, image), in order
        for j, item in enumerate(batch):
            groups.setdefault(item.options, []).extend((j, k) for k in range(len(item.images)))
        height, max_width = int(self.model.height), int(self.model.max_width)
        for options, members in groups.items():
            call: List[Tuple[int, int, torch.Tensor]] = []  # (request, image, its tensor)
            pixels = 0  # of the images in call
            for j, k in members:
                if outcomes[j] is not None:  # its request failed
                    continue
                if len(call) == self.config.max_batch:
                    self._call(call, options, outcomes, hyps)
                    call, pixels = [], 0
                item = batch[j]
                try:
                    t = preprocess.to_tensor(item.images[k], item.names[k], self.config.max_pixels)
                    preprocess.check_width(t.shape[-2], t.shape[-1], height, max_width, item.names[k])
                except (ValueError, TypeError) as e:
                    outcomes[j] = HTTPError(400, str(e))
                    call = [c for c in call if c[0] != j]  # its images decoded so far
                    pixels = sum(c[2].shape[-2] * c[2].shape[-1] for c in call)
                    continue
                if call and pixels + t.shape[-2] * t.shape[-1] > self.call_pixels:
                    self._call(call, options, outcomes, hyps)
                    call, pixels = [], 0
                call.append((j, k, t))
                pixels += t.shape[-2] * t.shape[-1]
            if call:
                self._call(call, options, outcomes, hyps)
        return [hyps[j] if outcome is None else outcome for j, outcome in enumerate(outcomes)]

    def _call(self, call: List[Tuple[int, int, torch.Tensor]], options: Options, outcomes: list,
              hyps: List[List[Any]]) -> None:
        """One model call on decoded images (request j's image k, its tensor): their hypotheses into
        hyps[j][k], or a failure of the call into outcomes[j] (a 500)."""
        self.counts["batches"] += 1
        self.counts["images"] += len(call)
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(call))
        try:
            read = api.predict_batch([t for _, _, t in call], self.model, batch_size=self.config.max_batch,
                                     return_scores=True, threads=model_threads(len(call)), **options.kwargs())
        except Exception as e:  # noqa: BLE001 - answered as a 500, the server goes on
            for j, _, _ in call:
                outcomes[j] = e
            return
        for (j, k, _), h in zip(call, read):
            hyps[j][k] = h



SMALL_BATCH = 8  # below it, a batch leaves a core to the event loop


def model_threads(n_images: int) -> Optional[int]:
    """Threads for one model call of n_images: a small batch leaves a core to the event loop (HTTP
    parsing and answers run beside the model, and OpenMP threads that share a core with it stall);
    a large one takes predict_batch's own choice. Measured on 2 cores (docs/serving.md): batches of 4
    read 1.14x faster per request on one thread, batches of 16 1.4x slower."""
    return max(1, machine.auto_threads() - 1) if n_images < SMALL_BATCH else None


def _result(hyps: List[Hypothesis], top_k: int) -> Dict[str, Any]:
    """One image's answer; score null and confidence 0 when no label meets the constraints."""
    best = hyps[0] if hyps else Hypothesis("", None, 0.0)
    result: Dict[str, Any] = {"text": best.text, "score": best.score, "confidence": best.confidence}
    if top_k > 1:
        result["hypotheses"] = [{"text": h.text, "score": h.score, "confidence": h.confidence} for h in hyps]
    return result


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or HTTPError 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the body is {int(declared):,} bytes, above the limit of {limit:,} (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the body is above the limit of {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServeConfig, model) -> Starlette:
    """The ASGI app serving a loaded recognizer (see load_model)."""
    state: Dict[str, Any] = {}
    limit = int(config.max_body_mb * 2 ** 20)
    charset = list(model.charset)

    async def health(request: Request) -> JSONResponse:
        batcher: Batcher = state["batcher"]
        return JSONResponse({"status": "ok", "model": config.model or "shipped", "max_batch": config.max_batch,
                             "queued": batcher.queue.qsize(), "reading": batcher.reading, **batcher.counts})

    async def predict(request: Request) -> JSONResponse:
        batcher: Batcher = state["batcher"]
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json" and not kind.startswith("image/") and kind != "application/octet-stream":
                raise HTTPError(415, f"Content-Type must be image/*, application/octet-stream (one image's bytes) or "
                                     f"application/json, got {kind or 'none'!r}")
            body = await read_body(request, limit)
            if not body:
                raise HTTPError(400, "the body is empty: send one image's bytes, or JSON {\"images\": [...]}")
            if kind != "application/json":
                hyps = await batcher.read([body], ["image"], Options())
                return JSONResponse(_result(hyps[0], 1))
            fields = parse_json(body)
            if not isinstance(fields, dict) or not isinstance(fields.get("images"), list) or not fields["images"]:
                raise HTTPError(400, "the JSON body must be an object with \"images\": a non-empty list of base64 "
                                     "strings")
            if len(fields["images"]) > config.max_images:
                raise HTTPError(413, f"the request has {len(fields['images']):,} images, above the limit of "
                                     f"{config.max_images} per request: send them in requests of at most "
                                     f"{config.max_images}")
            unknown = sorted(set(fields) - {"images", *Options._fields})
            if unknown:
                raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}: expected images, "
                                     f"{', '.join(Options._fields)}")
            options = parse_options(fields, charset)
            names = [f"images[{i}]" for i in range(len(fields["images"]))]
            images = [decode_base64(text, name) for text, name in zip(fields["images"], names)]
            hyps = await batcher.read(images, names, options)
            return JSONResponse({"results": [_result(h, options.top_k) for h in hyps]})
        except HTTPError as e:
            headers = {"Retry-After": "1"} if e.status == 503 else None
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = state["batcher"] = Batcher(model, config)
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:  # uvicorn has answered the open requests by now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            batcher.worker.shutdown(wait=True)

    async def not_here(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405 as JSON too
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path} (the server has GET /health "
                                      f"and POST /predict)"}, status_code=exc.status_code, headers=exc.headers)

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
                     exception_handlers={HTTPException: not_here}, lifespan=lifespan)


def load_model(config: ServeConfig):
    """The recognizer, after one read of a blank image (first calls set up kernels and caches)."""
    model = api.load(config.model, device=config.device) if config.model else api.default_model(device=config.device)
    api.predict_batch([torch.full((1, 50, 200), 255, dtype=torch.uint8)], model)
    return model


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does, and ending with exit status 0 on
    SIGINT/SIGTERM after its graceful shutdown (uvicorn re-raises the signal afterwards, so the
    process would die of it)."""

    def __init__(self, config: uvicorn.Config, banner: str):
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit:
            print(self.banner, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(sig, frame):
            self.force_exit = self.should_exit  # a second signal: stop waiting for open requests
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; OSError saying which address fails."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(config: ServeConfig, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM. Binds the port (a taken one fails at once), loads the model,
    then listens and prints "captcha-fast serve: listening on http://HOST:PORT ..." to stderr
    (PORT resolved when 0)."""
    sock = bind(config.host, config.port)
    model = load_model(config)
    host, port = sock.getsockname()[:2]
    banner = (f"captcha-fast serve: listening on http://{f'[{host}]' if ':' in host else host}:{port} (model "
              f"{config.model or 'shipped'}, max_batch {config.max_batch}, max_wait_ms {config.max_wait_ms:g})")
    uv_config = uvicorn.Config(create_app(config, model), log_level=log_level, access_log=False,
                               timeout_graceful_shutdown=10, server_header=False)
    _Server(uv_config, banner).run(sockets=[sock])
