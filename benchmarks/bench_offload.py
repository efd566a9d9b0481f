"""Time back to work from each way of freeing a 512 MiB model, and the host memory each keeps.

A ``ManagedModel`` of a 512 MiB ``TinyMLP`` on cpu whose loader does what a
real reload does: build the module, then ``load_state_dict(torch.load(...))``
from a checkpoint in a temporary directory. Timed, as medians in one run:

- (a) the loader: ``unload()``, then ``mm(x)`` (load + first forward);
- (b) the disk tier: ``offload("disk")``, then ``mm(x)`` (wake + first forward);
- (c) the cpu tier: ``offload("cpu")``, then ``mm(x)``;
- the same bytes read from the page cache (``readinto`` a preallocated buffer,
  and ``mmap`` with every page touched): the bandwidth limit of a disk wake;
- what the disk tier's checks cost: a re-offload of an unchanged model
  (stamps, file identity, and a SHA-256 of every weight, which proves the
  file can be kept) against rewriting the file; the trust check a wake runs
  (the file's identity and layout) against what verifying a content hash at
  every wake would add.

The first forward of an MLP reads every weight, so "wake + first forward"
counts the pages that the disk tier's lazy mmap reads at first touch. With CUDA,
the cpu tier's wake is also compared with a plain pinned host-to-device copy.

Run: ``python benchmarks/bench_offload.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import psutil
import torch
from _common import fmt_seconds, median_seconds, versions

import vramkit
from vramkit import ManagedModel
from vramkit.testing.models import TinyMLP, module_nbytes, tiny_mlp

MODEL_MIB = 512
LAYERS = 4
GOAL_VS_LOADER = 20.0  # disk wake + first forward at least 20x faster than the loader
GOAL_VS_PAGE_CACHE = 2.0  # ... and within 2x of reading the same bytes from the page cache
MIB = 1 << 20
PAGE = mmap.PAGESIZE


def host_memory() -> dict[str, int]:
    """This process's RSS, split into anonymous and file-backed pages where Linux says."""
    result = {"rss": int(psutil.Process().memory_info().rss)}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                result[key] = int(value.split()[0]) * 1024
    return result


def fmt_memory(mem: dict[str, int], base: dict[str, int]) -> str:
    text = f"{(mem['rss'] - base['rss']) / MIB:>+8.1f}"
    if "RssAnon" in mem:
        anon = (mem["RssAnon"] - base["RssAnon"]) / MIB
        file = (mem["RssFile"] + mem["RssShmem"] - base["RssFile"] - base["RssShmem"]) / MIB
        text += f" {anon:>+8.1f} {file:>+8.1f}"
    return text


def filesystem_of(path: str) -> str:
    best, kind = "", "?"
    with contextlib.suppress(Exception):
        for part in psutil.disk_partitions(all=True):
            if path.startswith(part.mountpoint) and len(part.mountpoint) > len(best):
                best, kind = part.mountpoint, part.fstype
    return kind


def timed(fn: Callable[[], object]) -> float:
    """One call's wall time (samples taken in turn with others, then reduced by median)."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def read_into(path: str, buffer: np.ndarray[Any, Any]) -> None:
    """Read the whole file into ``buffer`` (preallocated, already touched)."""
    view = memoryview(buffer).cast("B")
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                break
            done += got


def mmap_touch(path: str) -> int:
    """Map the file and touch one byte per page: the mapping cost alone, no data read."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        pages = np.frombuffer(mapped, dtype=np.uint8)[::PAGE]
        total = int(pages.sum())
        del pages
    return total


