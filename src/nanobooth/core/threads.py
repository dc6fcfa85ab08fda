"""How many CPU threads torch should use: as many as there are cores actually free.

PyTorch's default (one OpenMP thread per core) degrades badly when the cores are shared: measured on
`toy/dreambooth-lora` on 2 cores beside ONE single-threaded busy job, 2 threads ran 3.9x slower than
alone (0.365 vs 0.093 s/step) while 1 thread lost nothing (0.119 vs 0.126). The cost is OpenMP
workers spinning at barriers for a core that is not there, not lost CPU. So the default thread count
is the number of cores this process may use minus the ones other processes keep busy, measured when a
command starts. `num_threads=N` (config key) or `--threads N` sets it; OMP_NUM_THREADS, if set, is
taken as the user's choice too.

No heavy imports here: the selection runs before torch is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("nanobooth")


def usable_cpus() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # containers: "max 100000" (no cap) or "200000 100000" (2 CPUs)
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_lines(stat_text: str) -> dict[str, tuple[float, float]]:
    """/proc/stat's `cpu`, `cpu0`, `cpu1`... lines as (busy, total) jiffies."""
    out = {}
    for line in stat_text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *rest = line.split()
        fields = [float(x) for x in rest]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already counted in user/nice
        out[name] = (total - idle, total)
    return out


def busy_cpus_from_stat(before: str, after: str, cores: set[int] | None = None) -> float | None:
    """CPUs' worth of work done between two /proc/stat readings, over `cores` (default: all);
    None if no time passed."""
    b, a = _cpu_lines(before), _cpu_lines(after)
    names = [f"cpu{i}" for i in sorted(cores)] if cores else [n for n in a if n != "cpu"]
    busy = 0.0
    counted = 0
    for name in names:
        if name not in a or name not in b or a[name][1] <= b[name][1]:
            continue
        busy += max(0.0, min(1.0, (a[name][0] - b[name][0]) / (a[name][1] - b[name][1])))
        counted += 1
    return busy if counted else None


def measure_busy_cpus(interval: float = 0.25) -> float | None:
    """CPUs (of those this process may use) kept busy by other processes right now: a short
    /proc/stat sample (this process sleeps meanwhile), else the 1-minute load average; None if
    neither can be read."""
    try:
        cores = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cores = None
    try:
        with open("/proc/stat") as f:
            before = f.read()
        time.sleep(interval)
        with open("/proc/stat") as f:
            after = f.read()
        return busy_cpus_from_stat(before, after, cores)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(requested: int | None, cpus: int, busy: float | None, env: str | None = None) -> int:
    """The thread count to use.

    requested: the user's `num_threads` (0 or None = auto); cpus: usable cores; busy: CPUs' worth of
    other processes' work (None = unknown); env: OMP_NUM_THREADS as set by the user, if any.
    Auto = the free cores, rounded to the nearest whole core, at least 1 and at most `cpus`.
    """
    if requested:
        return max(1, int(requested))
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    if busy is None:
        return cpus
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def apply_threads(requested: int | None = None) -> int:
    """Choose (see choose_threads) and set torch's intra-op thread count; returns it."""
    cpus = usable_cpus()
    env = os.environ.get("OMP_NUM_THREADS")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local_world > 1:  # processes of one launch start together: share the cores, do not measure each other
        cpus = max(1, cpus // local_world)
    busy = None if requested or env or local_world > 1 else measure_busy_cpus()
    n = choose_threads(requested, cpus, busy, env)
    import torch

    torch.set_num_threads(n)
    if busy is not None and n < cpus:  # auto on a busy machine: say why it got fewer threads than cores
        log.info("CPU threads: %d of %d (other processes keep %.1f busy; num_threads=N or --threads N to choose)", n, cpus, busy)
    return n


_held: list[int | None] = []


@contextmanager
def threads_when_models_load(requested: int | None):
    """generate, eval, export and toy eval run inside this: their --threads wait for the first model to load
    (load_pipeline calls apply_held_threads), so that a wrong input answers at once, with its one error line, before
    torch is imported or the CPU load sampled. An export that loads no model (a LoRA's keys renamed) keeps torch's
    default. The request ends with the command: a later load in the same process (a notebook) is not touched."""
    _held[:] = [requested]
    try:
        yield
    finally:
        _held.clear()


def apply_held_threads() -> None:
    """apply_threads with the count threads_when_models_load held, once a command (the first model to load sets it)."""
    if _held:
        apply_threads(_held.pop())


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 avx512_bf16 or AMX, Arm bf16), where CPU bf16
    autocast is worth having: the toy recipes' steps ran 1.4-1.6x faster on an AVX-512 EPYC, and 13x slower
    where bf16 is emulated (an AVX2 EPYC: 41 s a v5 UNet step against 3.1 s in fp32; docs/performance.md)."""
    try:
        words = set(cpuinfo.read_text().split())
    except OSError:  # not Linux: no way to tell, so fp32
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
