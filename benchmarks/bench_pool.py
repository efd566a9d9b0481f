"""The demo pipeline (ASR -> LLM -> TTS) through a ModelPool, against the best possible.

Runs the pipeline over N items (default 30) with the budget at 1.2x the largest
model, then again with memory to spare, and prints:

- loads + wakes the pool performed vs the minimum any policy could achieve for
  that sequence and budget (exact, by dynamic programming over which models are
  resident),
- peak bytes charged to the pool vs the budget,
- wall time vs the unlimited-memory run (the price of fitting in the budget).

Run: ``python benchmarks/bench_pool.py [--items 30] [--device cuda]``.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
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
