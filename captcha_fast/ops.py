"""The registered ops, their fake (meta) kernels for torch.compile/export/opcheck.

The strings ops (ctc_greedy_decode_strings, ctc_greedy_decode_labels, ctc_beam_search_strings,
ctc_beam_search_labels) have none:
their output is data-dependent host strings, so they run in eager mode, TorchScript
and C++; under torch.compile/export use the tensor ops."""
from __future__ import annotations

import torch

from captcha_fast import _extension  # noqa: F401  (registers the ops)


@torch.library.register_fake("captcha_fast::ctc_greedy_decode")
def _greedy_fake(log_probs, input_lengths, blank=0):
    T, N, _ = log_probs.shape
    return (
        log_probs.new_empty((N, T), dtype=torch.int32),
        log_probs.new_empty((N,), dtype=torch.int32),
        log_probs.new_empty((N,), dtype=torch.float32),
    )


@torch.library.register_fake("captcha_fast::ctc_beam_search")
def _beam_fake(log_probs, input_lengths, beam_width=10, top_k=1, blank=0, token_min_logp=None,
               blank_skip_threshold=None, min_length=0, max_length=-1, allowed_tokens=None, certify=True):
    T, N, _ = log_probs.shape
    L = T if max_length < 0 else min(T, max_length)
    return (
        log_probs.new_empty((N, top_k, L), dtype=torch.int32),
        log_probs.new_empty((N, top_k), dtype=torch.int32),
        log_probs.new_empty((N, top_k), dtype=torch.float32),
    )
