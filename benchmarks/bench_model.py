"""What ManagedModel costs per call, and what it gets back that a naive unload does not.

1. Per-call overhead of a lease on a loaded tiny model (``nn.Linear(8, 8)``,
   a 1x8 input, so the model's own time is small and the overhead shows):
   ``with mm.use() as m: m(x)``, an ``@mm.inference`` function and ``mm(x)``
   against a raw ``model(x)``, and against ``model(x)`` under
   ``torch.inference_mode()`` (leases enter inference mode by default). A model
   made with ``inference_mode=False`` shows the cost of the lease alone.
1b. The lease alone, on a model whose call returns its input: ``use()``,
   ``mm(x)`` and ``@mm.inference`` against the same run's raw call, an empty
   ``with`` and the inference-mode guard, with the targets (added cost
   <= 1 us, plus the guard's own cost where the lease enters it), and what
   the guard costs inside a lease's block rather than alone (not a target).
2. Memory kept after "unloading" a 512 MiB model while a closure stored in a
   module-level dict (a user's cache) still references it: ``mm.unload()``
   against the naive ``del model; gc.collect(); torch.cuda.empty_cache()``
   (plus ``malloc_trim`` through ``vramkit.cleanup("cpu")``). Each variant runs
   in a fresh subprocess so that RSS is not blurred by this process's heap.

Run: ``python benchmarks/bench_model.py [--quick] [--overhead-only]``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from _common import fmt_seconds, interleaved_per_call, load_line, versions

import vramkit
from vramkit import ManagedModel

TARGET_LEASE_SECONDS = 1e-6  # a lease added to a raw call (mm(x): plus the guard's own cost)
MODEL_MIB = 512
VARIANTS = ("naive-clean", "vramkit-clean", "naive-leaky", "vramkit-leaky")
LABELS = {
    "naive-clean": "naive del+gc+trim, no holder",
    "vramkit-clean": "vramkit unload(), no holder",
    "naive-leaky": "naive del+gc+trim, closure holder",
    "vramkit-leaky": "vramkit unload(), closure holder",
}
MIB = 1 << 20

# ---------------------------------------------------------------------- part 1: overhead


def overhead(quick: bool) -> None:
    x = torch.ones(1, 8)
    model = torch.nn.Linear(8, 8).eval()
    # Both lend the one module the raw calls use: it stays the benchmark's (owns=False).
    mm = ManagedModel(lambda: model, name="linear", device="cpu", owns=False)
    mm_plain = ManagedModel(
        lambda: model, name="linear-grad", device="cpu", inference_mode=False, owns=False
    )
    mm.load()
    mm_plain.load()

    @mm.inference
    def predict(m: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return m(inputs)

    @mm_plain.inference
    def predict_plain(m: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return m(inputs)

    def raw() -> object:
        return model(x)

    def raw_inference() -> object:
        with torch.inference_mode():
            return model(x)

    def lease() -> object:
        with mm.use() as m:
            return m(x)

    def lease_plain() -> object:
        with mm_plain.use() as m:
            return m(x)

    def lease_empty() -> None:
        with mm_plain.use():
            pass

    def inference_mode_empty() -> None:
        with torch.inference_mode():
            pass

    def noop() -> None:
        pass

    nothing = contextlib.nullcontext()

    def empty_with() -> None:
        with nothing:
            pass

    cases: dict[str, Callable[[], object]] = {
        "model(x)  (raw call, baseline)": raw,
        "with torch.inference_mode(): model(x)": raw_inference,
        "with mm.use() as m: m(x)": lease,
        "@mm.inference function(x)": lambda: predict(x),
        "mm(x)": lambda: mm(x),
        "inference_mode=False: with mm.use(): m(x)": lease_plain,
        "inference_mode=False: @mm.inference": lambda: predict_plain(x),
        "inference_mode=False: mm(x)": lambda: mm_plain(x),
        "  parts: an empty lease (inference_mode=False)": lease_empty,
        "  parts: torch.inference_mode() enter + exit": inference_mode_empty,
        "  machine speed: a Python no-op function call": noop,
        "  machine speed: an empty Python with": empty_with,
    }
    calls, rounds = (500, 5) if quick else (2000, 15)
    medians = interleaved_per_call(cases, calls=calls, rounds=rounds)
    base = medians["model(x)  (raw call, baseline)"]
    base_im = medians["with torch.inference_mode(): model(x)"]

    print(
        f"\n1. Per-call cost on a loaded nn.Linear(8, 8), 1x8 input on cpu "
        f"(median of {rounds} interleaved batches of {calls} calls)"
    )
    print(
        f"{'call':<48} {'median':>9} {'vs raw':>8} {'added vs raw':>13} "
        f"{'added vs same-mode raw':>23}"
    )
    for name, cost in medians.items():
        if name.startswith("  "):
            continue
        same_mode = base if "inference_mode=False" in name or name.startswith("model") else base_im
        print(
            f"{name:<48} {cost * 1e9:>6.0f} ns {cost / base:>7.2f}x "
            f"{fmt_seconds(cost - base):>13} {fmt_seconds(cost - same_mode):>23}"
        )
    for name, cost in medians.items():
        if name.startswith("  "):
            print(f"{name:<48} {cost * 1e9:>6.0f} ns")

    print(load_line())


def lease_cost(quick: bool) -> None:
    """The lease alone: a model whose call returns its input, so nothing else shows.

    Each figure is set against the same run's raw call of the same function,
    an empty ``with`` around it, and the inference-mode guard around it (the
    C++ guard a lease enters, not the slower context manager).
    """

    def echo(value: object) -> object:
        return value

    def managed(mode: bool) -> ManagedModel[Any]:
        model = ManagedModel(
            lambda: echo,
            name=f"echo-{mode}",
            device="cpu",
            inference_mode=mode,
            owns=False,  # the function stays the benchmark's
            release=lambda obj: None,
            size=lambda obj: 0,
        )
        model.load()
        return model

    plain, guarded = managed(False), managed(True)
    decorated = {m: m.inference(lambda fn, value: fn(value)) for m in (plain, guarded)}
    guard = torch._C._InferenceMode
    nothing = contextlib.nullcontext()

    def raw() -> object:
        return echo(1)

    def empty_with() -> object:
        with nothing:
            return echo(1)

    def guard_alone() -> object:
        entered = guard(True)
        out = echo(1)
        del entered
        return out

    def guard_in_plain_lease() -> object:
        with plain.use() as fn:
            entered = guard(True)
            out = fn(1)
            del entered
            return out

    def use(model: ManagedModel[Any]) -> Callable[[], object]:
        def lease() -> object:
            with model.use() as fn:
                return fn(1)

        return lease

    cases: dict[str, Callable[[], object]] = {
        "echo(x)  (raw call)": raw,
        "with nullcontext(): echo(x)": empty_with,
        "inference-mode guard around echo(x)": guard_alone,
        "with mm.use() as m: m(x)": use(guarded),
        "mm(x)": lambda: guarded(1),
        "@mm.inference f(x)": lambda: decorated[guarded](1),
        "inference_mode=False: with mm.use()": use(plain),
        "inference_mode=False: mm(x)": lambda: plain(1),
        "inference_mode=False: @mm.inference": lambda: decorated[plain](1),
        "guard in an inference_mode=False lease": guard_in_plain_lease,
    }
    calls, rounds = (5000, 5) if quick else (20000, 15)
    medians = interleaved_per_call(cases, calls=calls, rounds=rounds)
    base = medians["echo(x)  (raw call)"]
    guard_cost = medians["inference-mode guard around echo(x)"] - base
    print(
        f"\n1b. The lease alone, on a model whose call returns its input "
        f"(median of {rounds} interleaved batches of {calls} calls)"
    )
    print(f"{'call':<42} {'median':>9} {'added to the raw call':>22}")
    for name, cost in medians.items():
        print(f"{name:<42} {cost * 1e9:>6.0f} ns {fmt_seconds(cost - base):>22}")
    print(
        f"\ntargets (same-run references: the raw call {fmt_seconds(base)}, an empty with "
        f"+{fmt_seconds(medians['with nullcontext(): echo(x)'] - base)}, the guard "
        f"+{fmt_seconds(guard_cost)}):"
    )
    targets = (
        ("with mm.use() as m: m(x)", TARGET_LEASE_SECONDS + guard_cost, "1 us + the guard"),
        ("mm(x)", TARGET_LEASE_SECONDS + guard_cost, "1 us + the guard"),
        ("inference_mode=False: with mm.use()", TARGET_LEASE_SECONDS, "1 us"),
        ("inference_mode=False: mm(x)", TARGET_LEASE_SECONDS, "1 us"),
    )
    for name, limit, says in targets:
        added = medians[name] - base
        verdict = "meets" if added <= limit else "MISSES"
        print(f"  {name:<38} +{fmt_seconds(added):>9} (target <= {says}): {verdict}")
    # Not a target: what the guard costs inside a lease rather than alone, by
    # the difference of two leases that differ by the guard alone.
    in_lease = (
        medians["guard in an inference_mode=False lease"]
        - medians["inference_mode=False: with mm.use()"]
    )
    print(
        f"  (the guard inside a lease's block costs +{fmt_seconds(in_lease)} "
        f"against +{fmt_seconds(guard_cost)} alone)"
    )
    print(load_line())


# ---------------------------------------------------------------------- part 2: unload


CACHE: dict[str, Any] = {}  # a user's module-level cache


def make_predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A closure over the model, as a user's cache would keep one."""

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    return predict


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _load_naive(leaky: bool) -> torch.nn.Module:
    from vramkit.testing.models import tiny_mlp

    model = tiny_mlp(MODEL_MIB)
    if leaky:
        CACHE["predict"] = make_predictor(model)
    with torch.inference_mode():
        model(torch.ones(1, model.dim))
    return model


