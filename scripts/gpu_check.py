#!/usr/bin/env python
"""Run vramkit's hardware checks on a CUDA machine and print one table of what they found.

The steps, each in a process of its own (so a crash in one is a row of the
table, not the end of the run) and each bounded in time:

1. the ``cuda``-marked tests (``tests/cuda``, ``tests/test_session.py``,
   ``tests/test_pytest_plugin.py``);
2. ``benchmarks/bench_batch_asr.py`` on the device, capped to an 8 GiB budget;
3. the cpu tier's wake against a pinned host-to-device copy of the same bytes
   (``benchmarks/bench_offload.py --wake-only``);
4. what ``vramkit.snapshot()`` costs on the device (``benchmarks/bench_snapshot.py``);
5. what ``gpu_session`` costs there (``benchmarks/bench_session.py``).

The table has the columns of ``docs/hardware-validation.md`` (date, device,
torch / driver, suite, result), one row per figure, and goes to ``--out``
(``gpu-check.md``) and to standard output.

``scripts/gpu-check`` sets up the virtual environment first and then runs this.
``--dry-run`` runs every step on the CPU at small sizes with the current
interpreter: the cuda tests are collected and skipped, the benchmarks run
their CPU paths. CI runs it so that the script cannot rot between GPU runs.

Exit status: 0 when every step ran and passed, 1 when one failed, 2 when the
machine has no usable GPU (and ``--dry-run`` was not given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUDGET_SECONDS = 8 * 60  # the whole check, install included, on a GPU machine
CUDA_TEST_PATHS = ("tests/cuda", "tests/test_session.py", "tests/test_pytest_plugin.py")
HEADER = "| date | device | torch / driver | suite | result |"
RULE = "|---|---|---|---|---|"
SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.*")

Row = tuple[str, str]  # (suite, result)


@dataclass(frozen=True)
class Step:
    """One check: the command to run and how to turn its figures into table rows."""

    name: str
    command: Callable[[str, bool, str], list[str]]  # (device, dry_run, json_path) -> argv
    rows: Callable[[dict[str, Any], bool], list[Row]]  # (figures, dry_run) -> rows
    timeout: float


def _pytest_command(device: str, dry_run: bool, json_path: str) -> list[str]:
    del (
        device,
        dry_run,
        json_path,
    )  # the marker selects the tests; conftest skips them without a GPU
    return [
        sys.executable,
        "-m",
        "pytest",
        *CUDA_TEST_PATHS,
        "-m",
        "cuda",
        "-q",
        "-p",
        "no:cacheprovider",
    ]


def _bench(script: str, *extra: str, quick: tuple[str, ...] = ("--quick",)) -> Any:
    def command(device: str, dry_run: bool, json_path: str) -> list[str]:
        argv = [sys.executable, str(ROOT / "benchmarks" / script), "--device", device]
        argv += [*extra, "--json", json_path]
        return argv + list(quick if dry_run else ())

    return command


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:+.1f} MiB"


def _test_rows(figures: dict[str, Any], dry_run: bool) -> list[Row]:
    label = "`-m cuda`: " + ", ".join(p.removeprefix("tests/") for p in CUDA_TEST_PATHS)
    result = figures.get("summary") or "no summary"
    if dry_run:
        result += " (dry run on a CPU: skipped tests are expected)"
    return [(label, result)]


def _batch_rows(figures: dict[str, Any], dry_run: bool) -> list[Row]:
    ways = figures["ways"]
    ours = ways["vramkit managed()"]
    label = f"`bench_batch_asr.py`, {figures['files']} files in batches of {figures['batch']}"
    if figures.get("budget_bytes"):
        label += f", capped at {figures['budget_bytes'] / 2**30:.0f} GiB"
    growth = ours.get("reserved_growth_bytes")
    grown = f"RSS {_mib(ours['rss_growth_bytes'])}"
    if growth is not None:
        grown += f", reserved {_mib(growth)}"
    ooms = ", ".join(
        f"{name}: {'OOM at file ' + str(w['oom_at_file']) if w['oom_at_file'] else 'no OOM'}"
        for name, w in ways.items()
    )
    named = figures.get("planted_cache_named_at_batch")
    rows = [
        (
            label,
            f"vramkit {figures['vs_no_cleanup']:.2f}x no cleanup, "
            f"{figures['vs_empty_cache']:.2f}x empty_cache per batch; {grown}; "
            f"planted cache named at batch {named if named is not None else 'never'}",
        )
    ]
    if figures.get("budget_bytes"):
        rows.append(("batch ASR under the cap: out of memory", ooms))
    return rows


def _wake_rows(figures: dict[str, Any], dry_run: bool) -> list[Row]:
    mib = figures["nbytes"] / 2**20
    copy = "pinned copy" if str(figures["device"]).startswith("cuda") else "host clone"
    result = (
        f"wake {_fmt_s(figures['wake_seconds'])}, {figures['wake_gbps']:.2f} GB/s; "
        f"{copy} of the same bytes {_fmt_s(figures['copy_seconds'])}, "
        f"{figures['copy_gbps']:.2f} GB/s; wake at {figures['wake_vs_copy']:.0%} of it"
    )
    if dry_run:
        result += " (dry run: on a CPU the tier moves nothing, so only the path is checked)"
    return [(f"cpu-tier wake of {mib:.0f} MiB (host copy pinned: {figures['pinned']})", result)]


def _snapshot_rows(figures: dict[str, Any], dry_run: bool) -> list[Row]:
    device = figures["device"]
    return [
        (
            f'`vramkit.snapshot("{device}")`',
            f"{_fmt_s(figures['snapshot_seconds'])} "
            f"({figures['reference']} {_fmt_s(figures['reference_seconds'])}: "
            f"{figures['snapshot_seconds'] / figures['reference_seconds']:.2f}x)",
        )
    ]


def _session_rows(figures: dict[str, Any], dry_run: bool) -> list[Row]:
    device = figures["device"]
    gc_s = figures["gc_collect_seconds"]
    return [
        (
            f"`gpu_session` on {device}, {figures['heap_objects']:,} gc-tracked objects",
            f"no leak check {_fmt_s(figures['unchecked_seconds'])}; "
            f'leak_check="raise" {_fmt_s(figures["checked_seconds"])} '
            f"({figures['checked_seconds'] / gc_s:.2f}x a full gc.collect() of {_fmt_s(gc_s)})",
        )
    ]


STEPS = (
    Step("tests", _pytest_command, _test_rows, timeout=240),
    Step("batch", _bench("bench_batch_asr.py"), _batch_rows, timeout=240),
    Step("wake", _bench("bench_offload.py", "--wake-only"), _wake_rows, timeout=90),
    Step("snapshot", _bench("bench_snapshot.py"), _snapshot_rows, timeout=90),
    Step("session", _bench("bench_session.py"), _session_rows, timeout=120),
)


def machine(device: str) -> tuple[str, str]:
    """The table's device and ``torch / driver`` cells."""
    import torch

    torch_cell = f"torch {torch.__version__}"
    if not device.startswith("cuda"):
        return "none (CPU only: dry run)", torch_cell
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    cuda = torch.version.cuda or "?"
    return name, f"{torch_cell} (CUDA {cuda}) / driver {driver_version()}"


