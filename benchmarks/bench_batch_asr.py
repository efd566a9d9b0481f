"""The motivating workload: a FunASR transcription service working through a batch of files.

A VAD + ASR + punctuation pipeline (the tiny offline models of
``vramkit.testing.models``) transcribes ``--files`` synthetic recordings of
varied lengths (0.8 to 4.8 s) in batches of ``--batch``, three ways in one run:

- **no cleanup**: ``am.generate(input=batch)`` and nothing else;
- **empty_cache per batch**: the same, then ``gc.collect()`` and
  ``torch.cuda.empty_cache()`` after every batch (the advice Fun-ASR WebUI
  gives its users);
- **vramkit**: the call wrapped in ``vramkit.managed(device)``, whose default
  cleanup policy cleans after every call (one call being one batch).

Each way transcribes every file, in ``--blocks`` blocks of consecutive batches
(6 by default); the ways take turns block by block, each block in another of
the six orders of the three ways, so a machine that speeds up or slows down
during the run (other work starting or stopping) weighs on all three alike.
Printed per way: files per second and the ratio to the other two, and the
growth of the process's resident set (on CUDA also of torch's reserved bytes)
over its files. The throughput targets are judged on the median over batches
of each batch's ratio (the same files, timed within the same block), which a
change of the machine's load between blocks moves less than the ratio of the
totals, printed beside it.

Then a **planted results cache**: a module-level dict keeping each file's
waveform as a tensor on the device beside its text (the "global cache" pattern
that pins memory in long-running ASR services). The vramkit way runs again with
a leak check per batch (``gpu_session(leak_check="warn", tolerance="1MiB")``)
and the script prints the batch at which the warning names the cache.

On CUDA the card is capped with ``torch.cuda.set_per_process_memory_fraction``
to ``--budget`` (8 GiB by default), and each way reports the file at which it
ran out of memory, if it did (Fun-ASR WebUI reports, on a T4: at most 18 tasks
without cleanup, more than 50 with per-batch cleanup).

Run: ``python benchmarks/bench_batch_asr.py [--files 200] [--batch 8] [--device cuda]
[--json figures.json]``; ``--quick`` runs 24 files (a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch
from _common import versions

import vramkit
from vramkit.testing.models import build_funasr_pipeline, synthetic_audio

MIB = 1 << 20
TARGET_VS_NAIVE = 0.97  # vramkit's throughput against no cleanup at all
TARGET_VS_EMPTY_CACHE = 1.0  # ... and against cleaning after every batch
TARGET_RSS_GROWTH = 8 * MIB  # over the vramkit way's files
TARGET_NAMED_BY = 2  # the planted cache named within this many batches
LEAK_TOLERANCE = "1MiB"

# The planted cache: what a service keeps "for later" and forgets about.
RESULTS_CACHE: dict[str, dict[str, Any]] = {}

Batch = list[Any]
Transcribe = Callable[[Batch], list[dict[str, Any]]]


@dataclass
class WayResult:
    """What one way of running the workload did, summed over its blocks."""

    name: str
    files: int = 0
    seconds: float = 0.0
    rss_growth_bytes: int = 0
    reserved_growth_bytes: int | None = None
    oom_at_file: int | None = None
    texts: list[str] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)  # in the order of the batches

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=200, help="files per way (default 200)")
    parser.add_argument("--batch", type=int, default=8, help="files per batch (default 8)")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda[:N] (default: cuda when available)"
    )
    parser.add_argument(
        "--budget", default="8GiB", help="CUDA only: the memory cap of the card (default 8GiB)"
    )
    parser.add_argument(
        "--blocks", type=int, default=6, help="blocks the ways take turns on (default 6)"
    )
    parser.add_argument("--quick", action="store_true", help="24 files: a smoke run")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.files = min(args.files, 24)
    if args.files < 2 * args.batch or args.batch < 1:
        parser.error("--files must be at least two batches and --batch at least 1")
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    return args


def quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with FunASR's prints and progress noise out of the way."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()


def load_pipeline(workdir: str, device: str) -> Any:
    import funasr

    logging.disable(logging.INFO)
    dirs = build_funasr_pipeline(workdir)
    return funasr.AutoModel(
        **dirs.automodel_kwargs(),
        device=device,
        disable_update=True,
        disable_pbar=True,
        ncpu=1,
    )


def make_files(count: int) -> list[Any]:
    """``count`` recordings of 0.8 to 4.8 s, in a scattered order of lengths."""
    return [synthetic_audio(0.8 + (i * 37 % 17) / 4, seed=i) for i in range(count)]


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def reserved(device: str) -> int | None:
    return int(torch.cuda.memory_reserved(device)) if device.startswith("cuda") else None


def cap_device(device: str, budget: int) -> str:
    """Cap the card at ``budget`` bytes for this process; returns a line saying so."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return (
        f"capped at {vramkit.format_bytes(budget)} of {vramkit.format_bytes(total)} "
        f"(set_per_process_memory_fraction({fraction:.3f}))"
    )