def _plant(mm: ManagedModel[Any], leaky: bool) -> int:
    with mm.use() as model:
        if leaky:
            CACHE["predict"] = make_predictor(model)
        model(torch.ones(1, model.dim))
        return int(model.dim)


def child(variant: str) -> dict[str, Any]:
    """One variant in a fresh process: RSS at baseline, loaded, after the unload."""
    from vramkit.testing.models import tiny_mlp

    kind, _, holder = variant.partition("-")
    leaky = holder == "leaky"
    probe = tiny_mlp(1)
    probe(torch.ones(1, probe.dim))  # torch's lazy start-up is not the model's
    del probe
    gc.collect()
    vramkit.cleanup("cpu")
    result: dict[str, Any] = {"variant": variant, "baseline": rss()}
    if kind == "naive":
        model = _load_naive(leaky)
        result["loaded"] = rss()
        started = time.perf_counter()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        vramkit.cleanup("cpu", gc_collect=False)  # malloc_trim(0) on glibc
        result["unload_seconds"] = time.perf_counter() - started
        result["after"] = rss()
    else:
        mm = ManagedModel.from_torch(lambda: tiny_mlp(MODEL_MIB), device="cpu", name="mlp512")
        mm.load()
        dim = _plant(mm, leaky)
        result["loaded"] = rss()
        started = time.perf_counter()
        report = mm.unload()
        result["unload_seconds"] = time.perf_counter() - started
        result["after"] = rss()
        result["report"] = str(report)
        result["holders"] = [str(chain) for chain in report.holders]
        result["died"] = report.died
        if leaky:
            try:
                CACHE["predict"](torch.ones(1, dim))
                result["stale_call"] = "ran (no error)"
            except Exception as exc:
                result["stale_call"] = f"{type(exc).__name__}: {exc}"
    return result


