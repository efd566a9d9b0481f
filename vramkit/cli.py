"""The ``vramkit`` command: ``vramkit status``, ``ps``, ``free`` and ``demo``.

Also reachable as ``python -m vramkit``. The command line only parses and
prints: what ``status`` shows comes from :mod:`vramkit._status`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vramkit._status import status, status_data, status_text

__all__ = ["main", "status", "status_text"]


def _cmd_status(args: argparse.Namespace) -> int:
    # This process is the command itself: its own memory would mean nothing.
    if args.watch:
        from vramkit._ps import watch_status

        return watch_status(args, lambda: status_text(args.device, this_process=False))
    if args.json:
        print(json.dumps(status_data(args.device, this_process=False), indent=2))
    else:
        print(status_text(args.device, this_process=False))
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

    from vramkit._ps import add_commands, add_watch_arguments

    add_watch_arguments(status)
    add_commands(commands)

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
