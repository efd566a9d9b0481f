"""What ``isolate=True`` costs against the same model in-process, measured in one run.

1. A small call: ``mm(x)`` on an ``nn.Linear(8, 8)`` with a 1x8 input, in a
   worker against in-process (interleaved batches). The reference for the
   floor: one round trip of a 100-byte message over a socketpair between two
   processes, on this machine, now. Goal: at most 100 µs added. Wall time on a
   busy machine is mostly waiting for a CPU, so the CPU time a call costs
   (caller plus worker, from getrusage and /proc) is printed too, and so are
   percentiles of single calls timed one by one (the typical call and the
   tail, apart from the machine's rare stalls that a batch's mean carries).
2. A 64 MiB float32 tensor argument and a 64 MiB result (``nn.ReLU``, a fresh
   input each call, so every call moves 128 MiB; the result is dropped before
   the next call, so the pool's buffers are reused): the time isolation adds,
   as bandwidth, against ``memcpy`` bandwidth (``dst.copy_(src)`` of 64 MiB
   between buffers already in memory). Goal: at least 0.5x memcpy.
3. Start to READY: ``load()`` of the linear model in a new worker (spawn,
   imports, the loader) against loading it in-process.
4. Unload to memory back: ``unload()`` of an isolated model holding 256 MiB of
   weights (the worker ends; its pid gone, its RSS zero) against the same
   model unloaded in-process; with the bytes each gave back.

Run: ``python benchmarks/bench_isolation.py [--quick] [--small-only]`` (``--small-only``:
part 1 alone).
"""

from __future__ import annotations

import functools
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import (
    QUANTILES,
    fmt_seconds,
    interleaved_per_call,
    interleaved_percentiles,
    median_seconds,
    versions,
)

from vramkit import ManagedModel
from vramkit.isolation import worker_pid
from vramkit.testing.models import tiny_mlp

GOAL_CALL_ADDED = 100e-6
GOAL_BANDWIDTH_RATIO = 0.5
MIB = 1 << 20
BIG = 64 * MIB


def pipe_round_trip(rounds: int) -> float:
    """Median seconds of a 100-byte round trip to a forked echo process."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo child: no torch, no vramkit, just the socket
        ours.close()
        while data := theirs.recv(65536):
            theirs.sendall(data)
        os._exit(0)
    theirs.close()
    message = b"x" * 100
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(200):
            ours.sendall(message)
            ours.recv(65536)
        samples.append((time.perf_counter() - started) / 200)
    ours.close()
    os.waitpid(pid, 0)
    return statistics.median(samples)


def _schedstat(pid: int) -> tuple[float, float]:
    """Seconds a process's main thread ran on a CPU, and waited for one (ns-exact)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
        ran, waited, _ = fh.read().split()
    return int(ran) / 1e9, int(waited) / 1e9


def cpu_per_call(call: Callable[[], object], calls: int, worker: int | None) -> tuple[float, float]:
    """Per call: CPU seconds (this process plus ``worker``) and seconds spent waiting for a CPU."""
    pids = [os.getpid()] if worker is None else [os.getpid(), worker]
    before = [_schedstat(pid) for pid in pids]
    for _ in range(calls):
        call()
    after = [_schedstat(pid) for pid in pids]
    ran = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    waited = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return ran / calls, waited / calls


def small_calls(quick: bool, floor: float) -> None:
    x = torch.ones(1, 8)
    factory = functools.partial(torch.nn.Linear, 8, 8)
    local = ManagedModel.from_torch(factory, device="cpu", name="in-process")
    isolated = ManagedModel.from_torch(factory, device="cpu", name="isolated", isolate=True)
    local.load()
    isolated.load()
    calls, rounds = (200, 5) if quick else (1000, 11)
    cases: dict[str, Callable[[], object]] = {
        "in-process: mm(x)": lambda: local(x),
        "isolated:   mm(x)": lambda: isolated(x),
    }
    medians = interleaved_per_call(cases, calls=calls, rounds=rounds)
    added = medians["isolated:   mm(x)"] - medians["in-process: mm(x)"]
    cpu_local = cpu_per_call(lambda: local(x), calls * 2, None)
    cpu_isolated = cpu_per_call(lambda: isolated(x), calls * 2, _pid_of(isolated))
    print(
        f"\n1. A small call: nn.Linear(8, 8), 1x8 input, cpu "
        f"(median of {rounds} interleaved batches of {calls} calls; {_load()})"
    )
    for name, cost in medians.items():
        print(f"   {name:<28} {fmt_seconds(cost):>10}")
    print(f"   {'added by isolation':<28} {fmt_seconds(added):>10}")
    print(
        f"   {'CPU per call, in-process':<28} {fmt_seconds(cpu_local[0]):>10}\n"
        f"   {'CPU per call, isolated':<28} {fmt_seconds(cpu_isolated[0]):>10}  (caller + worker)\n"
        f"   {'CPU added by isolation':<28} {fmt_seconds(cpu_isolated[0] - cpu_local[0]):>10}\n"
        f"   {'waiting for a CPU, isolated':<28} {fmt_seconds(cpu_isolated[1]):>10}  "
        "(run queue, per call: the machine's load)"
    )
    reference = "reference: pipe round trip"
    print(f"   {reference:<28} {fmt_seconds(floor):>10}  (100 bytes, no Python work)")
    verdict = "meets" if added <= GOAL_CALL_ADDED else "MISSES"
    print(f"   goal <= {fmt_seconds(GOAL_CALL_ADDED)} added: {verdict}")
    spread = interleaved_percentiles(cases, calls=calls, rounds=rounds)
    print(
        f"   each call timed on its own ({rounds} interleaved batches of {calls}; "
        "not the goal's figure):\n"
        f"   {'':<28} " + " ".join(f"{f'p{round(q * 100)}':>10}" for q in QUANTILES)
    )
    for name, values in spread.items():
        print(f"   {name:<28} " + " ".join(f"{fmt_seconds(v):>10}" for v in values))
    extra = [
        i - o for i, o in zip(spread["isolated:   mm(x)"], spread["in-process: mm(x)"], strict=True)
    ]
    print(
        f"   {'isolated minus in-process':<28} " + " ".join(f"{fmt_seconds(v):>10}" for v in extra)
    )
    isolated.unload()
    local.unload()


