"""machine.py: the bf16 decision from the CPU's own flags, and the CPUs free to this process,
each from a simulated /proc (and /sys/fs/cgroup) under a temporary root."""
from pathlib import Path

import pytest
import torch

from captcha_fast import formats, machine

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
    assert formats.resolve_dtype(None, cpu) == (torch.bfloat16 if native else torch.float32)
    assert formats.resolve_dtype("auto", cpu) == formats.resolve_dtype(None, cpu)
    assert formats.resolve_dtype("low", cpu) == torch.bfloat16
    assert formats.resolve_dtype("float32", cpu) == torch.float32


# ----------------------------------------------------------------------------- CPUs free to this process

class FakeMachine:
    """/proc/stat, /proc/self/stat and cgroup files under `root`, with a clock: run() lets time pass
    with given CPUs busy (a fraction of each second, this process's own share included)."""

    def __init__(self, root: Path, n_cpus: int):
        self.root, self.t, self.n = root, 0.0, n_cpus
        self.busy, self.total, self.own = [0] * n_cpus, [0] * n_cpus, 0
        self.write()

    def run(self, seconds: float, busy: dict, own: float = 0.0):
        ticks = round(seconds * 100)  # USER_HZ
        for c in range(self.n):
            self.total[c] += ticks
            self.busy[c] += round(busy.get(c, 0.0) * ticks)
        self.own += round(own * ticks)
        self.t += seconds
        self.write()

    def write(self):
        rows = []
        for c in range(self.n):  # user nice system idle iowait irq softirq steal guest guest_nice
            b, idle = self.busy[c], self.total[c] - self.busy[c]
            rows.append(f"cpu{c} {b - b // 4} 0 {b // 4 - b // 8} {idle - idle // 10} {idle // 10} 0 0 {b // 8} 0 0")
        head = "cpu  " + " ".join(str(sum(int(r.split()[i]) for r in rows)) for i in range(1, 11))
        fake_root(self.root, {"proc/stat": "\n".join([head, *rows, "intr 1 2 3", "ctxt 99", "procs_running 60"]) + "\n",
                              # a process name with spaces and a parenthesis, as comm may hold
                              "proc/self/stat": f"4242 (my (odd) proc) R 1 4242 4242 0 -1 4194304 10 0 0 0 "
                                                f"{self.own - self.own // 3} {self.own // 3} 0 0 20 0 8 0 100\n"})


@pytest.fixture
def torch_threads():
    """Lets a test set torch's thread count; restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def auto(fake: FakeMachine, cpus, load: dict, own: float = 0.0):
    """An AutoThreads over the fake machine; during its first look's window `load` runs."""
    return machine.AutoThreads(root=fake.root, clock=lambda: fake.t, sleep=lambda s: fake.run(s, load, own),
                               affinity=lambda: set(cpus))


def test_a_pinned_process_on_idle_cpus_of_a_busy_host_uses_them_all(tmp_path, torch_threads):
    """Pinned to CPUs 0-3 of a 64-CPU host whose other 60 CPUs are busy: all 4 are free (the host's
    runnable tasks, /proc/loadavg, say 60 and would leave 1 thread)."""
    torch_threads(4)
    fake = FakeMachine(tmp_path, 64)
    busy_host = {c: 1.0 for c in range(4, 64)}
    fake_root(tmp_path, {"proc/loadavg": "60.1 58.0 55.2 61/900 4242\n"})
    a = auto(fake, range(4), busy_host)
    d = a.decide()
    assert (d.threads, d.cpus, d.others) == (4, 4, 0.0)


def test_its_own_load_is_never_counted_and_others_load_is(tmp_path, torch_threads):
    torch_threads(4)
    fake = FakeMachine(tmp_path, 4)
    # the first look: this process keeps all four CPUs busy itself
    a = auto(fake, range(4), {c: 1.0 for c in range(4)}, own=4.0)
    assert a.decide().threads == 4
    # a second later: others keep CPUs 0 and 1 busy, this process uses CPUs 2 and 3 half the time
    fake.run(1.5, {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.5}, own=1.0)
    d = a.decide()
    assert d.others == pytest.approx(2.0) and d.threads == 2
    fake.run(0.5, {})  # looked at once a second at most: the same decision meanwhile
    assert a.decide() is d
    fake.run(1.0, {0: 0.2}, own=0.0)  # the load has gone (0.2 CPU rounds to none)
    assert a.decide().threads == 4


