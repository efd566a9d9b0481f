"""What a proven unload costs, against the naive unload, on a heap people actually have.

The heap has transformers and funasr imported (about half a million objects,
where one full ``gc.collect()`` costs hundreds of milliseconds) and holds the
tiny FunASR VAD + ASR + punctuation pipeline and a tiny GPT-2. Each round
loads the pipeline and unloads it four ways, interleaved so a slow spell of
the machine lands on all of them:

- naive: ``del model; gc.collect()`` and ``malloc_trim(0)``, which proves nothing;
- ``mm.unload()`` of a clean model: weak references to every storage show it
  died by reference count, so no collection runs;
- naive with a holder (``KEPT.append(model.vad_model)``): the same steps, the
  memory stays, nobody says why;
- ``mm.unload()`` with the same holder: a collection, the holder search
  (named root to leaf), the storages freed anyway and tombstones.

Targets (issue 12): clean unload <= 0.5x naive, with a holder <= 3x naive.

Run: ``python benchmarks/bench_unload.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import fmt_seconds, load_heap, versions

import vramkit
from vramkit import ManagedModel

CLEAN_TARGET = 0.5
HOLDER_TARGET = 3.0
KEPT: list[Any] = []


def _quiet(fn: Callable[[], Any]) -> Any:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


def _gpt2() -> Any:
    """A tiny GPT-2 (tied embeddings), so transformers' classes are on the heap too."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256)
    return transformers.GPT2LMHeadModel(config).eval()


def naive(load: Callable[[], Any], holder: bool) -> float:
    model = _quiet(load)
    if holder:
        KEPT.append(model.vad_model)
    started = time.perf_counter()
    del model
    gc.collect()
    vramkit.cleanup("cpu", gc_collect=False)  # malloc_trim(0) on glibc
    seconds = time.perf_counter() - started
    KEPT.clear()
    gc.collect()
    return seconds


def managed(mm: ManagedModel[Any], holder: bool) -> tuple[float, str]:
    _quiet(mm.load)
    if holder:
        with mm.use() as model:
            KEPT.append(model.vad_model)
        del model
    started = time.perf_counter()
    report = mm.unload()
    seconds = time.perf_counter() - started
    text = str(report.holders[0]) if report.holders else ("ok" if report.ok else str(report))
    KEPT.clear()
    gc.collect()
    return seconds, text


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 3 if quick else 9
    print(versions())
    with tempfile.TemporaryDirectory() as workdir:
        heap, resident = load_heap(workdir)
        if resident is None:
            print(heap + ": this benchmark needs funasr")
            return
        transformers_model = _gpt2()
        from vramkit.testing.models import build_funasr_pipeline

        dirs = build_funasr_pipeline(workdir)
        kwargs = {**dirs.automodel_kwargs(), "device": "cpu", "disable_pbar": True, "ncpu": 1}

        def load() -> Any:
            import funasr

            return funasr.AutoModel(**kwargs, disable_update=True)

        mm = ManagedModel.from_funasr(**kwargs, name="pipeline")
        gc.collect()
        print(f"heap: {heap}; transformers imported, tiny GPT-2 resident")
        print(f"      {len(gc.get_objects()):,} objects tracked by the collector")

        samples: dict[str, list[float]] = {k: [] for k in ("naive", "clean", "naive+h", "held")}
        chain = ""
        for _ in range(rounds):
            samples["naive"].append(naive(load, holder=False))
            samples["clean"].append(managed(mm, holder=False)[0])
            samples["naive+h"].append(naive(load, holder=True))
            seconds, chain = managed(mm, holder=True)
            samples["held"].append(seconds)
        median = {k: statistics.median(v) for k, v in samples.items()}

    print(f"\nmedian of {rounds} interleaved rounds, tiny FunASR pipeline on cpu")
    rows = [
        ("naive: del + gc.collect() + malloc_trim", "naive"),
        ("vramkit unload(), clean", "clean"),
        ("naive with a holder (memory stays)", "naive+h"),
        ("vramkit unload() with a holder", "held"),
    ]
    for label, key in rows:
        ratio = median[key] / median["naive"]
        print(f"  {label:<44} {fmt_seconds(median[key]):>9}  {ratio:5.2f}x naive")
    print(f"  holder named: {chain}")
    clean = median["clean"] / median["naive"]
    held = median["held"] / median["naive"]
    for what, ratio, target in (
        ("clean unload", clean, CLEAN_TARGET),
        ("unload with a holder", held, HOLDER_TARGET),
    ):
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"target: {what} <= {target}x naive: {ratio:.2f}x, {verdict} the target")
    del transformers_model


if __name__ == "__main__":
    main()