def mmap_read_all(path: str) -> int:
    """Map the file and read every byte (a multithreaded sum, as torch reads weights)."""
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, no copy
        try:
            words = torch.frombuffer(mapped, dtype=torch.int64, count=len(mapped) // 8)
            total = int(words.sum())
            del words
        finally:
            mapped.close()
    return total


def time_readinto(path: str, nbytes: int, runs: int) -> float:
    """Median time to read the cached file into a buffer allocated and touched beforehand."""
    buffer = np.ones(nbytes, dtype=np.uint8)
    read_into(path, buffer)  # and the file is in the page cache
    return median_seconds(lambda: read_into(path, buffer), runs=runs, warmup=0)


def measure_checks(mm: ManagedModel[Any], runs: int) -> dict[str, float]:
    """Medians of: re-offload reusing the file, re-offload rewriting it, the digest pass
    alone, and the identity check a wake runs. The model is READY (woken from disk)."""
    from vramkit.model._tierfile import tensor_digests

    reuse, rewrite, digests, identity = [], [], [], []
    for _ in range(runs):
        mm.wake()
        mm.offload("disk").reused_file or _fail("an unchanged model rewrote its file")
        reuse.append(mm.stats.offload_seconds["disk"])
        mm.wake()
        mm.offload("disk", rewrite=True)
        rewrite.append(mm.stats.offload_seconds["disk"])
        mm.wake()
        with mm.use() as module:
            weights = dict(module.state_dict())
        started = time.perf_counter()
        dict(tensor_digests(weights))
        digests.append(time.perf_counter() - started)
        del weights
        file = mm._disk_cache.file
        identity.append(median_seconds(file.intact, runs=50, warmup=5))
    return {
        "reuse": median(reuse),
        "rewrite": median(rewrite),
        "digests": median(digests),
        "identity": median(identity),
    }


def _fail(message: str) -> bool:
    raise AssertionError(message)


def print_checks(checks: dict[str, float], lazy_wake: float) -> None:
    print("\nThe disk tier's checks (medians)")
    print(
        f"{'  re-offload, file kept (stamps + identity + SHA-256)':<56} "
        f"{fmt_seconds(checks['reuse']):>10}"
    )
    print(
        f"{'  re-offload, file rewritten (rewrite=True)':<56} {fmt_seconds(checks['rewrite']):>10}"
    )
    print(f"{'  of which: SHA-256 of every weight':<56} {fmt_seconds(checks['digests']):>10}")
    print(
        f"  keeping the file costs {checks['reuse'] / checks['rewrite']:.2f}x a rewrite "
        f"({checks['rewrite'] / checks['reuse']:.1f}x cheaper), and proves the weights unchanged"
    )
    print(
        f"{'  trust check at wake (identity + layout)':<56} {fmt_seconds(checks['identity']):>10}"
    )
    print(
        f"  a content hash checked at every wake would add {fmt_seconds(checks['digests'])} "
        f"to a {fmt_seconds(lazy_wake)} wake ({checks['digests'] / lazy_wake:.1f}x it); the "
        f"identity check adds {checks['identity'] / lazy_wake:.4f}x"
    )


def make_loader(path: str, dim: int) -> Callable[[], torch.nn.Module]:
    def load_checkpoint() -> torch.nn.Module:
        model = TinyMLP(dim, LAYERS)  # build (random initialisation), then load over it
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()

    return load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs (and 16 MiB with --wake-only)"
    )
    parser.add_argument(
        "--wake-only",
        action="store_true",
        help="only the cpu tier's wake against a pinned copy of the same bytes",
    )
    parser.add_argument("--device", default=None, help="--wake-only: the device (default cuda)")
    parser.add_argument("--json", default=None, help="--wake-only: also write the figures here")
    args = parser.parse_args()
    loader_runs, tier_runs, read_runs = (3, 3, 5) if args.quick else (5, 7, 9)
    print(versions(threads=True))
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as workdir:
        if not args.wake_only:
            run(workdir, loader_runs, tier_runs, read_runs)
            return
        device = args.device or "cuda"
        mib = 16 if args.quick else MODEL_MIB
        checkpoint, dim = save_checkpoint(workdir, mib)
        figures = wake_bandwidth(make_loader(checkpoint, dim), dim, workdir, tier_runs, device)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(figures, out, indent=2)