def make_ways(am: Any, device: str) -> dict[str, Transcribe]:
    def naive(batch: Batch) -> list[dict[str, Any]]:
        return am.generate(input=batch)  # type: ignore[no-any-return]

    def empty_cache_per_batch(batch: Batch) -> list[dict[str, Any]]:
        results = am.generate(input=batch)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return results  # type: ignore[no-any-return]

    @vramkit.managed(device)
    def with_vramkit(batch: Batch) -> list[dict[str, Any]]:
        return am.generate(input=batch)  # type: ignore[no-any-return]

    return {
        "no cleanup": naive,
        "empty_cache per batch": empty_cache_per_batch,
        "vramkit managed()": with_vramkit,
    }


def run_block(
    result: WayResult, transcribe: Transcribe, batches: Sequence[Batch], device: str
) -> None:
    """Transcribe ``batches`` one way, adding its time and memory growth to ``result``."""
    if result.oom_at_file is not None:
        return  # this way already ran out of memory: the rest would only repeat it
    rss_before, reserved_before = rss(), reserved(device)
    started = time.perf_counter()
    for batch in batches:
        batch_started = time.perf_counter()
        try:
            results = quietly(lambda b=batch: transcribe(b))
        except Exception as exc:
            if not vramkit.is_oom_error(exc):
                raise
            result.oom_at_file = result.files + len(batch)
            break
        result.batch_seconds.append(time.perf_counter() - batch_started)
        result.texts.extend(str(r["text"]) for r in results)
        result.files += len(batch)
    result.seconds += time.perf_counter() - started
    result.rss_growth_bytes += rss() - rss_before
    reserved_after = reserved(device)
    if reserved_before is not None and reserved_after is not None:
        result.reserved_growth_bytes = (result.reserved_growth_bytes or 0) + (
            reserved_after - reserved_before
        )


def planted_cache(am: Any, batches: Sequence[Batch], device: str) -> tuple[int | None, str]:
    """The batch (1-based) at which vramkit's leak check names the planted cache."""
    session = vramkit.gpu_session(
        device, leak_check="warn", tolerance=LEAK_TOLERANCE, cleanup=False
    )

    @vramkit.managed(device, session=session)
    def transcribe_and_cache(batch: Batch) -> list[dict[str, Any]]:
        results = am.generate(input=batch)
        for audio, item in zip(batch, results, strict=True):
            # FunASR gives every input of one call the same random key: number them.
            RESULTS_CACHE[f"file{len(RESULTS_CACHE):04d}"] = {
                "text": item["text"],
                # A copy, as `.to(device)` makes: a tensor sharing the caller's
                # array would share its storage with tensors FunASR made from it.
                "audio": torch.tensor(audio, device=device),
            }
        return results  # type: ignore[no-any-return]

    try:
        for number, batch in enumerate(batches, 1):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", vramkit.VramLeakWarning)
                quietly(lambda b=batch: transcribe_and_cache(b))
            for warning in caught:
                text = str(warning.message)
                if "RESULTS_CACHE" in text:
                    return number, text
        return None, ""
    finally:
        RESULTS_CACHE.clear()


def paired_ratio(ours: WayResult, other: WayResult) -> float:
    """Our throughput over ``other``'s: the median of each batch's ratio (same files, same block).

    Falls back to the ratio of the totals when a way stopped early (out of memory).
    """
    if len(ours.batch_seconds) != len(other.batch_seconds) or not ours.batch_seconds:
        return ours.files_per_second / other.files_per_second if other.files_per_second else 0.0
    return statistics.median(
        theirs / mine for mine, theirs in zip(ours.batch_seconds, other.batch_seconds, strict=True)
    )


