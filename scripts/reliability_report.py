#!/usr/bin/env python
"""Run the reliability suite and regenerate docs/reliability.md from what it recorded.

Every test in ``tests/stress`` records the load it applied, the faults it
injected, the bad inputs it tried, what was lost and its figures (the
``reliability`` fixture); with ``VRAMKIT_RELIABILITY_OUT`` set, the records go
to a JSON-lines file. This script runs the suite that way, then writes the page.

Usage::

    python scripts/reliability_report.py                 # short mode, as CI runs it
    python scripts/reliability_report.py --long          # VRAMKIT_STRESS=long (by hand)
    python scripts/reliability_report.py -k soak -x      # other arguments go to pytest
    python scripts/reliability_report.py --long --records r.jsonl -k soak   # a run in parts

Exits with pytest's status when it failed, else 1 if any recorded test did not
pass, else 0. The page is written either way, so failures are on it.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "reliability.md"
KEY_FIGURES = 4  # the first figures a test records are its key ones
SUMMARY = re.compile(
    r"\b\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s"
)
AREA_ORDER = ("concurrency", "faults", "bad input", "soak", "process exit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run tests/stress and regenerate docs/reliability.md from its records.",
        epilog="Unrecognised arguments are passed to pytest.",
    )
    parser.add_argument(
        "--long", action="store_true", help="run the long versions (VRAMKIT_STRESS=long)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="the page to write (default: docs/reliability.md)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        help="keep the records in this JSON-lines file; those of tests this run does not "
        "repeat are kept from earlier runs, so a long run can be done in parts (-k ...)",
    )
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    mode = "long" if args.long else "short"

    with tempfile.TemporaryDirectory(prefix="vramkit-reliability-") as tmp:
        records_path = Path(tmp) / "records.jsonl"
        env = dict(os.environ, VRAMKIT_RELIABILITY_OUT=str(records_path), VRAMKIT_STRESS=mode)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/stress",
            "-q",
            "-p",
            "no:cacheprovider",
            *pytest_args,
        ]
        print("$ python " + " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        code, summary = _run(command, env)
        seconds = time.perf_counter() - started
        records = _read(records_path)
    if args.records is not None:
        records, summary = _merge(args.records, records, summary)

    page = render(records, mode=mode, summary=summary, seconds=seconds, machine=machine())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    failed = [r["test"] for r in records if r.get("outcome") not in ("passed", "skipped")]
    print(f"wrote {_shown(args.output)}: {len(records)} tests recorded, {len(failed)} not passed")
    if code != 0:
        return code
    return 1 if failed else 0


def _merge(path: Path, records: list[dict[str, Any]], summary: str) -> tuple[list[Any], str]:
    """Records of ``path`` that this run did not repeat, then this run's; saved back to ``path``.

    Returns:
        The merged records, and the summary line saying what came from earlier runs.
    """
    repeated = {r["test"] for r in records}
    kept = [r for r in _read(path) if r["test"] not in repeated]
    merged = kept + records
    path.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
    if kept:
        earlier = f"{len(kept)} tests recorded by earlier parts"
        summary = f"{earlier}; this part: {summary or 'no pytest summary'}"
    return merged, summary


def _run(command: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Run pytest, echoing its output; return its status and its summary line."""
    summary = ""
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            match = SUMMARY.search(line)
            if match:
                summary = match.group(0)
        code = proc.wait()
    sys.stdout.flush()
    return code, summary


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def machine() -> dict[str, str]:
    """A short description of this machine: OS, CPUs, RAM, Python, torch, GPU."""
    import psutil
    import torch

    ram = psutil.virtual_memory().total / 2**30
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(names)
    elif torch.backends.mps.is_available():
        gpu = "Apple GPU (MPS)"
    else:
        gpu = "no GPU"
    return {
        "os": f"{platform.system()} {platform.machine()}",
        "cpus": str(os.cpu_count() or "?"),
        "ram": f"{ram:.1f} GiB RAM",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


# ---------------------------------------------------------------------- markdown


def _text(value: object) -> str:
    """Plain text for a table cell: one line, pipes escaped, HTML only inside code spans."""
    text = " ".join(str(value).split())
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: treat it as text
        parts = [text.replace("`", "'")]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"`{part}`")  # code span: Markdown escapes it; tables respect it
        else:
            part = html.escape(part, quote=False).replace("|", "\\|")
            out.append(re.sub(r"([*_\[\]])", r"\\\1", part))
    return "".join(out)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, Mapping | list | tuple) and not value:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _key_figures(figures: Mapping[str, Any]) -> str:
    items = list(figures.items())[:KEY_FIGURES]
    return "; ".join(f"{name}: {_value(value)}" for name, value in items) or "-"