def save_checkpoint(workdir: str, mib: float) -> tuple[str, int]:
    """A ``TinyMLP`` of ``mib`` MiB saved with ``torch.save``; its path and width."""
    checkpoint = os.path.join(workdir, "model.pt")
    source = tiny_mlp(mib, layers=LAYERS)
    dim = source.dim
    torch.save(source.state_dict(), checkpoint)
    return checkpoint, dim


def run(workdir: str, loader_runs: int, tier_runs: int, read_runs: int) -> None:
    checkpoint, dim = save_checkpoint(workdir, MODEL_MIB)
    weight_bytes = module_nbytes(TinyMLP(dim, LAYERS))
    gc.collect()
    vramkit.cleanup("cpu")
    print(
        f"model: TinyMLP dim {dim} x {LAYERS} layers, {weight_bytes / MIB:.1f} MiB; checkpoint and "
        f"disk tier in a temporary directory on {filesystem_of(workdir)} (page cache warm)"
    )

    x = torch.randn(1, dim)
    base = host_memory()
    mm = ManagedModel.from_torch(
        make_loader(checkpoint, dim), device="cpu", name="mlp512", offload_dir=workdir
    )
    mm(x)
    warm: list[float] = []  # a forward on a READY model, timed next to each wake
    memory: dict[str, dict[str, int]] = {}

    # (a) the loader: what a reload costs.
    loader: list[float] = []
    for _ in range(loader_runs):
        mm.unload()
        memory["UNLOADED"] = host_memory()
        loader.append(timed(lambda: mm(x)))
    memory["READY (loaded)"] = host_memory()

    # (c) the cpu tier (on a cpu device the weights already are in host RAM).
    cpu: list[float] = []
    cpu_wake: list[float] = []
    cpu_note = ""
    for _ in range(tier_runs):
        cpu_note = mm.offload("cpu").note
        memory["OFFLOADED cpu"] = host_memory()
        cpu.append(timed(lambda: mm(x)))
        warm.append(timed(lambda: mm(x)))
        cpu_wake.append(mm.stats.wake_seconds["cpu"])

    # (b) the disk tier: write once, then wake from the file (reused while unchanged).
    first = mm.offload("disk")
    path = first.path
    assert path is not None
    mm(x)
    disk: list[float] = []
    disk_wake: list[float] = []
    for _ in range(tier_runs):
        report = mm.offload("disk")
        memory["OFFLOADED disk"] = host_memory()
        disk.append(timed(lambda: mm(x)))
        warm.append(timed(lambda: mm(x)))
        disk_wake.append(mm.stats.wake_seconds["disk"])
    memory["READY (woken from disk)"] = host_memory()
    reused = report.reused_file

    # Laziness, shown apart: wake() returns before the pages are read.
    lazy_wake, lazy_first, lazy_second = [], [], []
    for _ in range(tier_runs):
        mm.offload("disk")
        lazy_wake.append(timed(mm.wake))
        lazy_first.append(timed(lambda: mm(x)))
        lazy_second.append(timed(lambda: mm(x)))

    checks = measure_checks(mm, tier_runs)

    # The same bytes from the page cache: the bandwidth limit of any disk wake.
    path = mm.offload("disk").path  # (the checks above wrote new files)
    assert path is not None
    file_bytes = os.path.getsize(path)
    readinto_s = time_readinto(path, file_bytes, read_runs)
    mapped_s = median_seconds(lambda: mmap_read_all(path), runs=read_runs, warmup=0)
    touch_s = median_seconds(lambda: mmap_touch(path), runs=read_runs, warmup=0)
    mm.wake()
    mm(x)
    mm.unload()
    memory["UNLOADED (end)"] = host_memory()

    loader_s, disk_s, cpu_s = median(loader), median(disk), median(cpu)
    forward = median(warm)
    bound = min(readinto_s, mapped_s)
    rows = [
        ("forward alone, model READY (warm)", forward, None),
        ("(a) loader: build + load_state_dict(torch.load)", loader_s, None),
        ("(b) disk tier: wake + first forward", disk_s, median(disk_wake)),
        ("(c) cpu tier: wake + first forward", cpu_s, median(cpu_wake)),
    ]
    print(
        f"\nTime to READY + first forward (median of {loader_runs} loader runs, "
        f"{tier_runs} tier runs)"
    )
    print(f"{'path':<50} {'median':>10} {'wake only':>10} {'vs loader':>10}")
    for name, seconds, wake in rows:
        wake_text = fmt_seconds(wake) if wake is not None else ""
        ratio = "" if name.startswith("forward") else f"{loader_s / seconds:.1f}x"
        print(f"{name:<50} {fmt_seconds(seconds):>10} {wake_text:>10} {ratio:>10}")
    if cpu_note:
        print(f"  cpu tier here: {cpu_note}")
    print(
        f"  disk tier: first offload wrote {first.weight_bytes / MIB:.0f} MiB in "
        f"{fmt_seconds(first.seconds)}; later offloads reused the file: {reused}"
    )

    print(f"\nThe same {file_bytes / MIB:.1f} MiB from the page cache (median of {read_runs})")
    print(
        f"{'readinto a preallocated buffer':<50} {fmt_seconds(readinto_s):>10} "
        f"{file_bytes / readinto_s / 1e9:>7.2f} GB/s"
    )
    print(
        f"{'mmap + read every byte (torch sum)':<50} {fmt_seconds(mapped_s):>10} "
        f"{file_bytes / mapped_s / 1e9:>7.2f} GB/s"
    )
    print(
        f"{'mmap + touch one byte per page (mapping only)':<50} {fmt_seconds(touch_s):>10} "
        f"{file_bytes / touch_s / 1e9:>7.2f} GB/s"
    )

    print(
        "\nThe disk tier's wake is lazy: it maps the file and pages are read at first "
        "touch,\nso wake() alone looks cheaper than it is; 'wake + first forward' is the honest "
        "figure."
    )
    print(f"{'  wake() alone':<50} {fmt_seconds(median(lazy_wake)):>10}")
    first_touch = fmt_seconds(median(lazy_first))
    print(f"{'  first forward after it (pages read here)':<50} {first_touch:>10}")
    print(f"{'  second forward':<50} {fmt_seconds(median(lazy_second)):>10}")

    print_checks(checks, median(lazy_wake))

    print("\nHost memory held in each state (MiB vs before the first load)")
    header = f"{'state':<26} {'RSS':>8}"
    if "RssAnon" in base:
        header += f" {'anon':>8} {'file':>8}"
    print(header)
    for state in (
        "READY (loaded)",
        "OFFLOADED cpu",
        "OFFLOADED disk",
        "READY (woken from disk)",
        "UNLOADED",
        "UNLOADED (end)",
    ):
        print(f"{state:<26} {fmt_memory(memory[state], base)}")
    if "RssAnon" in base:
        print(
            "  file-backed pages (woken from disk) are the mapped cache file: clean, and the "
            "kernel may drop them"
        )

    speedup = loader_s / disk_s
    vs_bound = disk_s / bound
    wake_share = max(disk_s - forward, 0.0) / bound
    print("\nGoals")
    verdict = "meets" if speedup >= GOAL_VS_LOADER else "MISSES"
    print(
        f"  disk wake + first forward {fmt_seconds(disk_s)} vs loader {fmt_seconds(loader_s)}: "
        f"{speedup:.1f}x faster: {verdict} the {GOAL_VS_LOADER:.0f}x goal"
    )
    verdict = "meets" if vs_bound <= GOAL_VS_PAGE_CACHE else "MISSES"
    print(
        f"  disk wake + first forward vs the page-cache read ({fmt_seconds(bound)}, the faster "
        f"of the two): {vs_bound:.2f}x: {verdict} the {GOAL_VS_PAGE_CACHE:.0f}x goal"
    )
    print(
        f"    (vs readinto {disk_s / readinto_s:.2f}x, vs mmap read {disk_s / mapped_s:.2f}x, "
        f"vs mapping only {disk_s / touch_s:.2f}x; less a warm forward's "
        f"{fmt_seconds(forward)}: {wake_share:.2f}x)"
    )

    if torch.cuda.is_available():
        wake_bandwidth(make_loader(checkpoint, dim), dim, workdir, tier_runs, "cuda")
    else:
        print("\nCUDA not available: host-to-device bandwidth of the cpu-tier wake not measured")