def unload_memory(quick: bool) -> None:
    repeats = 1 if quick else 3
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", variant],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"child {variant} failed:\n{out.stderr}")
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
            runs[variant].append(json.loads(line))

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    def kept(variant: str) -> float:
        return statistics.median(r["after"] - r["baseline"] for r in runs[variant])

    print(
        f"\n2. Unloading a {MODEL_MIB} MiB tiny_mlp on cpu, each variant in a fresh process "
        f"(RSS in MiB, median of {repeats} process{'es' if repeats > 1 else ''})"
    )
    print(
        f"{'variant':<36} {'baseline':>9} {'loaded':>8} {'after':>8} "
        f"{'kept':>8} {'unload time':>12}"
    )
    for variant in VARIANTS:
        print(
            f"{LABELS[variant]:<36} {med(variant, 'baseline') / MIB:>9.1f} "
            f"{med(variant, 'loaded') / MIB:>8.1f} {med(variant, 'after') / MIB:>8.1f} "
            f"{kept(variant) / MIB:>+8.1f} {fmt_seconds(med(variant, 'unload_seconds')):>12}"
        )
    naive, managed = kept("naive-leaky"), kept("vramkit-leaky")
    if managed > MIB:
        ratio = f"{naive / managed:.0f}x"
    else:
        ratio = f"> {naive / MIB:.0f}x (vramkit kept under 1 MiB)"
    print(
        f"\nwith a closure holder: naive kept {naive / MIB:.1f} MiB, vramkit kept "
        f"{managed / MIB:.1f} MiB: naive kept / vramkit kept = {ratio}"
    )
    leaky = runs["vramkit-leaky"][0]
    print("\nUnloadReport, closure holder:")
    print("\n".join("  " + line for line in leaky["report"].splitlines()))
    print("holder chains: " + (" | ".join(leaky["holders"]) or "none"))
    print(f"calling the stale closure afterwards: {leaky['stale_call']}")
    clean_died = all(r["died"] for r in runs["vramkit-clean"])
    print(f"without a holder: the report says died={clean_died}")


def main() -> None:
    if "--child" in sys.argv:
        variant = sys.argv[sys.argv.index("--child") + 1]
        print(json.dumps(child(variant)))
        return
    quick = "--quick" in sys.argv
    print(versions(threads=True))
    overhead(quick)
    lease_cost(quick)
    if "--overhead-only" not in sys.argv:
        unload_memory(quick)


if __name__ == "__main__":
    main()