def _outcome(record: Mapping[str, Any]) -> str:
    outcome = str(record.get("outcome", "?"))
    return outcome if outcome in ("passed", "skipped") else f"**{outcome.upper()}**"


def _ordered(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    def area_rank(record: Mapping[str, Any]) -> int:
        area = str(record.get("area", ""))
        return AREA_ORDER.index(area) if area in AREA_ORDER else len(AREA_ORDER)

    return sorted(records, key=area_rank)  # stable: run order within an area


def render(
    records: list[dict[str, Any]],
    *,
    mode: str,
    summary: str,
    seconds: float,
    machine: Mapping[str, str],
) -> str:
    """The Markdown page for ``records`` (one per test, in run order)."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    records = _ordered(records)
    areas: dict[str, int] = {}
    for record in records:
        area = record.get("area") or "other"
        areas[area] = areas.get(area, 0) + 1
    passed = sum(1 for r in records if r.get("outcome") == "passed")
    lost = [r for r in records if str(r.get("lost", "nothing")).strip() != "nothing"]
    lines = [
        "# Reliability",
        "",
        "<!-- Generated by scripts/reliability_report.py from the records of tests/stress. "
        "Edit the tests or the script, then regenerate; do not edit this page by hand. -->",
        "",
        "The reliability suite (`tests/stress/`) puts vramkit where memory managers break "
        "in production: many threads on the same models at once, injected faults, bad "
        "input, long runs of load/unload and offload/wake cycles in one process, and "
        "process exit in awkward states (threads running, leases out, signals). Each test "
        "checks that nothing is lost (no model left alive after an unload, no output "
        "changed, no file, thread or file descriptor left behind, no hang) and records the "
        "load it applied, the faults it injected, the bad inputs it tried, what was lost "
        "and its figures. This page is generated from those records.",
        "",
        f"Generated on {today} from a **{mode}** run "
        f"({summary or 'no pytest summary'}; {seconds:.0f} s in all) on "
        f"{machine['os']}, {machine['cpus']} CPUs, {machine['ram']}, Python "
        f"{machine['python']}, torch {machine['torch']}, {machine['gpu']}. "
        f"{passed} of {len(records)} recorded tests passed"
        + (
            f"; {len(lost)} recorded a loss (see the table)." if lost else "; none recorded a loss."
        ),
        "",
        "## How to run",
        "",
        "The short run is part of the test suite (CI runs it). To run it alone and "
        "regenerate this page:",
        "",
        "```console",
        "$ python scripts/reliability_report.py",
        "```",
        "",
        "The long run (1,000-cycle soaks and the long versions of the other tests) is "
        "run by hand; it takes tens of minutes on a two-core machine:",
        "",
        "```console",
        "$ python scripts/reliability_report.py --long",
        "```",
        "",
        "Other arguments go to pytest (`-k soak`, `-x`). `--records FILE` keeps the "
        "records in FILE, where those of tests a run does not repeat stay from earlier "
        "runs: on a busy machine the long run can be done in parts (`-k soak`, then "
        '`-k "not soak"`) and the page still covers every test. Without the script: '
        "`VRAMKIT_STRESS=long python -m pytest tests/stress`.",
        "",
        "## Results",
        "",
        "Areas: "
        + (", ".join(f"{area} ({count})" for area, count in areas.items()) or "none")
        + ". Key figures are the first few each test records; all of them are below.",
        "",
        "| test | area | load | faults injected | bad inputs tried | what was lost "
        "| key figures | seconds | outcome |",
        "|---|---|---|---|---|---|---|---:|---|",
    ]
    for r in records:
        cells = [
            f"`{r['test']}`",
            _text(r.get("area", "")),
            _text(r.get("load", "")),
            _text(r.get("faults", "none")),
            _text(r.get("bad_inputs", "none")),
            _text(r.get("lost", "nothing")),
            _text(_key_figures(r.get("figures") or {})),
            f"{float(r.get('seconds', 0.0)):.1f}",
            _outcome(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not records:
        lines.append("| (no test recorded anything) | | | | | | | | |")
    lines += ["", "## Figures", ""]
    for r in records:
        figures: Mapping[str, Any] = r.get("figures") or {}
        lines += [
            f"### `{r['test']}`",
            "",
            f"{_text(r.get('area', '')).capitalize() or 'Test'}, {r.get('mode', mode)} mode, "
            f"{float(r.get('seconds', 0.0)):.1f} s, {_outcome(r)}. Load: {_text(r.get('load'))}",
            "",
        ]
        if figures:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {_text(k)} | {_text(_value(v))} |" for k, v in figures.items()]
        else:
            lines.append("No figures recorded.")
        if r.get("note"):
            lines += ["", _text(r["note"])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