def wake_bandwidth(
    loader: Callable[[], torch.nn.Module], dim: int, workdir: str, runs: int, device: str
) -> dict[str, Any]:
    """The cpu tier's wake vs a plain (on CUDA, pinned) host-to-device copy of the same bytes.

    On a CPU device the cpu tier keeps the weights where they are, so the wake
    and the host copy measure only that the path runs (``--dry-run`` of the GPU check).
    """
    on_cuda = device.startswith("cuda")

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    mm = ManagedModel.from_torch(loader, device=device, name="mlp-wake", offload_dir=workdir)
    x = torch.randn(1, dim, device=device)
    mm(x)
    sync()
    wakes: list[float] = []
    pinned = False
    nbytes = 0
    for _ in range(runs):
        report = mm.offload("cpu")
        pinned, nbytes = report.pinned, report.weight_bytes
        sync()
        started = time.perf_counter()
        mm.wake()
        sync()
        wakes.append(time.perf_counter() - started)
    first_forward: list[float] = []
    for _ in range(runs):
        mm.offload("cpu")
        sync()
        started = time.perf_counter()
        mm(x)
        sync()
        first_forward.append(time.perf_counter() - started)
    mm.unload()

    host = torch.empty(nbytes, dtype=torch.uint8)
    if on_cuda:
        host = host.pin_memory()
    host.fill_(1)
    copies: list[float] = []
    for i in range(runs + 1):
        sync()
        started = time.perf_counter()
        on_device = host.to(device, non_blocking=True) if on_cuda else host.clone()
        sync()
        if i:  # the first copy also grows the caching allocator
            copies.append(time.perf_counter() - started)
        del on_device
    del host
    if on_cuda:
        torch.cuda.empty_cache()

    wake_s, copy_s = median(wakes), median(copies)
    where = f"CUDA ({torch.cuda.get_device_name(device)})" if on_cuda else "cpu (no transfer)"
    print(
        f"\n{where}: cpu-tier wake of {nbytes / MIB:.0f} MiB, "
        f"host copy pinned: {pinned} (median of {runs})"
    )
    print(f"{'cpu-tier wake()':<50} {fmt_seconds(wake_s):>10} {nbytes / wake_s / 1e9:>7.2f} GB/s")
    print(f"{'cpu-tier wake + first forward':<50} {fmt_seconds(median(first_forward)):>10}")
    copy_label = "pinned tensor.to(cuda), one block (peak)" if on_cuda else "host clone, one block"
    print(f"{copy_label:<50} {fmt_seconds(copy_s):>10} {nbytes / copy_s / 1e9:>7.2f} GB/s")
    print(f"wake bandwidth is {copy_s / wake_s:.0%} of the one-block copy")
    return {
        "device": device,
        "nbytes": nbytes,
        "pinned": pinned,
        "wake_seconds": wake_s,
        "wake_gbps": nbytes / wake_s / 1e9,
        "wake_and_forward_seconds": median(first_forward),
        "copy_seconds": copy_s,
        "copy_gbps": nbytes / copy_s / 1e9,
        "wake_vs_copy": copy_s / wake_s,
    }


if __name__ == "__main__":
    main()
