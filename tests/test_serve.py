"""`captcha-fast serve` through a real HTTP client (http.client) against a real server process on
127.0.0.1: answers equal predict_batch's, every error kind, concurrent clients, batching bounds,
a full queue, and a clean stop on SIGTERM/SIGINT."""
import base64
import http.client
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import captcha_fast
from captcha_fast import api, cli
from captcha_fast.synth import render, sample_rng

from test_preprocess_input import _png

ROOT = Path(__file__).resolve().parents[1]
needs_serve = pytest.mark.skipif(importlib.util.find_spec("starlette") is None
                                 or importlib.util.find_spec("uvicorn") is None,
                                 reason="the serve extra is not installed: pip install '.[serve]'")
TEXTS = ("3a7f", "0b1c", "c4d5e6", "ffff", "12ab", "9e", "d00d", "abc123")


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def blobs():
    """Rendered captchas of several widths, as PNG bytes."""
    return [_encode(render(t, sample_rng(5, i), height=50)) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def expected(blobs):
    """The shipped model's reads: one text per image, so that a mixed-up answer shows. One thread, as
    the server child (OMP_NUM_THREADS=1) runs: bf16 kernels round differently at other thread counts,
    and the scores are compared to 1e-4."""
    hyps = api.predict_batch(blobs, api.DEFAULT_MODEL, return_scores=True, threads=1)
    assert len({h[0].text for h in hyps}) == len(blobs)
    return hyps


class Server:
    """`python -m captcha_fast serve --port 0 ...` in a child process, ready once /health answers."""

    def __init__(self, tmp_path: Path, *args: str):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "captcha_fast", "serve", "--port", "0", *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while "listening on http://" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        line = next(l for l in self.log.read_text().splitlines() if "listening on http://" in l)
        self.host, self.port = line.split("http://")[1].split()[0].rsplit(":", 1)
        assert self.request("GET", "/health")[0] == 200

    def request(self, method: str, path: str, body: bytes = b"", headers=None, timeout: float = 60):
        """(status, parsed JSON body, response headers) over a fresh connection."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read()), response.headers
        finally:
            conn.close()

    def raw(self, image: bytes, content_type: str = "image/png"):
        return self.request("POST", "/predict", image, {"Content-Type": content_type})[:2]

    def json(self, payload, raw_body: bytes = None):
        body = raw_body if raw_body is not None else json.dumps(payload).encode()
        return self.request("POST", "/predict", body, {"Content-Type": "application/json"})[:2]

    def health(self):
        return self.request("GET", "/health")[1]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def _same(result, hyp):
    assert result["text"] == hyp.text and result["score"] == pytest.approx(hyp.score, rel=1e-4, abs=1e-4)
    assert 0 <= result["confidence"] <= 1 and result["confidence"] == pytest.approx(hyp.confidence, abs=1e-4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--model", str(api.DEFAULT_MODEL), "--max-batch", "8",
               "--max-wait-ms", "50", "--max-body-mb", "0.5")
    yield s
    assert s.stop() == 0


@needs_serve
def test_raw_answers_equal_predict_batch(server, blobs, expected):
    for blob, hyps in zip(blobs, expected):
        status, body = server.raw(blob)
        assert status == 200 and set(body) == {"text", "score", "confidence"}
        _same(body, hyps[0])
    jpeg = _encode(Image.open(io.BytesIO(blobs[0])).convert("RGB"), "JPEG")
    status, body = server.raw(jpeg, "application/octet-stream")
    assert status == 200 and body["text"] == api.predict_batch([jpeg], server_model(server))[0]


def server_model(server):
    return server.proc.args[server.proc.args.index("--model") + 1]


@needs_serve
def test_json_answers_equal_predict_batch_in_order(server, blobs, expected):
    status, body = server.json({"images": [_b64(b) for b in blobs]})
    assert status == 200 and len(body["results"]) == len(blobs)
    for result, hyps in zip(body["results"], expected):
        assert set(result) == {"text", "score", "confidence"}
        _same(result, hyps[0])
    top3 = api.predict_batch(blobs, api.DEFAULT_MODEL, beam_width=5, top_k=3)
    status, body = server.json({"images": [_b64(b) for b in blobs], "beam": 5, "top_k": 3})
    assert status == 200
    for result, hyps in zip(body["results"], top3):
        _same(result, hyps[0])
        assert len(result["hypotheses"]) == len(hyps)
        for h, want in zip(result["hypotheses"], hyps):
            _same(h, want)
    data_url = "data:image/png;base64," + _b64(blobs[2])  # as canvas.toDataURL() gives it
    assert server.json({"images": [data_url]})[1]["results"][0]["text"] == expected[2][0].text


@needs_serve
def test_json_length_and_charset_constraints_reach_the_beam_search(server, blobs):
    for constraints in [{"min_length": 5, "max_length": 6}, {"max_length": 2}, {"allowed": "0123456789"}]:
        want = api.predict_batch(blobs, api.DEFAULT_MODEL, return_scores=True, **constraints)
        status, body = server.json({"images": [_b64(b) for b in blobs], **constraints})
        assert status == 200
        for result, hyps in zip(body["results"], want):
            if not hyps:  # no label within the pruned beam meets the constraints
                assert result == {"text": "", "score": None, "confidence": 0.0}
                continue
            _same(result, hyps[0])
            lo, hi = constraints.get("min_length", 0), constraints.get("max_length", 99)
            assert lo <= len(result["text"]) <= hi
            assert set(result["text"]) <= set(constraints.get("allowed", result["text"]))


@needs_serve
def test_allowed_in_upper_case_reads_as_lower_case_on_the_case_folded_model(server, blobs):
    """The shipped model's charset is 0-9a-z (reads are case-folded): "allowed" in upper case is the same set."""
    want = api.predict_batch(blobs, api.DEFAULT_MODEL, return_scores=True, allowed="abcdef0123")
    status, body = server.json({"images": [_b64(b) for b in blobs], "allowed": "ABCDEF0123"})
    assert status == 200, body
    for result, hyps in zip(body["results"], want):
        if hyps:
            _same(result, hyps[0])
        else:
            assert result == {"text": "", "score": None, "confidence": 0.0}


ERRORS = [  # (name, method, headers, body, status, what the error says)
    ("empty body", "POST", {"Content-Type": "image/png"}, b"", 400, "the body is empty"),
    ("unreadable image", "POST", {"Content-Type": "image/png"}, b"not a png", 400,
     r"^image \(9 bytes\) is not a readable image \(not in an image format PIL knows\)$"),
    ("truncated image", "POST", {"Content-Type": "image/png"}, "TRUNCATED", 400, "is not a readable image"),
    ("too many pixels", "POST", {"Content-Type": "image/png"}, _png(20000, 8000, rows=2), 400,
     r"a 20000 x 8000 image \(width x height\) has 160,000,000 pixels, above max_pixels = 4,000,000 \(a "
     r"decompression bomb\?\): crop or shrink it$"),
    # (too many pixels: no advice to raise a Python setting; the client cannot, the server has --max-pixels)
    ("too wide", "POST", {"Content-Type": "image/png"}, _png(20000, 4, rows=4), 400,
     r"a 20000 x 4 image \(width x height\) is 160000 px wide.*above max_width = 4096: crop it to its text line$"),
    ("bad JSON", "POST", {"Content-Type": "application/json"}, b"{\"images\": [", 400, "bad JSON"),
    ("JSON nested too deeply", "POST", {"Content-Type": "application/json"}, b"[" * 200000 + b"]" * 200000, 400,
     r"^bad JSON: arrays or objects nested too deeply$"),  # was 500 RecursionError
    ("JSON integer of 5000 digits", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"aGVsbG8=\"], \"beam\": " + b"9" * 5000 + b"}", 400,
     r"^bad JSON: an integer of 5,000 digits \(the server reads at most 100\)$"),  # was 500 int() digits limit
    ("JSON not an object", "POST", {"Content-Type": "application/json"}, b"[1, 2]", 400, "must be an object"),
    ("no images", "POST", {"Content-Type": "application/json"}, b"{\"images\": []}", 400, "non-empty list"),
    ("bad base64", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"AAAA\", \"@@@\"]}", 400,
     r"images\[1\]: bad base64"),
    ("not a string", "POST", {"Content-Type": "application/json"}, b"{\"images\": [3]}", 400,
     r"images\[0\]: an image must be a base64 string, got int"),
    ("bad image in JSON", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"PNG64\", \"AAAA\"]}", 400,
     r"^images\[1\] \(3 bytes\) is not a readable image \(not in an image format PIL knows\)$"),
    ("unknown field", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"OK\"], \"beam_width\": 3}",
     400, "unknown field.*beam_width"),
    ("beam 0", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"OK\"], \"beam\": 0}", 400,
     r"beam must be in \[1, 4096\], got 0"),
    ("top_k > beam", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"OK\"], \"beam\": 2, \"top_k\": 3}",
     400, r"top_k must be in \[1, beam = 2\], got 3"),
    ("top_k a string", "POST", {"Content-Type": "application/json"}, b"{\"images\": [\"OK\"], \"top_k\": \"3\"}", 400,
     "top_k must be an integer"),
    ("min_length out of range", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"PNG64\"], \"min_length\": 100000000000000000000}", 400,
     r"^min_length must be in \[0, 4096\], got 100000000000000000000$"),  # was 500
    ("max_length beyond int64", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"PNG64\"], \"max_length\": 9223372036854775808}", 400,
     r"^max_length must be -1 \(no limit\) or in \[max\(min_length, 1\), 4096\], got 9223372036854775808"),  # was 500
    ("min above max", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"OK\"], \"min_length\": 5, \"max_length\": 4}", 400,
     "max_length must be -1 .no limit. or in .max.min_length, 1., 4096., got 4 with min_length = 5"),
    ("allowed outside the charset", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"OK\"], \"allowed\": \"abXY@#\"}", 400, "allowed characters '@#' are not in the charset"),
    ("allowed empty", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [\"OK\"], \"allowed\": \"\"}", 400, "allowed is empty: give the symbols the labels may hold, "
     "or leave it out"),
    ("unsupported content type", "POST", {"Content-Type": "text/plain"}, b"abc", 415, "Content-Type must be"),
    ("form content type (curl's default)", "POST", {"Content-Type": "application/x-www-form-urlencoded"}, b"abc",
     415, "application/x-www-form-urlencoded"),
    ("more images than MAX_IMAGES", "POST", {"Content-Type": "application/json"},
     b"{\"images\": [" + b", ".join([b"\"AAAA\""] * 257) + b"]}", 413,
     r"^the request has 257 images, above the limit of 256 per request: send them in requests of at most 256$"),
    ("declared body over the limit", "POST", {"Content-Type": "image/png", "Content-Length": str(2 ** 30)}, b"x", 413,
     "1,073,741,824 bytes, above the limit of 524,288"),
    ("streamed body over the limit", "POST", {"Content-Type": "image/png"}, "CHUNKED", 413,
     "above the limit of 524,288 bytes"),
    ("unknown path", "POST", {"Content-Type": "image/png"}, b"x", 404, "POST /read.*GET /health and POST /predict"),
    ("wrong method", "GET", {}, b"", 405, "GET /predict"),
]


@needs_serve
@pytest.mark.parametrize("name, method, headers, body, status, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_answer_4xx_json_and_the_server_goes_on(server, blobs, expected, name, method, headers, body, status,
                                                        match):
    import re

    path = "/read" if name == "unknown path" else "/predict"
    if body == "TRUNCATED":
        body = blobs[0][:len(blobs[0]) // 2]
    elif isinstance(body, bytes):
        body = body.replace(b"PNG64", _b64(blobs[0]).encode())  # a good image before the bad one
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    try:
        if body == "CHUNKED":  # no Content-Length: the limit is met while reading
            conn.request(method, path, body=iter([b"\0" * 65536] * 9), headers=headers, encode_chunked=True)
        elif "Content-Length" in headers:  # declares a huge body and sends 1 byte: refused from the header
            conn.putrequest(method, path)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(body)
        else:
            conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        got_status, got = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert got_status == status and set(got) == {"error"} and re.search(match, got["error"]), got
    status, good = server.raw(blobs[1])  # and the server goes on
    assert status == 200 and good["text"] == expected[1][0].text


@needs_serve
def test_concurrent_clients_each_get_their_own_answer_in_shared_batches(server, blobs, expected):
    """24 clients at once, 4 requests each, raw and JSON mixed: every answer is its own image's,
    and the batches were shared (and no larger than --max-batch 8)."""
    before = server.health()
    start, answers, failures = threading.Barrier(24), {}, []

    def client(c: int):
        start.wait()
        for r in range(4):
            i = (c + r) % len(blobs)
            try:
                if (c + r) % 3:
                    status, body = server.raw(blobs[i])
                else:
                    status, body = server.json({"images": [_b64(blobs[i]), _b64(blobs[(i + 1) % len(blobs)])]})
                    assert [x["text"] for x in body["results"]] == [expected[i][0].text,
                                                                     expected[(i + 1) % len(blobs)][0].text]
                    body = body["results"][0]
                assert status == 200
                answers[c, r] = (i, body)
            except Exception as e:  # noqa: BLE001 - reported below, with the client
                failures.append((c, r, repr(e)))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(answers) == 96
    for i, body in answers.values():
        _same(body, expected[i][0])
    after = server.health()
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 96 and batches < requests
    assert after["largest_batch"] <= 8


@needs_serve
def test_a_request_larger_than_max_batch_is_read_max_batch_images_at_a_time(server, blobs, expected):
    """24 images in one request on --max-batch 8: three model calls of 8 (/health's largest_batch is
    the largest model call, not the largest request), the answers in order."""
    before = server.health()
    status, body = server.json({"images": [_b64(b) for b in blobs * 3]})
    assert status == 200 and len(body["results"]) == 3 * len(blobs)
    for result, hyps in zip(body["results"], expected * 3):
        _same(result, hyps[0])
    after = server.health()
    assert after["largest_batch"] <= 8, after
    assert after["images"] - before["images"] == 24 and after["batches"] - before["batches"] >= 3


@needs_serve
def test_max_images_per_request_are_read_and_one_more_answers_413(server, blobs, expected):
    from captcha_fast import serve

    blank = _b64(_encode(Image.new("L", (40, 32), 255)))  # tiny: 256 of them fit the 0.5 MB body limit
    images = [blank] * serve.MAX_IMAGES
    images[100], images[-1] = _b64(blobs[0]), _b64(blobs[1])
    status, body = server.json({"images": images})
    assert status == 200 and len(body["results"]) == serve.MAX_IMAGES
    assert [body["results"][i]["text"] for i in (100, -1)] == [expected[0][0].text, expected[1][0].text]
    status, body = server.json({"images": images + [blank]})
    assert status == 413 and body == {"error": f"the request has {serve.MAX_IMAGES + 1} images, above the limit of "
                                               f"{serve.MAX_IMAGES} per request: send them in requests of at most "
                                               f"{serve.MAX_IMAGES}"}
    assert server.health()["largest_batch"] <= 8


@needs_serve
def test_max_images_flag_sets_the_limit(tiny_model_path, tmp_path, blobs):
    s = Server(tmp_path, "--model", str(tiny_model_path), "--max-images", "2")
    try:
        assert s.json({"images": [_b64(blobs[0])] * 2})[0] == 200
        assert s.json({"images": [_b64(blobs[0])] * 3}) == (413, {"error": "the request has 3 images, above the limit "
                                                                           "of 2 per request: send them in requests "
                                                                           "of at most 2"})
    finally:
        assert s.stop() == 0


@needs_serve
def test_the_worker_decodes_max_batch_images_at_a_time(tiny_model_path, blobs, monkeypatch):
    """Batcher._read decodes each model call's images just before it: a request of 20 images on max_batch
    8 never holds more than 8 decoded (its memory is bounded by max_batch, not by its size). Its bad
    image 13 fails it alone: its later images are skipped, the other request of the batch is read."""
    from captcha_fast import preprocess, serve

    decoded, calls = [], []
    real_to_tensor, real_predict = preprocess.to_tensor, api.predict_batch

    def to_tensor(image, name, max_pixels=None):
        if isinstance(image, bytes):  # (predict_batch passes the decoded tensors through it again)
            decoded.append(name)
        return real_to_tensor(image, name, max_pixels)

    def predict_batch(images, model, **kw):
        calls.append((len(images), len(decoded)))
        return real_predict(images, model, **kw)

    model = api.load(tiny_model_path)
    want = real_predict(blobs[:3], model, return_scores=True)
    monkeypatch.setattr(preprocess, "to_tensor", to_tensor)
    monkeypatch.setattr(api, "predict_batch", predict_batch)
    batcher = serve.Batcher(model, serve.ServeConfig(max_batch=8))
    big = [blobs[i % len(blobs)] for i in range(20)]
    big[13] = b"not an image"
    items = [serve.Pending(big, [f"images[{i}]" for i in range(20)], serve.Options(), None, 0.0),
             serve.Pending(blobs[:3], ["images[0]", "images[1]", "images[2]"], serve.Options(), None, 0.0)]
    outcomes = batcher._read(items)
    assert isinstance(outcomes[0], serve.HTTPError) and outcomes[0].status == 400
    assert str(outcomes[0]).startswith("images[13] (12 bytes) is not a readable image")
    assert [[h.text for h in hs] for hs in outcomes[1]] == [[h.text for h in hs] for hs in want]
    # 8 decoded, read; 8..13 decoded (13 fails the request, 8..12 are dropped, 14.. skipped); the other 3 read
    assert calls == [(8, 8), (3, 17)]
    assert decoded == [f"images[{i}]" for i in range(14)] + ["images[0]", "images[1]", "images[2]"]
    assert {k: batcher.counts[k] for k in ("batches", "images", "largest_batch")} == \
        {"batches": 2, "images": 11, "largest_batch": 8}


@needs_serve
def test_a_model_call_holds_at_most_max_call_pixels(tiny_model_path, monkeypatch):
    """The model's working memory grows with the pixels of a call (the ink map is made at full size):
    Batcher._read ends a call before it would pass call_pixels, max(MAX_CALL_PIXELS, max_pixels)."""
    from captcha_fast import serve

    monkeypatch.setattr(serve, "MAX_CALL_PIXELS", 25_000)
    calls = []
    real = api.predict_batch

    def spy(images, model, **kw):
        calls.append([tuple(t.shape[-2:]) for t in images])
        return real(images, model, **kw)

    monkeypatch.setattr(api, "predict_batch", spy)
    model = api.load(tiny_model_path)
    batcher = serve.Batcher(model, serve.ServeConfig(max_batch=8, max_pixels=20_000))
    assert batcher.call_pixels == 25_000
    blank = _encode(Image.new("L", (200, 50), 255))  # 10,000 pixels
    outcomes = batcher._read([serve.Pending([blank] * 5, [f"images[{i}]" for i in range(5)], serve.Options(), None,
                                            0.0)])
    assert calls == [[(50, 200)] * 2, [(50, 200)] * 2, [(50, 200)]]
    assert len(outcomes[0]) == 5 and batcher.counts["largest_batch"] == 2
    assert serve.Batcher(model, serve.ServeConfig(max_pixels=10 ** 8)).call_pixels == 10 ** 8  # one image fits


def _slow_request(server, blobs, n: int = 12):
    """A JSON request long enough on the worker (n images 4000 px wide, read one at a time with
    --max-batch 1) to queue others behind it."""
    wide = _encode(Image.new("L", (4000, 32), 255))
    return {"images": [_b64(wide)] * n + [_b64(blobs[0])]}


@needs_serve
def test_a_full_queue_answers_503_and_the_server_goes_on(tiny_model_path, tmp_path, blobs):
    expected = api.predict_batch(blobs, tiny_model_path)
    s = Server(tmp_path, "--model", str(tiny_model_path), "--max-batch", "1", "--max-queue", "1")
    try:
        results = {}
        slow = threading.Thread(target=lambda: results.setdefault("slow", s.json(_slow_request(s, blobs))))
        slow.start()
        _wait(lambda: s.health()["reading"] > 0)  # the slow request is on the worker
        queued = threading.Thread(target=lambda: results.setdefault("queued", s.raw(blobs[2])))
        queued.start()
        _wait(lambda: s.health()["queued"] == 1)  # the queue is full
        status, body, headers = s.request("POST", "/predict", blobs[3], {"Content-Type": "image/png"})
        assert status == 503 and "busy" in body["error"] and headers["Retry-After"] == "1"
        slow.join()
        queued.join()
        assert results["slow"][0] == 200 and results["slow"][1]["results"][-1]["text"] == expected[0]
        assert results["queued"][0] == 200 and results["queued"][1]["text"] == expected[2]
        status, body = s.raw(blobs[3])
        assert status == 200 and body["text"] == expected[3]
    finally:
        assert s.stop() == 0


def _wait(condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@needs_serve
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_after_its_open_requests_with_status_0(tiny_model_path, tmp_path, blobs, sig):
    expected = api.predict_batch(blobs[:1], tiny_model_path)
    s = Server(tmp_path, "--model", str(tiny_model_path), "--max-batch", "1")
    results = {}
    slow = threading.Thread(target=lambda: results.setdefault("slow", s.json(_slow_request(s, blobs, n=24))))
    slow.start()
    _wait(lambda: s.health()["reading"] > 0)
    assert s.stop(sig) == 0
    slow.join()
    assert results["slow"][0] == 200 and results["slow"][1]["results"][-1]["text"] == expected[0]
    assert "Traceback" not in s.log.read_text()


def test_serve_without_the_extra_says_which_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "captcha_fast.serve", raising=False)
    monkeypatch.delattr(captcha_fast, "serve", raising=False)  # (else `from captcha_fast import serve` finds it)
    assert cli.main(["serve", "--port", "0"]) == 1
    assert "pip install \"captcha_fast[serve]\"" in capsys.readouterr().err


@needs_serve
def test_serve_usage_errors_name_the_flag(capsys):
    for flag, value, message in [("--max-batch", "0", "--max-batch must be >= 1, got 0"),
                                 ("--max-images", "0", "--max-images must be >= 1, got 0"),
                                 ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0, got -1.0"),
                                 ("--max-body-mb", "0", "--max-body-mb must be > 0, got 0.0")]:
        assert cli.main(["serve", flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"captcha-fast serve: error: {message}"


@needs_serve
def test_serve_device_errors_name_the_flag(monkeypatch, capsys):
    import torch

    assert cli.main(["serve", "--port", "0", "--device", "foo"]) == 2
    assert "--device must be 'cpu', 'cuda' or 'cuda:N' (N: a GPU's index), got 'foo'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["serve", "--port", "0", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device 'cuda': CUDA is not available here (torch " in err and "use --device cpu" in err, err


@needs_serve
def test_a_taken_port_fails_at_once_by_name(tiny_model_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tiny_model_path), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@needs_serve
def test_a_small_batch_leaves_a_core_to_the_event_loop(tiny_model_path, blobs, monkeypatch):
    """Batcher._read runs a batch under SMALL_BATCH images on one thread fewer than predict_batch
    would choose (the event loop shares the machine), a larger one on predict_batch's own choice."""
    from captcha_fast import machine, serve

    monkeypatch.setattr(machine, "auto_threads", lambda: 2)
    calls = []
    real = api.predict_batch

    def spy(images, model, **kw):
        calls.append((len(images), kw.get("threads")))
        return real(images, model, **kw)

    monkeypatch.setattr(api, "predict_batch", spy)
    batcher = serve.Batcher(api.load(tiny_model_path), serve.ServeConfig())
    for n in (1, serve.SMALL_BATCH - 1, serve.SMALL_BATCH):
        items = [serve.Pending([blobs[i % len(blobs)]], ["image"], serve.Options(), None, 0.0) for i in range(n)]
        outcomes = batcher._read(items)
        assert len(outcomes) == n and all(len(o) == 1 for o in outcomes)
    assert calls == [(1, 1), (serve.SMALL_BATCH - 1, 1), (serve.SMALL_BATCH, None)]
