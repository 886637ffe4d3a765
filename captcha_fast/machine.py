"""What this machine offers the process: native bf16, and CPUs free to it.

Imported by inference (export, api) and training alike; it imports nothing of captcha_fast.
Every reader takes `root` (None: ROOT, "/") so that tests can feed it a simulated /proc and /sys."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

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
    """Whether `device` runs bf16 natively, the one bf16 decision (formats.resolve_dtype, training):
    CUDA: torch.cuda.is_bf16_supported(); CPU: a NATIVE_BF16_FLAGS flag in /proc/cpuinfo -- not
    torch.ops.mkldnn._is_mkldnn_bf16_supported(), which answers True for any AVX-512 CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpu_flags_under(Path(root or ROOT))
    return device.type == "cpu" and any(f in flags for f in NATIVE_BF16_FLAGS)


# ----------------------------------------------------------------------------- CPUs free to this process

def cpu_quota(root: Optional[Path] = None) -> Optional[float]:
    """The CPU time this process's cgroups allow, in CPUs (quota / period, the strictest of its
    cgroup and those above it), or None when unlimited (or no cgroup is readable).
    cgroup v2: cpu.max ("max 100000", "150000 100000"); v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us."""
    root = Path(root or ROOT)
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: List[float] = []
    for line in lines:  # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1].split(","), parts[2]
        if parts[1] == "":
            limits += [q for d in _cgroup_dirs(root / "sys" / "fs" / "cgroup", path) if (q := _v2_quota(d)) is not None]
        elif "cpu" in controllers:
            for mount in (parts[1], "cpu,cpuacct", "cpuacct,cpu", "cpu"):
                base = root / "sys" / "fs" / "cgroup" / mount
                if base.is_dir():
                    limits += [q for d in _cgroup_dirs(base, path) if (q := _v1_quota(d)) is not None]
                    break
    return min(limits) if limits else None


def _cgroup_dirs(base: Path, path: str) -> List[Path]:
    """base/path and the directories above it up to base, those that exist (inside a container the
    cgroup's own directory is often mounted as base itself)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [d for d in (base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)) if d.is_dir()]


def _v2_quota(d: Path) -> Optional[float]:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(d: Path) -> Optional[float]:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return None if quota < 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


class CpuSample(NamedTuple):
    """Cumulative CPU time at one moment, in clock ticks: per CPU (busy, total) from /proc/stat
    (busy: all but idle and iowait; steal counts as busy), and this process's own (utime + stime)."""
    per_cpu: Dict[int, Tuple[int, int]]
    own: int


def cpu_sample(root: Optional[Path] = None) -> Optional[CpuSample]:
    """A CpuSample, or None where /proc is not readable (not Linux)."""
    root = Path(root or ROOT)
    try:
        stat = (root / "proc" / "stat").read_text()
        own_stat = (root / "proc" / "self" / "stat").read_text()
    except OSError:
        return None
    per_cpu = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            per_cpu[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    after_comm = own_stat.rsplit(")", 1)[1].split()  # the name may hold spaces; fields from 3 (state) on
    return CpuSample(per_cpu, int(after_comm[11]) + int(after_comm[12]))  # utime, stime: fields 14, 15


def others_busy(before: CpuSample, after: CpuSample, cpus: Set[int]) -> float:
    """CPUs' worth of time that other processes kept `cpus` busy between two samples: the busy time
    of those CPUs less this process's own (which runs only on them), per CPU of elapsed time."""
    cpus = {c for c in cpus if c in before.per_cpu and c in after.per_cpu}
    busy = sum(after.per_cpu[c][0] - before.per_cpu[c][0] for c in cpus)
    total = sum(after.per_cpu[c][1] - before.per_cpu[c][1] for c in cpus)
    if not cpus or total <= 0:
        return 0.0
    return max(0.0, (busy - (after.own - before.own)) / (total / len(cpus)))


class ThreadDecision(NamedTuple):
    threads: int                   # what predict_batch runs with: min(cap, free), at least 1
    free: int                      # CPUs free to this process
    cpus: int                      # CPUs in this process's affinity mask
    quota: Optional[float]         # the cgroup's CPU quota, in CPUs (None: none)
    others: float                  # CPUs' worth other processes kept busy lately
    cap: int                       # the caller's torch thread count


class AutoThreads:
    """predict_batch's default thread count: the caller's torch thread count, capped by the CPUs
    free to this process -- those of its affinity mask that other processes did not keep busy since
    the last look (never its own load), and at most its cgroup's CPU quota -- at least 1. A thread
    without a core of its own stalls every parallel region of the others, so under load fewer
    threads beat more (docs/speed.md).

    Looked at once a second at most (from the time since the previous look; the first look measures
    over FIRST_WINDOW seconds). apply() changes torch's count only when the decision changes, and
    leaves it set between calls; a count the caller sets meanwhile (torch.set_num_threads) becomes
    the new cap. Thread-safe."""

    LOOK_EVERY = 1.0
    FIRST_WINDOW = 0.1

    def __init__(self, root: Optional[Path] = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, affinity: Optional[Callable[[], Set[int]]] = None):
        self.root, self.clock, self.sleep = root, clock, sleep
        self.affinity = affinity or _affinity
        self.lock = threading.Lock()
        self.sample: Optional[CpuSample] = None
        self.when = -float("inf")
        self.cap = 0                       # the caller's torch thread count
        self.applied: Optional[int] = None  # the count apply() last set
        self.last: Optional[ThreadDecision] = None

    def decide(self) -> ThreadDecision:
        with self.lock:
            return self._decide()

    def apply(self) -> int:
        """Set torch's thread count to the decision (only if it differs); returns it."""
        with self.lock:
            n = self._decide().threads
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
            self.applied = n
            return n

    def _decide(self) -> ThreadDecision:
        current = torch.get_num_threads()
        cap = self.cap if self.applied is not None and current == self.applied else current
        if self.last is not None and self.clock() - self.when < self.LOOK_EVERY:
            if cap != self.last.cap:  # the caller changed torch's count: same CPUs, new cap
                self.last = self.last._replace(threads=max(1, min(cap, self.last.free)), cap=cap)
            self.cap = cap
            return self.last
        self.cap = cap
        before = self.sample
        if before is None:  # the first look: a short window of its own
            before = cpu_sample(self.root)
            if before is not None:
                self.sleep(self.FIRST_WINDOW)
        after = cpu_sample(self.root)
        cpus = self.affinity()
        others = others_busy(before, after, cpus) if before is not None and after is not None else 0.0
        quota = cpu_quota(self.root)
        free = len(cpus) - round(others)
        if quota is not None:
            free = min(free, int(quota))  # a thread beyond the quota waits for the next period
        self.sample, self.when = after, self.clock()
        self.last = ThreadDecision(max(1, min(cap, free)), free, len(cpus), quota, others, cap)
        return self.last


def _affinity() -> Set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


_AUTO = AutoThreads()


def auto_threads() -> int:
    """The thread count predict_batch runs with by default (AutoThreads; torch's count is not changed)."""
    return _AUTO.decide().threads


def use_auto_threads() -> int:
    """Set torch's thread count to auto_threads() if it differs (left set: see AutoThreads); returns it."""
    return _AUTO.apply()


def thread_decision() -> ThreadDecision:
    """auto_threads() and what it was decided from (for `captcha-fast info`)."""
    return _AUTO.decide()


@contextlib.contextmanager
def num_threads(n: int):
    """torch.set_num_threads(n) inside the block, restored after (an explicit `threads=`)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)
