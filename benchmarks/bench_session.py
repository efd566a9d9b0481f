"""Cost of entering and leaving vramkit's gpu_session, on a process with a realistic heap.

Imports funasr and loads the tiny offline VAD + ASR + punctuation pipeline
when funasr is installed (about 430,000 gc-tracked objects: the heap a
transcription service has), since the census and gc.collect() scale with it.
Prints medians and the ratio against two bare ``vramkit.snapshot()`` calls
(what the session itself must take). Run: ``python benchmarks/bench_session.py``.
"""

from __future__ import annotations

import gc
import tempfile
from typing import Any

from _common import fmt_seconds, load_heap, median_per_call, median_seconds, versions

import vramkit
from vramkit.devices import default_device
from vramkit.policy import CleanupPolicy
from vramkit.session import gpu_session

GOAL_SECONDS = 1e-3  # entering + leaving without a leak check


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        heap, model = load_heap(workdir)
        device = default_device()
        tensors = vramkit.live_tensors(device)
        print(versions())
        print(f"device: {device} · {heap}")
        print(
            f"heap: {len(gc.get_objects()):,} gc-tracked objects, "
            f"{len(tensors)} live tensors on {device} ({vramkit.format_bytes(tensors.total_bytes)})"
        )

        def two_snapshots() -> None:
            vramkit.snapshot(device)
            vramkit.snapshot(device)

        def enter_leave(session: Any) -> None:
            with session:
                pass

        bare = gpu_session(device, leak_check=None, cleanup=False)
        cleaned = gpu_session(device, leak_check=None, cleanup=True)
        checked = gpu_session(device, leak_check="raise")
        checked_lazy = gpu_session(device, leak_check="raise", cleanup=False)

        @gpu_session(device, leak_check=None, cleanup=False)
        def decorated() -> None:
            return None

        tracker = CleanupPolicy.default().tracker(device)

        baseline = median_per_call(two_snapshots, calls=2000)
        rows = [
            ("two vramkit.snapshot() calls  (baseline)", baseline),
            (
                "gpu_session(leak_check=None, cleanup=False)",
                median_per_call(lambda: enter_leave(bare), calls=2000),
            ),
            ("  the same, as a decorator on a no-op", median_per_call(decorated, calls=2000)),
            (
                "gpu_session(leak_check=None, cleanup=True)",
                median_seconds(lambda: enter_leave(cleaned), runs=15),
            ),
            (
                'gpu_session(leak_check="raise")  (cleanup=True)',
                median_seconds(lambda: enter_leave(checked), runs=15),
            ),
            (
                'gpu_session(leak_check="raise", cleanup=False)',
                median_seconds(lambda: enter_leave(checked_lazy), runs=15),
            ),
            (
                "CleanupPolicy.default() tracker.after_call()",
                median_per_call(tracker.after_call, calls=20000),
            ),
        ]
        print()
        print(f"{'enter + leave':<52} {'median':>10} {'vs baseline':>12}")
        for name, cost in rows:
            print(f"{name:<52} {fmt_seconds(cost):>10} {cost / baseline:>11.2f}x")
        fast = rows[1][1]
        verdict = "meets" if fast < GOAL_SECONDS else "MISSES"
        print(
            f"\nwithout a leak check: {fmt_seconds(fast)} per entry, {verdict} the "
            f"{fmt_seconds(GOAL_SECONDS)} goal"
        )
        print(
            "with a leak check, two heap censuses (and a gc.collect() with cleanup=True) "
            "dominate: for tests and spot checks, not for every request"
        )
        del model


if __name__ == "__main__":
    main()
