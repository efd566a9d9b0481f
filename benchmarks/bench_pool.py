"""The demo pipeline (ASR -> LLM -> TTS) through a ModelPool, against the best possible.

Runs the pipeline over N items (default 30) with the budget at 1.2x the largest
model, then again with memory to spare, and prints:

- loads + wakes the pool performed vs the minimum any policy could achieve for
  that sequence and budget (exact, by dynamic programming over which models are
  resident),
- peak bytes charged to the pool vs the budget,
- wall time vs the unlimited-memory run (the price of fitting in the budget).

With ``--micro`` it measures instead what the pool adds per call, against
same-run references: ``pool.use(name)`` against ``mm.use()`` of the same
loaded model (target: at most 1.2x), and one admission decision (room found,
nothing to evict) and one victim choice in pools of 10, 100 and 1,000 loaded
members (target at 1,000: at most 100 µs each).

Run: ``python benchmarks/bench_pool.py [--items 30] [--device cuda] [--micro]``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from vramkit._units import format_bytes
from vramkit.demo import STAGES, run_pipeline


def minimum_fetches(
    sequence: list[str], sizes: dict[str, int], capacity: int, headroom: int
) -> int:
    """Fewest loads+wakes any eviction policy needs to serve ``sequence`` within the budget.

    State: the set of resident models. Using a model that is not resident costs
    one fetch; it must then fit (with headroom) next to whatever stays resident.
    """
    names = sorted(sizes)
    states = [
        frozenset(c)
        for r in range(len(names) + 1)
        for c in itertools.combinations(names, r)
        if sum(sizes[n] for n in c) <= capacity
    ]
    infinity = 10**9
    cost = {s: (0 if not s else infinity) for s in states}
    for name in sequence:
        nxt = dict.fromkeys(states, infinity)
        for state, so_far in cost.items():
            if so_far >= infinity:
                continue
            if name in state:
                nxt[state] = min(nxt[state], so_far)
                continue
            for kept in states:  # evict down to `kept`, then fetch `name`
                if not kept <= state:
                    continue
                after = kept | {name}
                room = sum(sizes[n] for n in kept) + sizes[name] + headroom <= capacity
                if room and after in nxt:
                    nxt[after] = min(nxt[after], so_far + 1)
        cost = nxt
    return min(cost.values())


TARGET_POOL_USE_VS_USE = 1.2
TARGET_ADMISSION_SECONDS = 100e-6  # at 1,000 members
MEMBER_COUNTS = (10, 100, 1000)


def micro(quick: bool) -> None:
    """Per-call costs of a pool: a lease through it, and admission as members grow."""

    import torch
    from _common import fmt_seconds, interleaved_per_call, load_line, versions

    from vramkit import ManagedModel, ModelPool

    print(versions())
    print(load_line())
    with ModelPool("cpu", budget="1GiB", headroom=0, start_threads=False) as pool:
        # Fresh layers: a factory returning one kept here would survive each
        # unload and send it looking for the holder.
        pooled = pool.register("layer", lambda: torch.nn.Linear(4, 4), inference_mode=False)
        pooled.load()
        alone = ManagedModel(
            lambda: torch.nn.Linear(4, 4), name="alone", device="cpu", inference_mode=False
        )
        alone.load()

        def bare_use() -> None:
            with alone.use():
                pass

        def pool_use() -> None:
            with pool.use("layer"):
                pass

        calls = 500 if quick else 2000
        medians = interleaved_per_call(
            {"mm.use()": bare_use, "pool.use(name)": pool_use}, calls=calls
        )
        ratio = medians["pool.use(name)"] / medians["mm.use()"]
        print(f"\n{'empty lease':<40} {'median':>10}")
        for name, cost in medians.items():
            print(f"{name:<40} {fmt_seconds(cost):>10}")
        verdict = "meets" if ratio <= TARGET_POOL_USE_VS_USE else "MISSES"
        print(
            f"target: pool.use(name) = {ratio:.2f}x mm.use() "
            f"(target <= {TARGET_POOL_USE_VS_USE}x): {verdict}"
        )

    print(f"\n{'members':>8} {'admission':>12} {'victim choice':>14}")
    results = {}
    for count, admit, pick in _admission(MEMBER_COUNTS, runs=50 if quick else 200):
        results[count] = admit, pick
        print(f"{count:>8,} {fmt_seconds(admit):>12} {fmt_seconds(pick):>14}")
    admit, pick = results[MEMBER_COUNTS[-1]]
    worst = max(admit, pick)
    verdict = "meets" if worst <= TARGET_ADMISSION_SECONDS else "MISSES"
    print(
        f"target: at {MEMBER_COUNTS[-1]:,} members, admission {fmt_seconds(admit)}, victim "
        f"choice {fmt_seconds(pick)} (target <= {fmt_seconds(TARGET_ADMISSION_SECONDS)}): {verdict}"
    )
    print(load_line())


def _admission(counts: tuple[int, ...], runs: int) -> list[tuple[int, float, float]]:
    """Median seconds of one admission (room found) and one victim choice at each member count.

    One pool grows through ``counts``. Times the pool's own decision
    (``_before_load`` / ``_after_load`` around no load at all, and ``_pick``),
    since a real load would swamp it. The pool is left open: closing it would
    unload and prove the death of every member, minutes at 1,000 members for
    what no figure here measures; the models die with the process.
    """
    import statistics
    import time

    import torch

    from vramkit import ModelPool

    pool = ModelPool("cpu", budget="1GiB", headroom=0, start_threads=False)
    newcomer = pool.register("newcomer", lambda: torch.nn.Linear(4, 4), size_hint=80)
    newcomer.load()
    newcomer.unload()  # its size is known now: admission reserves it
    found = []
    members = 0
    for count in counts:
        for i in range(members, count):
            # A size hint: an unknown size would make room by evicting everyone.
            pool.register(f"m{i}", lambda: torch.nn.Linear(4, 4), size_hint=80).load()
        members = count
        admit, pick = [], []
        for _ in range(runs):
            started = time.perf_counter()
            pool._before_load(newcomer)
            pool._after_load(newcomer, ok=False)
            admit.append(time.perf_counter() - started)
            started = time.perf_counter()
            pool._pick(1, exclude="newcomer")
            pick.append(time.perf_counter() - started)
        found.append((count, statistics.median(admit), statistics.median(pick)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--device", default=None)
    parser.add_argument("--micro", action="store_true", help="per-call costs only")
    parser.add_argument("--quick", action="store_true", help="--micro: fewer runs")
    args = parser.parse_args()
    if args.micro:
        micro(args.quick)
        return
    cache = Path(tempfile.mkdtemp(prefix="vramkit-bench-pool-"))
    # Build the models and import FunASR once before timing anything, so
    # neither run pays for that one-off setup.
    run_pipeline(device=args.device, items=1, cache_dir=cache, echo=False)

    tight = run_pipeline(device=args.device, items=args.items, cache_dir=cache, echo=False)
    roomy = run_pipeline(
        device=args.device,
        items=args.items,
        cache_dir=cache,
        echo=False,
        budget=4 * sum(tight.sizes.values()),
    )
    fetched = tight.loads + tight.wakes
    headroom = tight.headroom_bytes
    sequence = [stage for _ in range(args.items) for stage in STAGES]
    best = minimum_fetches(sequence, tight.sizes, tight.budget_bytes, headroom)
    largest = max(tight.sizes.values())

    print(f"pipeline asr -> llm -> tts, {args.items} items on {tight.device}")
    print("models: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in tight.sizes.items()))
    print(
        f"budget {format_bytes(tight.budget_bytes)} = "
        f"{tight.budget_bytes / largest:.2f}x the largest model, headroom {format_bytes(headroom)}"
    )
    print()
    print(f"{'':<34} {'budget 1.2x':>14} {'unlimited':>14}")
    print(f"{'loads':<34} {tight.loads:>14} {roomy.loads:>14}")
    print(f"{'wakes (from an offload tier)':<34} {tight.wakes:>14} {roomy.wakes:>14}")
    print(f"{'evictions':<34} {tight.evictions:>14} {roomy.evictions:>14}")
    print(
        f"{'peak charged to the pool':<34} {format_bytes(tight.peak_charged_bytes):>14} "
        f"{format_bytes(roomy.peak_charged_bytes):>14}"
    )
    for stage in STAGES:
        label = f"  {stage} stage (s)"
        print(
            f"{label:<34} {tight.stage_seconds[stage]:>14.2f} {roomy.stage_seconds[stage]:>14.2f}"
        )
    busy = sum(tight.stage_seconds.values()), sum(roomy.stage_seconds.values())
    print(f"{'  all stages (s)':<34} {busy[0]:>14.2f} {busy[1]:>14.2f}")
    print(f"{'wall time (s)':<34} {tight.seconds:>14.2f} {roomy.seconds:>14.2f}")
    print()
    print(
        f"loads+wakes {fetched} vs minimum possible {best} for this sequence and budget "
        f"({fetched / best:.2f}x)"
    )
    print(
        f"peak {format_bytes(tight.peak_charged_bytes)} vs budget "
        f"{format_bytes(tight.budget_bytes)} "
        f"({tight.peak_charged_bytes / tight.budget_bytes:.0%}; "
        f"{'never exceeded' if tight.peak_charged_bytes <= tight.budget_bytes else 'EXCEEDED'})"
    )
    print(
        f"wall time {tight.seconds:.2f} s vs {roomy.seconds:.2f} s with unlimited memory "
        f"({tight.seconds / roomy.seconds:.2f}x)"
    )


if __name__ == "__main__":
    main()
