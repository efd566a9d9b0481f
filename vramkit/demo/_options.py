"""The demo's command line: its options, their checks before minutes of work, and the run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from vramkit.demo._pipeline import run_pipeline
from vramkit.demo._plot import plot

if TYPE_CHECKING:
    from vramkit.devices import Device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument(
        "--device", default=None, help="where the models run (default: CUDA when present, else cpu)"
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="the pool's budget, e.g. 128MiB (default: 1.2x the largest model)",
    )
    parser.add_argument("--items", type=int, default=6, help="audio clips to process (6)")
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="write a PNG of memory over time"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where the demo models are built (default: user cache)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo from parsed command-line arguments; returns the exit status.

    Raises:
        InvalidArgumentError: ``--items``, ``--budget``, ``--device`` or
            ``--plot`` is malformed (checked before anything is built).
        MissingDependencyError: funasr (or, for ``--plot``, matplotlib) is
            not installed; the message names the extra.
    """
    budget, device = check_arguments(args)
    result = run_pipeline(
        device=device,
        budget=budget,
        items=args.items,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        echo=not args.quiet,
    )
    print(result.summary())
    if args.plot:
        plot(result, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def check_arguments(args: argparse.Namespace) -> tuple[int | None, Device]:
    """Check the demo's options and what they need, before minutes of work.

    Returns:
        The budget in bytes (``None`` for the default) and the resolved device.
    """
    from vramkit._optional import require
    from vramkit._units import parse_bytes
    from vramkit.devices import resolve_device
    from vramkit.errors import InvalidArgumentError, MissingDependencyError

    if args.items < 1:
        raise InvalidArgumentError(f"--items must be at least 1; got {args.items}")
    budget = None if args.budget is None else parse_bytes(args.budget, what="--budget")
    if budget == 0:
        raise InvalidArgumentError("--budget must be more than 0 bytes")
    device = resolve_device(args.device)
    if args.plot:
        target = Path(args.plot)
        if target.suffix.lower() != ".png":
            raise InvalidArgumentError(
                f"--plot writes a PNG: give a path ending in .png; got {target}"
            )
        if target.is_dir():
            raise InvalidArgumentError(f"--plot must be a file path, not a directory: {target}")
        require("matplotlib", "vramkit demo --plot")
    import importlib.util

    for module in ("funasr", "kaldi_native_fbank"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module, "funasr", "vramkit demo")
    return budget, device
