"""Load and resources: concurrency, memory bounds, huge batches."""
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import captcha_fast  # noqa: F401
from captcha_fast.testing import random_log_probs

ops = torch.ops.captcha_fast


def run_isolated(code: str) -> str:
    """Runs code in a fresh interpreter (clean peak-memory counters); returns its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ops_from_many_threads_match_serial():
    g = torch.Generator().manual_seed(0)
    inputs = [(random_log_probs(30, 40, 11, generator=g), torch.randint(0, 31, (40,), generator=g)) for _ in range(8)]
    serial = [ops.ctc_beam_search(lp, n, 8, 2, 0) for lp, n in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = ops.ctc_beam_search(*inputs[i], 8, 2, 0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_100k_sequences_in_one_call_in_bounded_memory():
    out = run_isolated("""
        import resource, torch, captcha_fast
        from captcha_fast.testing import random_log_probs
        T, N, C = 20, 100_000, 11
        lp = torch.cat([random_log_probs(T, 10_000, C, generator=torch.Generator().manual_seed(i)) for i in range(10)], 1)
        lens = torch.full((N,), T)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tokens, lengths, scores = torch.ops.captcha_fast.ctc_beam_search(lp, lens, 10, 1, 0)
        g_tokens, _, _ = torch.ops.captcha_fast.ctc_greedy_decode(lp, lens, 0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        agree = (tokens[:, 0] == g_tokens).all(1).float().mean().item()
        print((peak - before) // 1024, tokens.shape[0], agree)
    """)
    grown_mb, n, agree = out.split()
    # outputs: beam tokens 8 MB + greedy tokens 8 MB + lengths/scores; workspaces are per thread
    assert int(n) == 100_000 and int(grown_mb) < 64, out
    assert float(agree) > 0.9  # on peaky inputs beam and greedy mostly agree: the results are real


def test_memory_stays_flat_over_10k_op_calls():
    out = run_isolated("""
        import resource, torch, captcha_fast
        from captcha_fast.testing import random_log_probs
        lp = random_log_probs(20, 4, 11, generator=torch.Generator().manual_seed(0))
        lens = torch.full((4,), 20)
        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
        for _ in range(500):
            torch.ops.captcha_fast.ctc_beam_search(lp, lens, 10, 3, 0)
        start = rss_mb()
        for i in range(10_000):
            torch.ops.captcha_fast.ctc_beam_search(lp, lens, 10, 3, 0)
            torch.ops.captcha_fast.ctc_greedy_decode(lp, lens, 0)
        print(rss_mb() - start)
    """)
    assert int(out) < 8, f"resident memory grew by {out} MB over 10k calls"


def test_predict_batch_from_many_threads_matches_serial(tiny_model_path, png_folder):
    from captcha_fast import api

    paths = sorted(png_folder.glob("*.png"))
    batches = [paths[i:] + paths[:i] for i in range(6)]
    serial = [api.predict_batch(b, tiny_model_path, top_k=2) for b in batches]
    results = [None] * len(batches)

    def work(i):
        for _ in range(3):
            results[i] = api.predict_batch(batches[i], tiny_model_path, top_k=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


@pytest.mark.slow
def test_predict_batch_memory_stays_flat_over_10k_calls(tiny_model_path):
    out = run_isolated(f"""
        import torch, captcha_fast
        torch.set_num_threads(1)
        image = torch.randint(0, 256, (3, 24, 48), dtype=torch.uint8)
        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
        for _ in range(300):
            captcha_fast.predict_batch([image], {str(tiny_model_path)!r})
        start = rss_mb()
        for _ in range(10_000):
            captcha_fast.predict_batch([image], {str(tiny_model_path)!r})
        print(rss_mb() - start)
    """)
    assert int(out) < 16, f"resident memory grew by {out} MB over 10k predict_batch calls"
