"""Soak: load -> infer -> unload and offload -> wake, over and over, in one process.

Each soak runs in a fresh interpreter (so the figures are the model's, not the
test runner's: pytest's log capture, other tests' threads and a FunASR import in
the runner would all move them) that goes through two phases on one model:

1. ``cycles`` times: lease the model (which loads it), infer, unload; every
   unload report must say the model died.
2. ``cycles`` times: offload (alternating the ``cpu`` and ``disk`` tiers), wake,
   infer.

Every inference must give the output of the first one (nothing lost or
corrupted across reloads and wakes). After the first 10 cycles and at the end of
each phase the child reads RSS (after ``vramkit.cleanup``), open file
descriptors, Python and OS thread counts and live gc-tracked objects; growth
between the two readings must stay bounded. Short mode runs tens of cycles per
phase, ``VRAMKIT_STRESS=long`` runs 1,000.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import LONG, Record, scale

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/status").exists(),
        reason="counts fds and threads through /proc (Linux)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
PHASES = ("load", "offload")
WARMUP = 10  # cycles before the baseline reading: caches, lazy imports, thread pools settle

# Honest bounds, from measurements. Over 1,000 cycles per phase (long mode) the
# growth after warm-up was, load / offload phase: torch +0.01 / +0.41 MiB, FunASR
# +0.02 / +4.56 MiB; fds, threads and gc-tracked objects did not change. The
# FunASR offload-phase creep is upstream (safetensors 0.8.0), explained in the
# note _check_and_record puts on the reliability page. A
# leak of one model per cycle would exceed the bounds well before the end of the
# short run for torch (4 MiB a model); for the tiny FunASR pipeline (0.3 MiB of
# weights) the unload reports' proof of death and the gc object count are the
# sharper checks.
RSS_GROWTH_LIMIT = {"torch": 16 * MIB, "funasr": 32 * MIB}
GC_OBJECTS_GROWTH_LIMIT = 1_000


# ---------------------------------------------------------------------- the child


def _os_threads() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError("no Threads: line in /proc/self/status")


def _probe() -> dict[str, int]:
    import vramkit

    vramkit.cleanup("cpu")
    rss = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    assert rss is not None
    return {
        "rss": int(rss),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": _os_threads(),
        "gc_objects": len(gc.get_objects()),
    }


def _cache_files(directory: Path) -> list[str]:
    """Weight files anywhere under the cache folder (vramkit writes in a subfolder of its own,
    beside a lock file that lives as long as the process has files there)."""
    return sorted(p.name for p in directory.rglob("*") if p.suffix in (".safetensors", ".partial"))


def _build(kind: str, dirs: dict[str, str]) -> tuple[Any, Callable[[Any], Any], Any]:
    """The managed model, an inference function, and how to compare two outputs."""
    import torch

    from vramkit import ManagedModel
    from vramkit.testing.models import TinyMLP, synthetic_audio

    if kind == "torch":
        torch.manual_seed(0)
        state = TinyMLP(512).state_dict()

        def factory() -> TinyMLP:
            module = TinyMLP(512)
            module.load_state_dict(state)  # the same weights at every reload
            return module

        x = torch.linspace(-1, 1, 4 * 512).reshape(4, 512)
        mm = ManagedModel.from_torch(factory, device="cpu", name="mlp")
        return mm, lambda model: model(x).clone(), torch.equal

    audio = synthetic_audio(1.0)
    mm = ManagedModel.from_funasr(
        dirs["asr"],
        vad_model=dirs["vad"],
        punc_model=dirs["punc"],
        device="cpu",
        name="asr",
        disable_pbar=True,
    )

    def transcribe(model: Any) -> str:
        return "|".join(r["text"] for r in model.generate(input=audio, disable_pbar=True))

    return mm, transcribe, lambda a, b: a == b


def soak_child(kind: str, cycles: int, out: str, dirs: dict[str, str] | None = None) -> None:
    """Run both soak phases on one model in this process; write the figures to ``out``."""
    cache = Path(os.environ["VRAMKIT_CACHE_DIR"])
    mm, infer, same = _build(kind, dirs or {})

    def run_once() -> Any:
        with mm.use() as model:
            return infer(model)

    figures: dict[str, Any] = {"cycles": cycles}
    reference = run_once()
    assert mm.unload().died
    mismatches = 0
    not_died = 0
    slowest_unload = 0.0
    baseline: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(cycles):
        if not same(run_once(), reference):
            mismatches += 1
        report = mm.unload()
        if not report.died:
            not_died += 1
            print(f"cycle {i}: {report}", file=sys.stderr)
        slowest_unload = max(slowest_unload, report.seconds)
        if i + 1 == WARMUP:
            baseline = _probe()
    elapsed = time.perf_counter() - started
    figures["load"] = {
        "seconds_per_cycle": elapsed / cycles,
        "slowest_unload_s": slowest_unload,
        "not_died": not_died,
        "output_mismatches": mismatches,
        "after_warmup": baseline,
        "end": _probe(),
    }

    reference = run_once()  # loads; stays loaded for the offload phase
    mismatches = 0
    tiers: dict[str, int] = {"cpu": 0, "disk": 0}
    max_files = 0
    slowest_wake = 0.0
    started = time.perf_counter()
    for i in range(cycles):
        tier = "disk" if i % 2 else "cpu"
        mm.offload(tier)
        tiers[tier] += 1
        max_files = max(max_files, len(_cache_files(cache)))
        wake = mm.wake()
        assert wake is not None
        slowest_wake = max(slowest_wake, wake.seconds)
        if not same(run_once(), reference):
            mismatches += 1
        if i + 1 == WARMUP:
            baseline = _probe()
    elapsed = time.perf_counter() - started
    end = _probe()
    final = mm.unload()
    figures["offload"] = {
        "seconds_per_cycle": elapsed / cycles,
        "slowest_wake_s": slowest_wake,
        "tiers": tiers,
        "output_mismatches": mismatches,
        "max_cache_files": max_files,
        "cache_files_after_unload": len(_cache_files(cache)),
        "final_unload_died": final.died,
        "after_warmup": baseline,
        "end": end,
    }
    Path(out).write_text(json.dumps(figures), encoding="utf-8")


# ---------------------------------------------------------------------- the tests


def _run_soak(
    kind: str, cycles: int, tmp_path: Path, dirs: dict[str, str] | None = None
) -> dict[str, Any]:
    out = tmp_path / "figures.json"
    code = (
        "from tests.stress.test_soak import soak_child; "
        f"soak_child({kind!r}, {cycles}, {str(out)!r}, {dirs!r})"
    )
    env = dict(os.environ, VRAMKIT_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    env.pop("VRAMKIT_RELIABILITY_OUT", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3 * 3600 if LONG else 1800,  # a hang bound: a loaded machine is slow
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"soak child failed ({result.returncode}):\n{result.stderr[-6000:]}")
    figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return figures


def _check_and_record(kind: str, figures: dict[str, Any], record: Record) -> None:
    load, off = figures["load"], figures["offload"]

    def grew(key: str) -> list[int]:
        return [figures[p]["end"][key] - figures[p]["after_warmup"][key] for p in PHASES]

    rss = [g / MIB for g in grew("rss")]
    counts = ", ".join(f"{max(grew(key), key=abs):+d}" for key in ("fds", "threads", "os_threads"))
    # The first four are the key figures (the report's table shows them).
    summary: dict[str, Any] = {
        "cycles per phase": figures["cycles"],
        "RSS growth after warm-up, load / offload phase (MiB)": f"{rss[0]:+.2f} / {rss[1]:+.2f}",
        "fds, threads, OS threads growth (worst phase)": counts,
        "s per cycle, load / offload phase": (
            f"{load['seconds_per_cycle']:.3f} / {off['seconds_per_cycle']:.3f}"
        ),
    }
    for phase in PHASES:
        f = figures[phase]
        warm, end = f["after_warmup"], f["end"]
        summary |= {
            f"{phase}: RSS after {WARMUP} (MiB)": round(warm["rss"] / MIB, 1),
            f"{phase}: RSS at end (MiB)": round(end["rss"] / MIB, 1),
            f"{phase}: fds after {WARMUP} / end": f"{warm['fds']} / {end['fds']}",
            f"{phase}: threads after {WARMUP} / end (python, os)": (
                f"{warm['threads']}, {warm['os_threads']} / {end['threads']}, {end['os_threads']}"
            ),
            f"{phase}: gc objects growth": end["gc_objects"] - warm["gc_objects"],
            f"{phase}: output mismatches": f["output_mismatches"],
        }
    summary |= {
        "slowest unload (s)": round(load["slowest_unload_s"], 3),
        "slowest wake (s)": round(off["slowest_wake_s"], 3),
        "unloads not proven dead": load["not_died"],
        "offload tiers": off["tiers"],
        "disk-tier files at most / after unload": (
            f"{off['max_cache_files']} / {off['cache_files_after_unload']}"
        ),
    }
    summary["RSS growth bound per phase (MiB)"] = RSS_GROWTH_LIMIT[kind] // MIB
    record.figures = summary
    if kind == "funasr":
        record.note = (
            "The offload phase's RSS growth is the disk tier's read: safetensors' "
            "safe_open/get_tensor keeps about 60 bytes per tensor per load (upstream; a "
            "plain loop of safetensors.torch.load_file shows it too), some 8 KiB per disk "
            "wake of this pipeline. fds, threads and gc-tracked objects do not grow."
        )
    lost = []
    if load["not_died"]:
        lost.append(f"{load['not_died']} unloads left the model alive")
    mismatched = load["output_mismatches"] + off["output_mismatches"]
    if mismatched:
        lost.append(f"{mismatched} inferences differed from the first")
    record.lost = "; ".join(lost) or "nothing"

    assert load["not_died"] == 0, "an unload report did not prove the model died"
    assert mismatched == 0, "an output changed across reloads or wakes"
    assert off["final_unload_died"]
    assert off["cache_files_after_unload"] == 0, "unload left a disk-tier file behind"
    assert off["max_cache_files"] <= 1
    for phase in PHASES:
        warm, end = figures[phase]["after_warmup"], figures[phase]["end"]
        assert end["rss"] - warm["rss"] < RSS_GROWTH_LIMIT[kind], (phase, warm, end)
        assert end["fds"] == warm["fds"], (phase, warm, end)
        assert end["threads"] == warm["threads"], (phase, warm, end)
        assert end["os_threads"] == warm["os_threads"], (phase, warm, end)
        assert end["gc_objects"] - warm["gc_objects"] < GC_OBJECTS_GROWTH_LIMIT, (phase, warm, end)


def test_torch_soak(tmp_path: Path, reliability: Record) -> None:
    cycles = scale(100, 1000)
    reliability.area = "soak"
    reliability.load = (
        f"TinyMLP(512) (4 MiB) on cpu, in one fresh process: {cycles} x (load, forward, "
        f"unload), then {cycles} x (offload to cpu / disk alternately, wake, forward)"
    )
    figures = _run_soak("torch", cycles, tmp_path)
    _check_and_record("torch", figures, reliability)


def test_funasr_pipeline_soak(funasr_pipeline: Any, tmp_path: Path, reliability: Record) -> None:
    # 25 in CI: 15 measured cycles after the warm-up, each one proven dead by
    # its unload report; the gc-object bound catches a leak of 67 objects a cycle.
    cycles = scale(25, 1000)
    reliability.area = "soak"
    reliability.load = (
        f"FunASR VAD + Paraformer + punctuation (tiny, offline) on cpu, in one fresh process: "
        f"{cycles} x (load, generate on 1 s of audio, unload), then {cycles} x (offload to "
        "cpu / disk alternately, wake, generate)"
    )
    dirs = {k: str(getattr(funasr_pipeline, k)) for k in ("asr", "vad", "punc")}
    figures = _run_soak("funasr", cycles, tmp_path, dirs)
    _check_and_record("funasr", figures, reliability)
