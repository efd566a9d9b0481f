"""Soak: an isolated model loaded, called and unloaded over and over, leaking nothing here.

Each cycle starts a worker (``load``), makes a call that moves a tensor and a
numpy array through shared memory both ways, and unloads (the worker ends).
After a warm-up, the caller's open file descriptors, threads (Python's and the
OS's), shared-memory mappings and its own (and its workers') ``/dev/shm``
entries must not grow, every worker must be gone, and every result must be
right. Short mode runs a dozen
cycles (a worker start costs seconds: torch is imported each time);
``VRAMKIT_STRESS=long`` runs 200.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vramkit import ManagedModel
from vramkit.isolation import worker_pid

from .conftest import Record, scale

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="counts fds, threads and mappings in /proc"
    ),
]

WARMUP = 2
ARRAY = 1 << 18  # float32 elements: 1 MiB, over the inline limit, so shared memory is used


def _os_threads() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


def _shared_mappings() -> int:
    """Mappings of shared-memory files in this process (torch's segments among them)."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
        return sum(1 for line in fh if "/dev/shm/" in line or "(deleted)" in line)


def _ours(entry: str, pids: set[int]) -> bool:
    """A /dev/shm entry torch made for this process or one of its workers (``torch_<pid>_...``).

    Other processes on the machine make and remove entries of their own
    meanwhile: counting those would judge their work, not this test's.
    """
    prefix, _, rest = entry.partition("_")
    pid = rest.partition("_")[0]
    return prefix == "torch" and pid.isdigit() and int(pid) in pids


def _probe(workers: set[int]) -> dict[str, int]:
    shm = Path("/dev/shm")
    pids = {os.getpid(), *workers}
    entries = [p.name for p in shm.iterdir()] if shm.is_dir() else []
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": _os_threads(),
        "shm_mappings": _shared_mappings(),
        "dev_shm_entries": sum(_ours(entry, pids) for entry in entries),
    }


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_load_call_unload_cycles_leak_nothing(reliability: Record) -> None:
    cycles = scale(12, 200)
    mm = ManagedModel("tests.isolation_models:inspector", device="cpu", isolate=True, name="soak")
    tensor = torch.linspace(-1, 1, ARRAY)
    audio = np.linspace(-1, 1, ARRAY, dtype=np.float32)
    baseline: dict[str, int] = {}
    lingering, wrong = [], 0
    workers: set[int] = set()
    started = time.perf_counter()
    for cycle in range(cycles):
        with mm.use() as model:
            pid = worker_pid(model)
            workers.add(pid)
            seen = model.describe(tensor, audio)
            ramp = model.ramp(ARRAY)
        del model
        if seen[0]["sum"] != pytest.approx(float(tensor.double().sum()), abs=1e-3):
            wrong += 1
        if float(ramp[-1]) != ARRAY - 1:
            wrong += 1
        del ramp, seen
        report = mm.unload()
        assert report.ok, report
        if _alive(pid):
            lingering.append(pid)
        if cycle + 1 == WARMUP:
            baseline = _probe(workers)
    end = _probe(workers)
    reliability.area = "isolation"
    reliability.load = f"{cycles} cycles: start a worker, one call with shared tensors, unload"
    reliability.lost = "nothing" if not lingering and not wrong else f"{lingering} {wrong}"
    reliability.figures = {
        "seconds_per_cycle": round((time.perf_counter() - started) / cycles, 2),
        "after_warmup": baseline,
        "end": end,
    }
    assert not lingering, f"workers outlived their unload: {lingering}"
    assert wrong == 0
    assert end == baseline, f"grew: {baseline} -> {end}"
