"""The ``vramkit`` command: ``vramkit status`` and ``vramkit demo``.

Also reachable as ``python -m vramkit``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "status", "status_text"]


def _status_data(device: str | None) -> dict[str, Any]:
    import torch

    import vramkit
    from vramkit.devices import _nvml, available_devices

    snap = vramkit.snapshot(device)
    accelerators = [d for d in available_devices() if d.kind != "cpu"]
    notes: list[str] = []
    if not accelerators:
        cuda = "built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        notes.append(f"no GPU: torch {torch.__version__} {cuda}; host memory only")
    nvml_reason = (
        _nvml.unavailable_reason() if any(d.kind == "cuda" for d in accelerators) else None
    )
    if nvml_reason:
        notes.append(
            f"NVML unavailable ({nvml_reason}): driver numbers from CUDA where a context exists"
        )
    return {
        "vramkit": vramkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": bool(accelerators),
        "devices": [reading.to_dict() for reading in snap.readings],
        "notes": notes,
    }


def status_text(device: str | None = None) -> str:
    """The table ``vramkit status`` prints: one row per device, then notes.

    Args:
        device: One device to show, or ``None`` for all.

    Returns:
        Multi-line text.
    """
    from vramkit._units import format_bytes, format_part_of

    data = _status_data(device)
    header = ("device", "used / total", "free", "process", "allocated", "reserved")
    rows = [header]
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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


def _cmd_status(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(_status_data(args.device), indent=2))
    else:
        print(status_text(args.device))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vramkit.demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vramkit", description="Keep accelerator memory honest.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    status = commands.add_parser("status", help="show memory of every device")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--device", default=None, help="one device, such as cuda:0 or cpu")
    status.set_defaults(handler=_cmd_status)

    from vramkit.demo import add_arguments

    demo = commands.add_parser("demo", help="run the ASR -> LLM -> TTS walkthrough offline")
    add_arguments(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        import vramkit

        print(vramkit.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from vramkit.errors import VramkitError

    try:
        return int(args.handler(args))
    except VramkitError as exc:
        print(f"vramkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
