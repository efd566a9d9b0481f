"""Cost of vramkit.snapshot() and vramkit.cleanup() on this machine.

Prints medians and the ratio against a bare ``psutil.Process().memory_info()``
(what a hand-rolled RSS check costs). Run: ``python benchmarks/bench_snapshot.py``.
"""

from __future__ import annotations

import gc
import sys

import psutil
from _common import fmt_seconds, median_per_call, median_seconds, versions

import vramkit
from vramkit.devices import available_devices


def main() -> None:
    heavy = "--with-funasr" in sys.argv
    if heavy:
        import funasr  # noqa: F401  - a realistic heap for cleanup's gc.collect

    devices = ", ".join(str(d) for d in available_devices())
    print(versions())
    print(
        f"devices: {devices} · gc-tracked objects: {len(gc.get_objects()):,}"
        + (" (funasr imported)" if heavy else "")
    )

    process = psutil.Process()
    psutil_cost = median_per_call(process.memory_info, calls=2000)
    psutil_full = median_per_call(
        lambda: (process.memory_info(), psutil.virtual_memory()), calls=2000
    )
    snap_cost = median_per_call(vramkit.snapshot, calls=2000)
    snap_cpu = median_per_call(lambda: vramkit.snapshot("cpu"), calls=2000)
    delta_cost = median_per_call(lambda: vramkit.snapshot() - vramkit.snapshot(), calls=1000)

    print()
    print(f"{'operation':<48} {'median':>10} {'vs psutil RSS':>14}")
    rows = [
        ("psutil.Process().memory_info()  (baseline)", psutil_cost),
        ("psutil memory_info() + virtual_memory()", psutil_full),
        ("vramkit.snapshot()  (all devices)", snap_cost),
        ('vramkit.snapshot("cpu")', snap_cpu),
        ("two snapshots and their difference", delta_cost),
    ]
    for name, cost in rows:
        print(f"{name:<48} {fmt_seconds(cost):>10} {cost / psutil_cost:>13.2f}x")

    cleanup_cost = median_seconds(vramkit.cleanup, runs=15)
    cleanup_no_gc = median_seconds(lambda: vramkit.cleanup(gc_collect=False), runs=15)
    gc_cost = median_seconds(gc.collect, runs=15)
    print()
    print(f"{'vramkit.cleanup()':<48} {fmt_seconds(cleanup_cost):>10}")
    print(f"{'  of which gc.collect() alone':<48} {fmt_seconds(gc_cost):>10}")
    print(f"{'vramkit.cleanup(gc_collect=False)':<48} {fmt_seconds(cleanup_no_gc):>10}")
    goal = 50e-6
    verdict = "meets" if snap_cost < goal else "MISSES"
    print(f"\nsnapshot median {fmt_seconds(snap_cost)}: {verdict} the 50 µs goal")


if __name__ == "__main__":
    main()
