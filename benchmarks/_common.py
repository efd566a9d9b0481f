"""Small timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any


def versions(*, threads: bool = False, with_pytest: bool = False) -> str:
    """The line each benchmark starts with: what its figures were measured on."""
    import os
    import platform

    import torch

    import vramkit

    parts = [f"vramkit {vramkit.__version__}"]
    if with_pytest:
        import pytest

        parts.append(f"pytest {pytest.__version__}")
    parts += [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    parts.append(platform.machine())
    if threads:
        parts.append(f"{os.cpu_count()} cpus, {torch.get_num_threads()} torch threads")
    return " · ".join(parts)


def load_line() -> str:
    """The machine's load, printed beside figures that a busy machine would change."""
    import os

    one, five, fifteen = os.getloadavg()
    return (
        f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cpus"
    )


def median_seconds(fn: Callable[[], object], *, runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def median_per_call(fn: Callable[[], object], *, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time per call of ``calls`` back-to-back calls."""
    fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one batch would skew that batch only
    try:
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - started) / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(samples)


def fmt_seconds(seconds: float) -> str:
    """Seconds in the unit that reads best: ns, µs, ms or s."""
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


QUANTILES: tuple[float, ...] = (0.10, 0.50, 0.90, 0.99)
"""What :func:`interleaved_percentiles` reports by default: the typical call and the tail."""


def interleaved_per_call(
    fns: dict[str, Callable[[], object]], *, calls: int, rounds: int = 15
) -> dict[str, float]:
    """Median time per call of each of ``fns``, measured in alternating batches.

    Each round times ``calls`` back-to-back calls of every function in turn, so
    that a slow spell of the machine (another process, a frequency change)
    lands on all of them rather than on whichever ran during it.
    """
    samples = _interleaved(fns, calls=calls, rounds=rounds, each=False)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_percentiles(
    fns: dict[str, Callable[[], object]],
    *,
    calls: int,
    rounds: int,
    quantiles: tuple[float, ...] = QUANTILES,
) -> dict[str, tuple[float, ...]]:
    """Each call timed on its own, in the batches of :func:`interleaved_per_call`: its quantiles.

    A batch's mean carries the machine's rare long stalls; the quantiles of
    single calls show the typical call and the tail apart.
    """
    samples = _interleaved(fns, calls=calls, rounds=rounds, each=True)
    result = {}
    for name, values in samples.items():
        values.sort()
        last = len(values) - 1
        result[name] = tuple(values[min(int(q * len(values)), last)] for q in quantiles)
    return result


def _interleaved(
    fns: dict[str, Callable[[], object]], *, calls: int, rounds: int, each: bool
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``: per batch (its mean), or per call if ``each``.

    The collector is off while it times, so a collection does not land on
    whichever function happened to run then.
    """
    for fn in fns.values():
        for _ in range(min(calls, 100)):
            fn()
    clock = time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                times = samples[name]
                if each:
                    for _ in range(calls):
                        started = clock()
                        fn()
                        times.append(clock() - started)
                else:
                    started = clock()
                    for _ in range(calls):
                        fn()
                    times.append((clock() - started) / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def load_heap(workdir: str) -> tuple[str, Any]:
    """Import funasr and load the tiny pipeline, if funasr is installed."""
    if importlib.util.find_spec("funasr") is None:
        return "funasr not installed: torch and vramkit only", None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import funasr

        from vramkit.testing.models import build_funasr_pipeline

        logging.disable(logging.INFO)
        dirs = build_funasr_pipeline(workdir)
        model = funasr.AutoModel(
            **dirs.automodel_kwargs(),
            device="cpu",
            disable_update=True,
            disable_pbar=True,
            ncpu=1,
        )
    return "funasr imported, tiny VAD + ASR + punctuation pipeline loaded", model