@pytest.mark.parametrize("files, quota", [
    ({}, None),
    ({"proc/self/cgroup": "0::/user.slice/app\n", "sys/fs/cgroup/user.slice/app/cpu.max": "max 100000\n"}, None),
    ({"proc/self/cgroup": "0::/app\n", "sys/fs/cgroup/app/cpu.max": "150000 100000\n"}, 1.5),
    ({"proc/self/cgroup": "0::/a/b\n", "sys/fs/cgroup/a/cpu.max": "100000 100000\n",   # the parent is stricter
      "sys/fs/cgroup/a/b/cpu.max": "300000 100000\n"}, 1.0),
    ({"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "200000 100000\n"}, 2.0),  # a container's namespace
    ({"proc/self/cgroup": "0::/docker/abc\n", "sys/fs/cgroup/cpu.max": "50000 100000\n"}, 0.5),  # host path, own mount
    ({"proc/self/cgroup": "12:memory:/x\n4:cpu,cpuacct:/x\n", "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us": "200000\n",
      "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
    ({"proc/self/cgroup": "4:cpu,cpuacct:/x\n", "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us": "-1\n",
      "sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"}, None),
])
def test_cpu_quota_from_cgroup_v1_and_v2(tmp_path, files, quota):
    assert machine.cpu_quota(fake_root(tmp_path, files)) == quota


def test_the_quota_caps_the_threads(tmp_path, torch_threads):
    torch_threads(8)
    fake = FakeMachine(tmp_path, 8)
    fake_root(tmp_path, {"proc/self/cgroup": "0::/job\n", "sys/fs/cgroup/job/cpu.max": "250000 100000\n"})
    d = auto(fake, range(8), {}).decide()
    assert (d.threads, d.quota) == (2, 2.5)


def test_torch_threads_change_only_when_the_decision_does(tmp_path, monkeypatch, torch_threads):
    torch_threads(4)
    fake = FakeMachine(tmp_path, 4)
    a = auto(fake, range(4), {0: 1.0, 1: 1.0})  # others keep two CPUs busy
    calls = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    assert a.apply() == 2
    for _ in range(2):
        fake.run(1.2, {0: 1.0, 1: 1.0})
        assert a.apply() == 2
    assert calls == [2] and torch.get_num_threads() == 2
    fake.run(1.2, {})  # the load has gone: back to the caller's 4, not to the 2 set meanwhile
    assert a.apply() == 4 and calls == [2, 4]
    set_threads(3)  # the caller's own choice becomes the cap
    fake.run(1.2, {})
    assert a.apply() == 3 and calls == [2, 4]  # 3 is already set: nothing to change


def test_predict_batch_sets_the_auto_count_once_under_steady_load(tmp_path, monkeypatch, torch_threads):
    from captcha_fast import api
    from conftest import tiny_model

    torch_threads(2)
    fake = FakeMachine(tmp_path, 2)
    monkeypatch.setattr(machine, "_AUTO", auto(fake, range(2), {0: 1.0}))  # another process keeps a CPU busy
    calls = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    rec = api.Recognizer(tiny_model()).eval()
    images = [torch.zeros(1, 32, 64, dtype=torch.uint8)]
    api.predict_batch(images, rec)
    fake.run(1.2, {0: 1.0})
    api.predict_batch(images, rec)
    assert calls == [1]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads the real /proc (Linux)")
def test_this_machines_proc_reads():
    """The readers parse this kernel's own files: every CPU of the affinity mask has counters, and
    this process's CPU time grows while it works."""
    import os
    import time

    before = machine.cpu_sample()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    after = machine.cpu_sample()
    assert set(os.sched_getaffinity(0)) <= set(after.per_cpu)
    assert all(0 <= busy <= total for busy, total in after.per_cpu.values())
    assert after.own - before.own >= 10  # 0.3 s of CPU, in 1/100 s ticks (allowing for tick rounding)
    assert 1 <= machine.auto_threads() <= torch.get_num_threads()
