"""``vramkit ps``, ``vramkit free`` and ``vramkit status --watch``: the cross-process commands.

They read what every process using vramkit publishes (see
:mod:`vramkit._runtime`), so they import neither torch nor the processes'
frameworks and answer in a fraction of a second. ``free`` asks a process to
act through the HTTP admin API it advertises; without one, a process cannot
be asked from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from vramkit._runtime import ProcessRecord, read_records
from vramkit._units import format_bytes
from vramkit.errors import InvalidArgumentError, VramkitError

__all__ = ["add_commands", "add_watch_arguments", "ps_data", "ps_text", "watch_status"]

_TOKEN_ENV = "VRAMKIT_ADMIN_TOKEN"


def add_commands(commands: Any) -> None:
    """Register ``ps`` and ``free`` on the CLI's subcommands."""
    ps = commands.add_parser("ps", help="list the models of every process that uses vramkit")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.set_defaults(handler=_cmd_ps)
    free = commands.add_parser(
        "free", help="ask a running service to free memory (through its admin API)"
    )
    free.add_argument(
        "target", help="a PID (evict its idle models and clean up) or a model name (unload it)"
    )
    free.add_argument("--pid", type=int, default=None, help="the process, where names repeat")
    free.add_argument(
        "--token", default=None, help=f"the admin API's token (default: ${_TOKEN_ENV})"
    )
    free.set_defaults(handler=_cmd_free)


def add_watch_arguments(status: argparse.ArgumentParser) -> None:
    """Add ``--watch``, ``--interval`` and ``--count`` to ``vramkit status``."""
    status.add_argument(
        "--watch", action="store_true", help="refresh devices and every process's models live"
    )
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")


# ---------------------------------------------------------------------- ps


def _records() -> list[ProcessRecord]:
    """The live records, or a clean error when the runtime directory is not this user's."""
    try:
        return read_records()
    except PermissionError as exc:
        raise VramkitError(str(exc)) from exc


def ps_data() -> dict[str, Any]:
    """What ``vramkit ps --json`` prints: processes, GPU processes not using vramkit, notes."""
    now = time.time()
    records = _records()
    processes = []
    for record in records:
        entry = record.to_dict()
        entry.pop("format")
        entry["age_seconds"] = max(now - record.updated, 0.0)
        entry["models"] = [
            {**model, "idle_seconds": record.idle_seconds(model, now)} for model in record.models
        ]
        processes.append(entry)
    # An isolated model's worker is vramkit's too: its caller's record names it.
    workers = {m["worker_pid"] for r in records for m in r.models if m.get("worker_pid")}
    others, notes = _gpu_processes({r.pid for r in records} | workers)
    return {"processes": processes, "gpu_processes": others, "notes": notes}


def _gpu_processes(known: set[int]) -> tuple[list[dict[str, Any]], list[str]]:
    """GPU processes that publish nothing (not using vramkit), from NVML where it answers."""
    reason = _nvml_absent()
    if reason is None:
        from vramkit.devices import _nvml  # imports torch, through vramkit.devices

        count = _nvml.device_count()
        reason = None if count is not None else _nvml.unavailable_reason() or "no answer"
    if reason is not None:
        return [], [f"NVML unavailable ({reason}): GPU processes not using vramkit are not listed"]
    assert count is not None
    found = []
    for index in range(count):
        for pid, used in sorted((_nvml.gpu_processes(index) or {}).items()):
            if pid not in known:
                device = f"cuda:{index}"
                found.append(
                    {"pid": pid, "command": _command(pid), "device": device, "used_bytes": used}
                )
    return found, []


def _nvml_absent() -> str | None:
    """Why NVML cannot answer on this machine, asked without importing torch (``None``: it can).

    ``vramkit ps`` on a machine without a GPU then answers in a fraction of a second.
    """
    try:
        import pynvml
    except ImportError:
        return 'pynvml is not installed (pip install "vramkit[nvml]")'
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"nvmlInit failed: {exc}"
    pynvml.nvmlShutdown()  # NVML counts its users: vramkit's own start later is unaffected
    return None