def ratio_line(what: str, value: float, target: float, *, at_least: bool = True) -> str:
    ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    return f"{what}: {value:.3f} (target {sign} {target}) {'meets' if ok else 'MISSES'}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = str(vramkit.resolve_device(device))
    started_at = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        am = quietly(lambda: load_pipeline(workdir, device))
        print(versions(threads=True))
        cap = ""
        if device.startswith("cuda"):
            cap = cap_device(device, vramkit.parse_bytes(args.budget))
        files = make_files(args.files)
        batches = [files[i : i + args.batch] for i in range(0, len(files), args.batch)]
        seconds_of_audio = sum(len(f) for f in files) / 16000
        print(
            f"device: {device}{' · ' + cap if cap else ''} · {len(files)} files "
            f"({seconds_of_audio:.0f} s of audio, 0.8-4.8 s each) in batches of {args.batch}"
        )
        print(f"heap: {len(gc.get_objects()):,} gc-tracked objects after loading the pipeline")
        ways = make_ways(am, device)
        for transcribe in ways.values():  # warm-up: first calls build caches and kernels
            quietly(lambda t=transcribe: t(batches[0]))
        results = {name: WayResult(name) for name in ways}
        orders = list(itertools.permutations(ways))
        count = min(args.blocks, len(batches))
        bounds = [len(batches) * i // count for i in range(count + 1)]
        load_before = os.getloadavg()
        for number in range(count):
            block = batches[bounds[number] : bounds[number + 1]]
            for name in orders[number % len(orders)]:
                run_block(results[name], ways[name], block, device)
        load_after = os.getloadavg()

        named_at, named_text = planted_cache(am, batches[: TARGET_NAMED_BY + 2], device)
        del am
    print_results(results, device, named_at, named_text, load_before, load_after)
    naive, cleaned, ours = results.values()
    figures = {
        "device": device,
        "files": len(files),
        "batch": args.batch,
        "budget_bytes": vramkit.parse_bytes(args.budget) if device.startswith("cuda") else None,
        "ways": {
            name: {**asdict(r), "texts": None, "files_per_second": r.files_per_second}
            for name, r in results.items()
        },
        "vs_no_cleanup": paired_ratio(ours, naive),
        "vs_empty_cache": paired_ratio(ours, cleaned),
        "vs_no_cleanup_totals": ours.files_per_second / naive.files_per_second,
        "vs_empty_cache_totals": ours.files_per_second / cleaned.files_per_second,
        "planted_cache_named_at_batch": named_at,
        "loadavg": [load_before[0], load_after[0]],
        "seconds": time.perf_counter() - started_at,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)
    # The three ways must agree on every text: a faster way that transcribes
    # differently would be no faster way at all.
    if not all(r.oom_at_file is None for r in results.values()):
        return 0
    if not naive.texts == cleaned.texts == ours.texts:
        print("the three ways transcribed differently", file=sys.stderr)
        return 1
    return 0


def print_results(
    results: dict[str, WayResult],
    device: str,
    named_at: int | None,
    named_text: str,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    naive, cleaned, ours = results.values()
    on_cuda = device.startswith("cuda")
    print(
        f"\nload average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"the timed part, on {os.cpu_count()} cpus"
    )
    header = f"{'way':<24} {'files/s':>8} {'vs none':>8} {'vs e_c':>8} {'RSS growth':>11}"
    header += f" {'per file':>9}" + (f" {'reserved':>10} {'OOM at':>7}" if on_cuda else "")
    print(header)
    for r in results.values():
        line = (
            f"{r.name:<24} {r.files_per_second:>8.2f} "
            f"{r.files_per_second / naive.files_per_second:>7.3f}x "
            f"{r.files_per_second / cleaned.files_per_second:>7.3f}x "
            f"{vramkit.format_bytes(r.rss_growth_bytes, signed=True):>11} "
            f"{vramkit.format_bytes(r.rss_growth_bytes // max(r.files, 1), signed=True):>9}"
        )
        if on_cuda:
            line += (
                f" {vramkit.format_bytes(r.reserved_growth_bytes, signed=True):>10}"
                f" {r.oom_at_file if r.oom_at_file is not None else 'none':>7}"
            )
        print(line)
    print()
    for other, target in ((naive, TARGET_VS_NAIVE), (cleaned, TARGET_VS_EMPTY_CACHE)):
        paired = paired_ratio(ours, other)
        totals = ours.files_per_second / other.files_per_second
        print(
            ratio_line(f"vramkit vs {other.name}", paired, target)
            + f" (median of {len(ours.batch_seconds)} batches' ratios; of totals {totals:.3f})"
        )
    growth_ok = ours.rss_growth_bytes <= TARGET_RSS_GROWTH
    print(
        f"vramkit RSS growth over {ours.files} files: "
        f"{vramkit.format_bytes(ours.rss_growth_bytes, signed=True)} "
        f"(target <= {vramkit.format_bytes(TARGET_RSS_GROWTH)}) "
        + ("meets" if growth_ok else "MISSES")
    )
    if named_at is None:
        print(f"planted results cache: NOT named within {TARGET_NAMED_BY + 2} batches: MISSES")
    else:
        verdict = "meets" if named_at <= TARGET_NAMED_BY else "MISSES"
        holder = next((ln.strip() for ln in named_text.splitlines() if "RESULTS_CACHE" in ln), "")
        print(
            f"planted results cache named at batch {named_at} "
            f"(target <= {TARGET_NAMED_BY}) {verdict}: {holder}"
        )
    if on_cuda:
        for r in results.values():
            oom = f"out of memory at file {r.oom_at_file}" if r.oom_at_file else "no OOM"
            print(f"under the cap, {r.name}: {oom} in {r.files} files")


if __name__ == "__main__":
    sys.exit(main())
