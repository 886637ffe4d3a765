"""What this machine offers the process: native bf16, and CPUs free to it.

Imported by inference (export, api) and training alike; it imports nothing of captcha_fast.
Every reader takes `root` (None: ROOT, "/") so that tests can feed it a simulated /proc and /sys."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import FrozenSet, Optional, Union

import torch

ROOT = Path("/")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags of native bf16 arithmetic (AVX-512 BF16: AMD Zen 4+, Intel Cooper Lake; AMX: Intel
Sapphire Rapids+). Other AVX-512 CPUs (Skylake to Ice Lake servers) emulate bf16 in oneDNN, where
bf16 convolutions run slower than fp32; on an AVX2-only CPU they measured ~25x slower."""


def cpu_flags(cpuinfo: str) -> FrozenSet[str]:
    """The flags every processor lists in /proc/cpuinfo text (x86 "flags" lines; empty if none)."""
    per_cpu = [set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
               if line.split(":", 1)[0].strip() == "flags" and ":" in line]
    return frozenset(set.intersection(*per_cpu)) if per_cpu else frozenset()


@lru_cache(maxsize=8)
def _cpu_flags_under(root: Path) -> FrozenSet[str]:
    try:
        return cpu_flags((root / "proc" / "cpuinfo").read_text())
    except OSError:  # not Linux: no native bf16 known
        return frozenset()


def native_bf16(device: Union[str, torch.device] = "cpu", root: Optional[Path] = None) -> bool:
    """Whether `device` runs bf16 natively, the one bf16 decision (export.resolve_dtype, training):
    CUDA: torch.cuda.is_bf16_supported(); CPU: a NATIVE_BF16_FLAGS flag in /proc/cpuinfo -- not
    torch.ops.mkldnn._is_mkldnn_bf16_supported(), which answers True for any AVX-512 CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpu_flags_under(Path(root or ROOT))
    return device.type == "cpu" and any(f in flags for f in NATIVE_BF16_FLAGS)
