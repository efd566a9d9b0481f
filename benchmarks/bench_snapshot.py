"""Cost of vramkit.snapshot() and vramkit.cleanup() on this machine.

Prints medians and the ratio against the same-run reference: on the host a bare
``psutil.Process().memory_info()`` (what a hand-rolled RSS check costs), on CUDA
one ``torch.cuda.mem_get_info()`` (one driver query). Target:
``snapshot("cpu")`` at most 1x psutil's ``memory_info``. Also prints the host
snapshot once the peak is tracked (after a reset, as every session does), when
each reading reads the exact peak as well.

Run: ``python benchmarks/bench_snapshot.py [--device cuda] [--with-funasr] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable

import psutil
from _common import fmt_seconds, interleaved_per_call, load_line, median_seconds, versions

import vramkit
from vramkit.devices import available_devices

TARGET_VS_PSUTIL = 1.0  # snapshot("cpu") against psutil memory_info(), same run


def reference(device: str) -> tuple[str, Callable[[], object]]:
    """The same-run reference for one device: the one system call a snapshot cannot avoid."""
    if device.startswith("cuda"):
        import torch

        return "torch.cuda.mem_get_info()", lambda: torch.cuda.mem_get_info(device)
    return "psutil memory_info()", psutil.Process().memory_info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="the device of the target line")
    parser.add_argument("--with-funasr", action="store_true", help="a realistic heap for gc")
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.with_funasr:
        import funasr  # noqa: F401  - a realistic heap for cleanup's gc.collect
    device = str(vramkit.resolve_device(args.device))
    calls = 500 if args.quick else 2000

    devices = ", ".join(str(d) for d in available_devices())
    print(versions())
    print(
        f"devices: {devices} · gc-tracked objects: {len(gc.get_objects()):,}"
        + (" (funasr imported)" if args.with_funasr else "")
    )
    print(load_line())

    process = psutil.Process()
    ref_name, ref_fn = reference(device)
    cases: dict[str, Callable[[], object]] = {
        "psutil.Process().memory_info()  (reference)": process.memory_info,
        "psutil memory_info() + virtual_memory()": lambda: (
            process.memory_info(),
            psutil.virtual_memory(),
        ),
        "one read of /proc/self/statm": _read_statm,
        "vramkit.snapshot()  (all devices)": vramkit.snapshot,
        'vramkit.snapshot("cpu")': lambda: vramkit.snapshot("cpu"),
        "two snapshots and their difference": lambda: vramkit.snapshot() - vramkit.snapshot(),
    }
    if device != "cpu":
        cases[f"{ref_name}  (reference on {device})"] = ref_fn
        cases[f"vramkit.snapshot({device!r})"] = lambda: vramkit.snapshot(device)
    # Interleaved batches: a busy spell of the machine weighs on every case alike.
    medians = interleaved_per_call(cases, calls=calls // 4, rounds=15)
    psutil_cost = medians["psutil.Process().memory_info()  (reference)"]
    snap_cpu = medians['vramkit.snapshot("cpu")']
    statm = medians["one read of /proc/self/statm"]
    snap_device = medians.get(f"vramkit.snapshot({device!r})", snap_cpu)
    ref_cost = medians.get(f"{ref_name}  (reference on {device})", psutil_cost)

    print()
    print(f"{'operation':<48} {'median':>10} {'vs psutil RSS':>14}")
    for name, cost in medians.items():
        print(f"{name:<48} {fmt_seconds(cost):>10} {cost / psutil_cost:>13.2f}x")

    # Once a peak has been reset (every gpu_session does), each host reading
    # also reads the exact peak from /proc/self/status: what that costs.
    vramkit.resolve_device("cpu").reset_peak()
    tracked = interleaved_per_call(
        {
            "psutil": process.memory_info,
            "snapshot": lambda: vramkit.snapshot("cpu"),
        },
        calls=calls // 4,
        rounds=15,
    )
    label = 'vramkit.snapshot("cpu"), peak tracked'
    print(
        f"{label:<48} {fmt_seconds(tracked['snapshot']):>10} "
        f"{tracked['snapshot'] / tracked['psutil']:>13.2f}x"
    )

    runs = 5 if args.quick else 15
    cleanup_cost = median_seconds(vramkit.cleanup, runs=runs)
    cleanup_no_gc = median_seconds(lambda: vramkit.cleanup(gc_collect=False), runs=runs)
    gc_cost = median_seconds(gc.collect, runs=runs)
    print()
    print(f"{'vramkit.cleanup()':<48} {fmt_seconds(cleanup_cost):>10}")
    print(f"{'  of which gc.collect() alone':<48} {fmt_seconds(gc_cost):>10}")
    print(f"{'vramkit.cleanup(gc_collect=False)':<48} {fmt_seconds(cleanup_no_gc):>10}")
    ratio = snap_cpu / psutil_cost
    verdict = "meets" if ratio <= TARGET_VS_PSUTIL else "MISSES"
    print(
        f'\ntarget: snapshot("cpu") {fmt_seconds(snap_cpu)} = {ratio:.2f}x psutil memory_info() '
        f"{fmt_seconds(psutil_cost)} (target <= {TARGET_VS_PSUTIL:.1f}x): {verdict}"
    )
    print(load_line())
    if args.json:
        figures = {
            "device": device,
            "snapshot_seconds": snap_device,
            "reference": ref_name,
            "reference_seconds": ref_cost,
            "snapshot_cpu_seconds": snap_cpu,
            "psutil_seconds": psutil_cost,
            "statm_seconds": statm,
            "cleanup_seconds": cleanup_cost,
            "loadavg": os.getloadavg()[0],
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


_STATM = os.open("/proc/self/statm", os.O_RDONLY) if os.path.exists("/proc/self/statm") else -1


def _read_statm() -> bytes:
    """One read of an already open ``/proc/self/statm``: the floor of an RSS reading."""
    return os.pread(_STATM, 256, 0) if _STATM >= 0 else b""


if __name__ == "__main__":
    main()
