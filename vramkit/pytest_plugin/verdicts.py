"""Verdicts: what a leak or an exceeded limit says, and how it reaches the test's report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from vramkit.session import SessionReport

__all__ = [
    "SECTION_LEAK",
    "SECTION_MODELS",
    "SECTION_PEAK",
    "STATUS",
    "Failure",
    "fold",
    "leak_details",
    "leak_failure",
    "limit_failure",
    "live_worker_pids",
    "worker_failure",
]

SECTION_LEAK: Final = "vramkit leak"
SECTION_PEAK: Final = "vramkit peak"
SECTION_MODELS: Final = "vramkit models"
STATUS: Final = {
    SECTION_LEAK: ("L", "VRAM LEAK"),
    SECTION_MODELS: ("L", "VRAM LEAK"),
    SECTION_PEAK: ("M", "VRAM LIMIT"),
}


@dataclass(frozen=True, slots=True)
class Failure:
    """A verdict against a test: its report section, one line, and the details."""

    section: str  # the report section's title, which also picks the status word
    headline: str
    details: str


def fold(reports: list[pytest.TestReport], failures: list[Failure]) -> None:
    """Turn a passed call report into the failure the plugin found after teardown."""
    if not failures:
        return
    call = next((r for r in reports if r.when == "call"), None)
    if call is None or not call.passed or hasattr(call, "wasxfail"):
        return
    call.outcome = "failed"
    call.longrepr = "\n".join(f.headline for f in failures)
    # Before the captured output, which can run to pages (FunASR logs every load).
    call.sections[:0] = [(f.section, f.details) for f in failures]


def leak_failure(report: SessionReport) -> Failure:
    """The failure a leak (or an unverified verdict made an error) makes: the session's words."""
    return Failure(SECTION_LEAK, report.headline(), leak_details(report))


def leak_details(report: SessionReport) -> str:
    """The tensors that appeared and are still alive (with holders), and the models alive."""
    lines = [
        f"measured {report.checks} time(s) after the test and its function-scoped fixtures "
        f"ended (gc, empty_cache and re-checks in between)"
    ]
    if report.new_tensors:
        lines.append(
            f"tensors on {report.device} that appeared during the test and are still alive, "
            "largest first:"
        )
    lines.extend(report.tensor_lines())
    lines.extend(_model_lines())
    return "\n".join(lines)


def limit_failure(report: SessionReport, limit: int) -> Failure | None:
    """The failure of a peak above ``limit`` bytes, or ``None`` within it (or unmeasured)."""
    from vramkit._units import format_bytes
    from vramkit.memory import layer_bytes, usage_layer

    device = report.device
    start = report.before[device]
    layer = usage_layer(start)  # the layer report.peak_bytes is the peak of
    base = layer_bytes(start, layer)
    if report.peak_bytes is None or base is None:
        return None
    growth = report.peak_bytes - base
    if growth <= limit:
        return None
    headline = (
        f"peak {format_bytes(growth)} above the start on {device} exceeds vram_limit "
        f"{format_bytes(limit)} ({layer} {format_bytes(base)} at the start, "
        f"{format_bytes(report.peak_bytes)} at the peak)"
    )
    how = (
        "allocator's peak_allocated_bytes minus allocated_bytes at the start"
        if layer == "allocated"
        else "peak resident set size since the start (reset then) minus the resident set size then"
    )
    lines = [f"peak growth = {how}", *_model_lines()]
    return Failure(SECTION_PEAK, headline, "\n".join(lines))


def live_worker_pids() -> frozenset[int]:
    """The process ids of isolated models' workers running now (none before isolation is used)."""
    module = sys.modules.get("vramkit.isolation._worker")
    if module is None:  # nothing isolated was ever loaded: no worker can exist
        return frozenset()
    return frozenset(worker.pid for worker in module.live_workers())


def worker_failure(before: frozenset[int]) -> Failure | None:
    """The failure of worker processes a test started and left running, or ``None``.

    Args:
        before: :func:`live_worker_pids` when the test started.
    """
    module = sys.modules.get("vramkit.isolation._worker")
    if module is None:
        return None
    left = [w for w in module.live_workers() if w.pid not in before]
    if not left:
        return None
    names = ", ".join(f"{w.name!r} (pid {w.pid})" for w in left)
    headline = (
        f"worker process(es) of isolated model(s) left running by the test: {names}; "
        "each holds a whole process and its memory"
    )
    lines = [f"  {w.name!r}: worker pid {w.pid}, {w.state.value}, on {w.device}" for w in left]
    lines.append(
        "unload the model (mm.unload()) before the test ends, or let a fixture of a wider "
        "scope own it"
    )
    return Failure(SECTION_LEAK, headline, "\n".join(lines))


def _model_lines() -> list[str]:
    from vramkit._units import format_bytes
    from vramkit.model import live_models

    models = live_models()
    lines = ["managed models alive:" if models else "managed models alive: none"]
    for model in models:
        tier = f" ({model.tier})" if model.tier else ""
        lines.append(
            f"  {model.name!r} {model.state}{tier} on {model.device}, "
            f"{format_bytes(model.size_bytes)}, {model.leases} lease(s)"
        )
    return lines
