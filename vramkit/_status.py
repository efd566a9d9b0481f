"""What ``vramkit status`` and ``vramkit.status()`` show: devices, then models and pools.

The command line prints it; the facade exports :func:`status`. Everything
heavy (torch, the readings, the model registry) is imported when asked.
"""

from __future__ import annotations

import platform
from typing import Any

from vramkit._version import __version__

__all__ = ["status", "status_data", "status_text"]


_PROCESS_FIELDS = ("process_used_bytes", "process_peak_bytes")


def status_data(device: str | None, *, this_process: bool = True) -> dict[str, Any]:
    """Versions, one reading per device (``to_dict()``), and notes: what ``status`` shows.

    Args:
        device: One device to show, or ``None`` for all.
        this_process: Include the calling process's own figures. The command
            line does not: they would describe the command itself.
    """
    import torch

    from vramkit.devices import available_devices
    from vramkit.memory import snapshot

    snap = snapshot(device)
    accelerators = [d for d in available_devices() if not d.is_host]
    notes: list[str] = []
    if not accelerators:
        cuda = "built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        notes.append(f"no GPU: torch {torch.__version__} {cuda}; host memory only")
    for backend in {d.kind: d.backend for d in accelerators}.values():
        notes.extend(backend.notes())
    devices = [reading.to_dict() for reading in snap.readings]
    if not this_process:
        for reading in devices:
            reading.update(dict.fromkeys(_PROCESS_FIELDS))
        notes.append(
            "no per-process figures: this command is a process of its own; call "
            "vramkit.status() inside an application to see its memory"
        )
    return {
        "vramkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": bool(accelerators),
        "devices": devices,
        "notes": notes,
    }


def status_text(device: str | None = None, *, this_process: bool = True) -> str:
    """The table ``vramkit status`` prints: one row per device, then notes.

    Args:
        device: One device to show, or ``None`` for all.
        this_process: Include a column for the calling process (see :func:`status_data`).

    Returns:
        Multi-line text.
    """
    from vramkit._units import format_bytes, format_part_of

    data = status_data(device, this_process=this_process)
    header = ("device", "used / total", "free", "this process", "allocated", "reserved")
    shown = [i for i in range(len(header)) if this_process or i != 3]
    rows: list[tuple[str, ...]] = [header]
    for d in data["devices"]:
        used, total = d["used_bytes"], d["total_bytes"]
        share = (
            f"{format_part_of(used, total)} ({used / total:.0%})"
            if used is not None and total
            else format_bytes(total)
        )
        rows.append(
            (
                d["device"],
                share,
                format_bytes(d["free_bytes"]),
                format_bytes(d["process_used_bytes"]),
                format_bytes(d["allocated_bytes"]),
                format_bytes(d["reserved_bytes"]),
            )
        )
    rows = [tuple(row[i] for i in shown) for row in rows]  # the command shows no "this process"
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown))]
    lines = [f"vramkit {data['vramkit']} · torch {data['torch']} · Python {data['python']}"]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)


def status(device: str | None = None) -> str:
    """Devices, then every ``ManagedModel`` and ``ModelPool`` alive in this process.

    The ``vramkit status`` command runs in its own process and so shows devices
    only; call this from inside an application to see its models and pools.

    Args:
        device: One device to show, or ``None`` for all.

    Returns:
        Multi-line text.
    """
    from vramkit.model import live_models
    from vramkit.pool import live_pools

    parts = [status_text(device)]
    pools = live_pools()
    pooled = {id(model) for pool in pools for model in pool}
    loose = [m for m in live_models() if id(m) not in pooled]
    if loose:
        parts.append("models:\n" + "\n".join(f"  {m!r}" for m in loose))
    parts.extend(str(pool.status()) for pool in pools)
    return "\n".join(parts)
