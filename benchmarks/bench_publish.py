"""What publishing the process's models for ``vramkit ps`` costs.

Every process that uses vramkit rewrites one small JSON record in its runtime
directory on each model transition (an events subscriber), never on a lease.

1. One publish (describe the models and pools, serialise, write a temporary
   file, rename it over the record) with 4 and with 32 models in a pool,
   against describing alone.
2. The cheapest real transition there is, ``offload("cpu")`` + ``wake()`` of a
   tiny model on cpu (two transitions, two publishes), with publishing on and
   off in alternating batches: the share of a transition that publishing takes.
3. A lease (``with mm.use() as m: m(x)``) with the publisher subscribed and with
   no subscriber at all, in alternating batches: leases emit no event, so the
   two must match (and ``bench_model.py``'s lease figures must not move).

Run: ``python benchmarks/bench_publish.py [--quick]``.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from _common import fmt_seconds, median_seconds, versions

from vramkit import ManagedModel, ModelPool, events
from vramkit._runtime import publisher
from vramkit.testing.models import tiny_mlp


def part1(quick: bool) -> None:
    runs = 200 if quick else 1000
    print("\n1. One publish (describe + JSON + write + rename) against describing alone")
    print(f"{'models':>6} {'publish':>10} {'describe':>10} {'record':>9}")
    made = publisher()
    assert made is not None
    for count in (4, 32):
        with ModelPool("cpu", budget="1GiB", headroom=0, name=f"bench{count}") as pool:
            for i in range(count):
                pool.register(f"m{i}", lambda: tiny_mlp(0.1), size_hint="128KiB").load()
            publish = median_seconds(made.publish, runs=runs)
            describe = median_seconds(made._describe, runs=runs)
            size = made.path.stat().st_size if made.path is not None else 0
            print(f"{count:>6} {fmt_seconds(publish):>10} {fmt_seconds(describe):>10} {size:>7} B")
        del pool
        gc.collect()  # the closed pool's models would stay in every later record


def _alternate(
    cases: dict[str, Callable[[], None]], *, batch: int, rounds: int
) -> dict[str, float]:
    """Median time per call of each case, measured in alternating batches."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            started = time.perf_counter()
            for _ in range(batch):
                run()
            samples[name].append((time.perf_counter() - started) / batch)
    return {name: statistics.median(values) for name, values in samples.items()}


def part2(quick: bool) -> None:
    mm = ManagedModel(lambda: tiny_mlp(1), name="cycled", device="cpu")
    mm.load()

    def cycle() -> None:
        mm.offload("cpu")
        mm.wake()

    def published() -> None:
        os.environ.pop("VRAMKIT_PUBLISH", None)
        cycle()

    def unpublished() -> None:
        os.environ["VRAMKIT_PUBLISH"] = "0"
        cycle()

    batch, rounds = (20, 5) if quick else (50, 15)
    medians = _alternate({"on": published, "off": unpublished}, batch=batch, rounds=rounds)
    os.environ.pop("VRAMKIT_PUBLISH", None)
    on, off = medians["on"] / 2, medians["off"] / 2
    print(
        f"\n2. Per transition: offload('cpu') + wake() of a 1 MiB model on cpu "
        f"(median of {rounds} alternating batches of {batch} cycles)"
    )
    print(f"  publishing on   {fmt_seconds(on):>9} per transition")
    print(f"  publishing off  {fmt_seconds(off):>9} per transition (same-run reference)")
    print(f"  publishing adds {fmt_seconds(on - off):>9} ({on / off:.2f}x the transition alone)")
    mm.close()


def part3(quick: bool) -> None:
    x = torch.ones(1, 8)
    mm = ManagedModel(lambda: torch.nn.Linear(8, 8), name="leased", device="cpu")
    mm.load()
    subscribed = events._subscribers
    assert publisher() in subscribed

    def lease() -> None:
        with mm.use() as m:
            m(x)

    def with_publisher() -> None:
        events._subscribers = subscribed
        lease()

    def without_subscribers() -> None:
        events._subscribers = ()
        lease()

    batch, rounds = (2000, 7) if quick else (5000, 21)
    try:
        medians = _alternate(
            {"on": with_publisher, "off": without_subscribers}, batch=batch, rounds=rounds
        )
    finally:
        events._subscribers = subscribed
    on, off = medians["on"], medians["off"]
    print(
        f"\n3. A lease, with m(x) on nn.Linear(8, 8) (median of {rounds} alternating batches "
        f"of {batch})"
    )
    print(f"  publisher subscribed   {on * 1e9:>6.0f} ns")
    print(f"  no subscriber at all   {off * 1e9:>6.0f} ns (same-run reference)")
    print(
        f"  ratio                  {on / off:>6.3f}x (leases emit no event: nothing is published)"
    )
    mm.close()


def main() -> None:
    quick = "--quick" in sys.argv
    print(versions(threads=True))
    # The default directory (memory-backed where the system has /dev/shm), in a
    # fresh subdirectory so that other processes' records are not read or swept.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as directory:
        os.environ["VRAMKIT_RUNTIME_DIR"] = os.path.join(directory, "run")
        print(f"runtime directory under {base or tempfile.gettempdir()}")
        part1(quick)
        part2(quick)
        part3(quick)
        made = publisher()
        if made is not None:
            made.close()


if __name__ == "__main__":
    main()
