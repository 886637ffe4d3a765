"""Charset and the Python decoding API (captcha_fast.decode)."""
import pytest
import torch

from captcha_fast import bench, decode
from captcha_fast._reference import greedy_decode_reference
from captcha_fast.charset import Charset
from captcha_fast.testing import random_log_probs

CS = Charset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def inputs(N=64, T=40, seed=0, peaky=True):
    g = torch.Generator().manual_seed(seed)
    lp = random_log_probs(T, N, CS.num_classes, peaky=peaky, generator=g)
    return lp, torch.randint(0, T + 1, (N,), generator=g)


def test_charset_blank_is_zero_and_order_is_kept():
    cs = Charset("cab")
    assert cs.encode("abc") == [2, 3, 1] and cs.num_classes == 4
    assert cs.decode([0, 2, 0, 3, 1, -1]) == "abc"
    assert Charset.from_labels(["mm3nn", "24pew"]).symbols == "234emnpw"


@pytest.mark.parametrize("symbols, match", [("", "at least one symbol"), ("abca", "unique, repeated: 'a'")])
def test_charset_rejects_bad_symbols(symbols, match):
    with pytest.raises(ValueError, match=match):
        Charset(symbols)


def test_charset_names_unknown_characters():
    with pytest.raises(ValueError, match="outside the charset.*'x!'"):
        CS.encode("AXx1!")


@pytest.mark.parametrize("peaky", [True, False])
def test_every_greedy_decoder_returns_the_reference_strings(peaky):
    lp, lens = inputs(peaky=peaky)
    want = [CS.decode(greedy_decode_reference(lp[:n, i].double().tolist())[0]) for i, n in enumerate(lens.tolist())]
    assert any(want) and "" in want  # non-trivial labels, and empty ones (length-0 sequences)
    symbols = list(CS.symbols)
    for baseline in (bench.seed_decode, bench.python_greedy_decode, bench.fastest_python_greedy_decode,
                     bench.torch_greedy_decode):
        assert baseline(lp, lens, symbols) == want, baseline.__name__
    assert decode.greedy_decode(lp, lens, CS) == want
    assert [h.text for h in decode.greedy_decode(lp, lens, CS, return_scores=True)] == want


def test_beam_search_returns_hypotheses_best_first():
    lp, lens = inputs()
    hyps = decode.beam_search(lp, lens, CS, beam_width=8, top_k=3)
    assert len(hyps) == len(lens)
    for hs in hyps:
        assert 1 <= len(hs) <= 3 and all(isinstance(h, decode.Hypothesis) for h in hs)
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        assert len({h.text for h in hs}) == len(hs)
    # the wrapper's default pruning changes no top-1 label on model-like input
    exact = decode.beam_search(lp, lens, CS, 8, token_min_logp=None, blank_skip_threshold=None)
    assert [h[0].text for h in hyps] == exact


def test_beam_search_constraints():
    lp, lens = inputs(N=32, T=30, peaky=False)
    lens[:] = 30
    for hs in decode.beam_search(lp, lens, CS, 8, 4, min_length=4, max_length=5, allowed="0123456789"):
        assert hs and all(4 <= len(h.text) <= 5 and h.text.isdigit() for h in hs)


def test_allowed_characters_must_be_in_the_charset():
    lp, lens = inputs(N=2)
    with pytest.raises(ValueError, match="'ab' are not in the charset"):
        decode.beam_search(lp, lens, CS, allowed="0ab")