def big_tensors(quick: bool) -> None:
    local = ManagedModel.from_torch(torch.nn.ReLU, device="cpu", name="relu")
    isolated = ManagedModel.from_torch(torch.nn.ReLU, device="cpu", name="relu-iso", isolate=True)
    local.load()
    isolated.load()
    numel = BIG // 4
    runs = 5 if quick else 15

    def per_call(call: Callable[[torch.Tensor], object]) -> float:
        """Median seconds of ``call`` on a new tensor each time, made outside the timing."""
        samples = []
        for _ in range(runs):
            x = torch.rand(numel)  # new audio or features each call
            started = time.perf_counter()
            call(x)
            samples.append(time.perf_counter() - started)
            del x
        return statistics.median(samples)

    def in_worker(x: torch.Tensor) -> None:
        result = isolated(x)
        assert result.numel() == numel

    src, dst = torch.rand(numel), torch.empty(numel)
    copy_seconds = median_seconds(lambda: dst.copy_(src), runs=runs * 2)
    local_seconds = per_call(local)
    worker_seconds = per_call(in_worker)
    added = worker_seconds - local_seconds
    memcpy_bandwidth = BIG / copy_seconds
    moved = 2 * BIG  # the argument there, the result back
    bandwidth = moved / added if added > 0 else float("inf")
    ratio = bandwidth / memcpy_bandwidth
    print(
        f"\n2. A 64 MiB float32 argument and a 64 MiB result (nn.ReLU, median of {runs}; {_load()})"
    )
    print(f"   {'in-process call':<32} {fmt_seconds(local_seconds):>10}")
    print(f"   {'isolated call':<32} {fmt_seconds(worker_seconds):>10}")
    print(f"   {'added: 128 MiB moved':<32} {fmt_seconds(added):>10}  = {bandwidth / 1e9:.2f} GB/s")
    print(
        f"   {'reference: memcpy of 64 MiB':<32} {fmt_seconds(copy_seconds):>10}  "
        f"= {memcpy_bandwidth / 1e9:.2f} GB/s"
    )
    verdict = "meets" if ratio >= GOAL_BANDWIDTH_RATIO else "MISSES"
    goal = f"goal >= {GOAL_BANDWIDTH_RATIO}x: {verdict}"
    print(f"   isolation moves data at {ratio:.2f}x memcpy; {goal}")
    isolated.unload()
    local.unload()


def _load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _pid_of(mm: ManagedModel[object]) -> int:
    with mm.use() as proxy:
        return worker_pid(proxy)  # type: ignore[arg-type]


def start_and_unload(quick: bool) -> None:
    runs = 2 if quick else 5
    linear = functools.partial(torch.nn.Linear, 8, 8)
    heavy = functools.partial(tiny_mlp, 256)
    rows: list[tuple[str, float, float]] = []
    for label, factory in (("nn.Linear(8, 8)", linear), ("256 MiB MLP", heavy)):
        for isolate in (False, True):
            loads, unloads, freed = [], [], []
            for _ in range(runs):
                mm = ManagedModel.from_torch(factory, device="cpu", isolate=isolate)
                started = time.perf_counter()
                mm.load()
                loads.append(time.perf_counter() - started)
                pid = _pid_of(mm) if isolate else os.getpid()
                report = mm.unload()
                unloads.append(report.seconds)
                freed.append(report.freed_bytes.get("worker" if isolate else "process") or 0)
                if isolate:
                    assert not os.path.exists(f"/proc/{pid}"), "the worker outlived its unload"
            where = "worker" if isolate else "in-process"
            rows.append((f"{label}, {where}", statistics.median(loads), statistics.median(unloads)))
            print(
                f"   {label + ', ' + where:<30} load {fmt_seconds(rows[-1][1]):>9}   "
                f"unload {fmt_seconds(rows[-1][2]):>9}   "
                f"gave back {statistics.median(freed) / MIB:>7.1f} MiB"
            )


def main() -> None:
    quick = "--quick" in sys.argv
    print(versions(threads=True))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average {load} on {os.cpu_count()} cpus: figures scale with how busy it is")
    # Before any worker starts: forking once threads run is asking for trouble.
    floor = pipe_round_trip(5 if quick else 15)
    small_calls(quick, floor)
    if "--small-only" in sys.argv:
        return
    big_tensors(quick)
    print(
        "\n3-4. Start to READY and unload to memory back "
        f"(median of runs; bytes from RSS; {_load()})"
    )
    start_and_unload(quick)


if __name__ == "__main__":
    main()
