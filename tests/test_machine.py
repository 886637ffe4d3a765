"""machine.py: the bf16 decision from the CPU's own flags, and the CPUs free to this process,
each from a simulated /proc (and /sys/fs/cgroup) under a temporary root."""
from pathlib import Path

import pytest
import torch

from captcha_fast import export, machine

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt aes xsave avx f16c"
CPUS = {  # flags of each kind of x86 server CPU (abridged to what matters here)
    "avx2 (AMD EPYC Zen 2/3)": (BASE + " fma avx2 bmi2", False),
    "avx512 without bf16 (Intel Skylake-SP..Ice Lake)": (BASE + " fma avx2 avx512f avx512dq avx512bw avx512vl "
                                                         "avx512_vnni", False),
    "avx512_bf16 (AMD EPYC Zen 4)": (BASE + " fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16", True),
    "amx (Intel Sapphire Rapids)": (BASE + " fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile "
                                    "amx_int8", True),
    "amx_bf16 listed without avx512_bf16": (BASE + " fma avx2 avx512f amx_bf16 amx_tile", True),
}


def fake_root(tmp_path: Path, files: dict) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def cpuinfo(flags: str, n: int = 2) -> str:
    return "".join(f"processor\t: {i}\nvendor_id\t: Some\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                   for i in range(n))


@pytest.mark.parametrize("kind", CPUS)
def test_native_bf16_follows_the_cpu_flags(tmp_path, kind):
    flags, native = CPUS[kind]
    root = fake_root(tmp_path, {"proc/cpuinfo": cpuinfo(flags)})
    assert machine.native_bf16("cpu", root=root) is native


def test_native_bf16_needs_every_cpu_to_have_it(tmp_path):
    with_bf16, without = CPUS["avx512_bf16 (AMD EPYC Zen 4)"][0], CPUS["avx2 (AMD EPYC Zen 2/3)"][0]
    root = fake_root(tmp_path, {"proc/cpuinfo": cpuinfo(with_bf16, 1) + cpuinfo(without, 1)})
    assert not machine.native_bf16("cpu", root=root)


def test_no_cpuinfo_or_no_x86_flags_means_no_native_bf16(tmp_path):
    assert not machine.native_bf16("cpu", root=tmp_path)  # no /proc (not Linux)
    arm = fake_root(tmp_path / "arm", {"proc/cpuinfo": "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n\n"})
    assert not machine.native_bf16("cpu", root=arm)


@pytest.mark.parametrize("kind", CPUS)
def test_resolve_dtype_takes_bf16_only_on_native_bf16_cpus(monkeypatch, tmp_path, kind):
    """The precision policy reads the same decision: bf16 by default only where it is native (an
    emulating AVX-512 CPU keeps float32, although oneDNN says it supports bf16); "low" is bf16 anywhere."""
    flags, native = CPUS[kind]
    monkeypatch.setattr(machine, "ROOT", fake_root(tmp_path, {"proc/cpuinfo": cpuinfo(flags)}))
    cpu = torch.device("cpu")
    assert export.resolve_dtype(None, cpu) == (torch.bfloat16 if native else torch.float32)
    assert export.resolve_dtype("auto", cpu) == export.resolve_dtype(None, cpu)
    assert export.resolve_dtype("low", cpu) == torch.bfloat16
    assert export.resolve_dtype("float32", cpu) == torch.float32