def driver_version() -> str:
    """The NVIDIA driver's version, from NVML or ``nvidia-smi``; ``unknown`` otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # any NVML failure: try the command line instead
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown"


def run_step(step: Step, device: str, dry_run: bool, workdir: str) -> tuple[list[Row], bool]:
    """Run one step; rows for the table, and whether it passed."""
    json_path = os.path.join(workdir, f"{step.name}.json")
    argv = step.command(device, dry_run, json_path)
    print(f"==> {step.name}: {' '.join(Path(a).name if '/' in a else a for a in argv[1:])}")
    started = time.monotonic()
    try:
        out = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        tail = _tail((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout)
        print(tail)
        return [(step.name, f"**did not finish within {step.timeout:.0f} s**")], False
    print(_tail(out.stdout + out.stderr))
    print(f"    {step.name}: exit {out.returncode} in {time.monotonic() - started:.0f} s")
    figures: dict[str, Any] = {}
    if step.name == "tests":
        summaries = [m.group(0) for m in SUMMARY.finditer(out.stdout)]
        figures["summary"] = summaries[-1] if summaries else None
    elif os.path.exists(json_path):
        figures = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if out.returncode != 0 or not figures:
        why = figures.get("summary") or _last_line(out.stderr or out.stdout)
        return [(step.name, f"**failed** (exit {out.returncode}): {why}")], False
    return step.rows(figures, dry_run), True


def _tail(text: str | None, lines: int = 25) -> str:
    kept = (text or "").rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].replace("|", "/") if lines else "no output"


def render(date: str, device_cell: str, torch_cell: str, rows: Sequence[Row]) -> str:
    """The markdown table: the header of docs/hardware-validation.md and one row per figure."""
    lines = [HEADER, RULE]
    for suite, result in rows:
        cells = (date, device_cell, torch_cell, suite, result)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="run every step on the CPU at small sizes"
    )
    parser.add_argument("--device", default=None, help="the GPU to check (default: cuda)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "gpu-check.md", help="where to write the table"
    )
    parser.add_argument(
        "--only", action="append", choices=[s.name for s in STEPS], help="run only these steps"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    import torch

    device = args.device or ("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not (device.startswith("cuda") and torch.cuda.is_available()):
        print(
            f"no usable GPU: torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'no'}), torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}; use --dry-run to exercise the script on a CPU",
            file=sys.stderr,
        )
        return 2
    device_cell, torch_cell = machine(device)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    print(f"gpu-check on {device_cell}, {torch_cell}{' (dry run)' if args.dry_run else ''}")
    rows: list[Row] = []
    passed = True
    with tempfile.TemporaryDirectory(prefix="vramkit-gpu-check-") as workdir:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            step_rows, ok = run_step(step, device, args.dry_run, workdir)
            rows.extend(step_rows)
            passed = passed and ok
    table = render(date, device_cell, torch_cell, rows)
    args.out.write_text(table, encoding="utf-8")
    elapsed = time.monotonic() - started
    print(f"\nchecks took {elapsed:.0f} s (the whole command must stay under {BUDGET_SECONDS} s)")
    print(f"table written to {args.out}; paste it into docs/hardware-validation.md:\n")
    print(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
