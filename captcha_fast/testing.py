"""Inputs for tests and benchmarks: random CTC log-probabilities."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def random_log_probs(T: int, N: int, C: int, *, peaky: bool = True, blank: int = 0,
                     generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(T, N, C) log-softmax outputs.

    peaky=True looks like a trained model's: each frame is confidently one class
    (blank 75% of the time, runs of the same character otherwise), the rest of
    the mass spread thinly. Calibrated on the shipped model's outputs for fresh
    captchas: there ~68% of frames are blank with p >= 0.999 and ~0.9 classes
    per frame have log-prob >= -8; here ~0.6 and ~1.0. peaky=False is flat
    noise, the hard case for beam search (many near-ties)."""
    logits = torch.randn(T, N, C, generator=generator)
    if peaky:
        chars = torch.randint(0, C, (T, N), generator=generator)
        is_blank = torch.rand(T, N, generator=generator) < 0.75
        # characters last ~2 frames: repeat the previous frame's choice half the time
        repeat = torch.rand(T, N, generator=generator) < 0.5
        for t in range(1, T):
            chars[t] = torch.where(repeat[t], chars[t - 1], chars[t])
        target = torch.where(is_blank, torch.full_like(chars, blank), chars)
        confidence = 9.0 + 10.0 * torch.rand(T, N, generator=generator)
        logits.scatter_add_(2, target[..., None], confidence[..., None])
    else:
        logits = logits * 1.5
    return logits.log_softmax(-1).to(dtype)