def _command(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def ps_text() -> str:
    """The table ``vramkit ps`` prints."""
    data = ps_data()
    header = (
        "PID",
        "PROCESS",
        "MODEL",
        "POOL",
        "DEVICE",
        "STATE",
        "ON DEVICE",
        "SIZE",
        "LEASES",
        "IDLE",
        "KEEP-ALIVE",
    )
    rows: list[tuple[str, ...]] = [header]
    admin = []
    for process in data["processes"]:
        command = _short(process["command"], 28)
        if process["admin_url"]:
            admin.append(f"{process['pid']}: admin API at {process['admin_url']}")
        if not process["models"]:
            rows.append((str(process["pid"]), command, "-", *("",) * 8))
        for model in process["models"]:
            state = model["state"] + (f" ({model['tier']})" if model.get("tier") else "")
            rows.append(
                (
                    str(process["pid"]),
                    command,
                    _model_cell(model),
                    model.get("pool") or "-",
                    model["device"],
                    state,
                    format_bytes(model["device_bytes"]),
                    format_bytes(model.get("size_bytes")),
                    str(model["leases"]),
                    _duration(model["idle_seconds"], none="-"),
                    _duration(model.get("keep_alive"), none="never"),
                )
            )
    lines = _table(rows) if len(rows) > 1 else ["no process publishes vramkit models"]
    lines += admin
    if data["gpu_processes"]:
        lines += ["", "GPU processes not using vramkit:"]
        gpu_rows: list[tuple[str, ...]] = [("PID", "PROCESS", "DEVICE", "USED")]
        gpu_rows += [
            (str(p["pid"]), _short(p["command"], 40), p["device"], format_bytes(p["used_bytes"]))
            for p in data["gpu_processes"]
        ]
        lines += _table(gpu_rows)
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)


def _model_cell(model: Any) -> str:
    """The model's name, and the worker process it runs in when isolated."""
    pid = model.get("worker_pid")
    return str(model["name"]) + (f" (worker {pid})" if pid else "")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(seconds: float | None, *, none: str) -> str:
    if seconds is None:
        return none
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _cmd_ps(args: argparse.Namespace) -> int:
    print(json.dumps(ps_data(), indent=2) if args.json else ps_text())
    return 0


# ---------------------------------------------------------------------- free


def _cmd_free(args: argparse.Namespace) -> int:
    target: str = args.target
    token = args.token if args.token is not None else os.environ.get(_TOKEN_ENV)
    records = _records()
    if target.isdigit():
        record = _by_pid(records, int(target))
        path = "/free"
    else:
        record = _by_model(records, target, args.pid)
        path = f"/models/{urllib.parse.quote(target, safe='/')}/unload"
    if record.admin_url is None:
        raise VramkitError(
            f"process {record.pid} ({_short(record.command, 40)}) serves no admin API, so it "
            "cannot be asked from outside; mount vramkit.integrations.http.admin_router in it"
        )
    status, answer = _post(record.admin_url + path, token)
    print(f"{record.pid}: {answer.get('outcome', status)}: {answer.get('message', answer)}")
    return 0 if answer.get("outcome") in ("ok", "noop") else 1


def _by_pid(records: list[ProcessRecord], pid: int) -> ProcessRecord:
    for record in records:
        if record.pid == pid:
            return record
    raise InvalidArgumentError(f"no process {pid} publishes vramkit models (see `vramkit ps`)")


def _by_model(records: list[ProcessRecord], name: str, pid: int | None) -> ProcessRecord:
    pool, _, model = name.rpartition("/")

    def named(line: Any) -> bool:
        return bool(line["name"] == model and (not pool or line.get("pool") == pool))

    holders = [r for r in records if (pid is None or r.pid == pid) and any(map(named, r.models))]
    if not holders:
        raise InvalidArgumentError(f"no process has a model named {name!r} (see `vramkit ps`)")
    if len(holders) > 1:
        pids = ", ".join(str(r.pid) for r in holders)
        raise InvalidArgumentError(f"processes {pids} each have a model {name!r}: add --pid")
    return holders[0]


def _post(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method="POST", data=b"")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return int(response.status), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:  # 409 busy, 404 unknown, 401 no token...
        body = exc.read()
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"message": body.decode(errors="replace")}
        if "detail" in answer and "message" not in answer:
            answer = {"outcome": f"HTTP {exc.code}", "message": answer["detail"]}
        return exc.code, answer
    except OSError as exc:
        raise VramkitError(f"the admin API at {url} did not answer: {exc}") from exc


# ---------------------------------------------------------------------- status --watch


def watch_status(args: argparse.Namespace, devices: Callable[[], str]) -> int:
    """Redraw the devices table and ``vramkit ps`` every ``--interval`` seconds."""
    if args.interval <= 0:
        raise InvalidArgumentError(f"--interval must be more than 0 seconds; got {args.interval}")
    if args.count < 0:
        raise InvalidArgumentError(f"--count must be 0 (never stop) or more; got {args.count}")
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    stop = threading.Event()
    frames = 0
    try:
        while True:
            frame = f"{devices()}\n\n{ps_text()}\n"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}{frame}(every {args.interval:g} s, {stamp}; Ctrl-C quits)\n")
            sys.stdout.flush()
            frames += 1
            if args.count and frames >= args.count:
                return 0
            stop.wait(args.interval)
    except KeyboardInterrupt:
        return 0
