"""The cross-process view: published records, `vramkit ps`, `free` and `status --watch`."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import vramkit._ps
from vramkit import ManagedModel, ModelPool, events
from vramkit._runtime import (
    REFRESH_SECONDS,
    ProcessRecord,
    Publisher,
    read_records,
    runtime_dir,
)
from vramkit.cli import main
from vramkit.testing.models import tiny_mlp

SERVICE = """
import json, os, sys
import vramkit
from vramkit.testing.models import tiny_mlp

pool = vramkit.ModelPool("cpu", budget="256MiB", headroom=0, evict_to="unload", name="svc")
# Names no other test uses: this test process publishes its own models too.
pool.register("svc-asr", lambda: tiny_mlp(4), size_hint="4MiB")
pool.register("svc-llm", lambda: tiny_mlp(8), size_hint="8MiB", keep_alive=600)
for name in ("svc-asr", "svc-llm"):
    pool[name].load()
url = None
if sys.argv[1] == "admin":
    from vramkit.integrations.http import start_admin_server
    url = start_admin_server(pool).url
print(json.dumps({"pid": os.getpid(), "url": url}), flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setenv("VRAMKIT_RUNTIME_DIR", str(directory))
    monkeypatch.delenv("VRAMKIT_PUBLISH", raising=False)
    return directory


def start_service(mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A separate process with a pool of two loaded tiny models; returns it and its first line."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVICE), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=180):
            process.kill()
            pytest.fail("the service did not start within 180 s")
    line = process.stdout.readline()
    assert line, f"the service exited with {process.wait(30)}"
    return process, json.loads(line)


def vramkit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramkit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stop(process: subprocess.Popen[str]) -> None:
    """Close the service's stdin (it exits normally), wait for it, close its pipes."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.close()
    process.wait(60)
    process.stdout.close()


# ---------------------------------------------------------------------- across processes


@pytest.mark.slow
def test_ps_in_another_process_lists_a_running_service_and_not_a_killed_one(
    run_dir: Path,
) -> None:
    service, info = start_service("plain")
    killed, killed_info = start_service("plain")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(60)
        assert (run_dir / f"{killed_info['pid']}.json").exists()  # never ran its exit handler

        result = vramkit_cli("ps", "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        pids = [p["pid"] for p in data["processes"]]
        assert info["pid"] in pids
        assert killed_info["pid"] not in pids
        assert not (run_dir / f"{killed_info['pid']}.json").exists()  # swept
        (process,) = [p for p in data["processes"] if p["pid"] == info["pid"]]
        models = {m["name"]: m for m in process["models"]}
        assert {m["state"] for m in models.values()} == {"READY"}
        asr = models["svc-asr"]
        assert asr["pool"] == "svc" and asr["leases"] == 0
        assert asr["device_bytes"] == asr["size_bytes"] > 3 * 2**20
        assert models["svc-llm"]["keep_alive"] == 600
        assert process["admin_url"] is None
        assert "-c" in process["command"]

        text = vramkit_cli("ps")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split()[:4] == ["PID", "PROCESS", "MODEL", "POOL"]
        rows = [line.split() for line in lines[1:] if line.startswith(str(info["pid"]))]
        assert [row[row.index("svc") - 1] for row in rows] == ["svc-asr", "svc-llm"]
        assert all("READY" in row for row in rows)
        assert str(killed_info["pid"]) not in text.stdout

        free = vramkit_cli("free", str(info["pid"]))
        assert free.returncode == 2
        assert "serves no admin API" in free.stderr
    finally:
        stop(service)
        stop(killed)
    assert not (run_dir / f"{info['pid']}.json").exists()  # removed at exit


@pytest.mark.slow
def test_free_asks_the_service_through_its_admin_api(run_dir: Path) -> None:
    service, info = start_service("admin")
    try:
        (record,) = [r for r in read_records() if r.pid == info["pid"]]
        assert record.admin_url == info["url"]
        unloaded = vramkit_cli("free", "svc-asr")
        assert unloaded.returncode == 0, unloaded.stderr
        assert unloaded.stdout.startswith(f"{info['pid']}: ok: unloaded svc-asr: cpu ")
        states = {m["name"]: m["state"] for m in _record(info["pid"]).models}
        assert states == {"svc-asr": "UNLOADED", "svc-llm": "READY"}

        freed = vramkit_cli("free", str(info["pid"]))
        assert freed.returncode == 0, freed.stderr
        assert "freed 1 idle model (svc-llm)" in freed.stdout
        assert {m["state"] for m in _record(info["pid"]).models} == {"UNLOADED"}

        missing = vramkit_cli("free", "nope")
        assert missing.returncode == 2 and "no process has a model named 'nope'" in missing.stderr
    finally:
        stop(service)


def _record(pid: int) -> ProcessRecord:
    (record,) = [r for r in read_records() if r.pid == pid]
    return record


# ---------------------------------------------------------------------- publishing in this process


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


@pytest.fixture
def publisher(run_dir: Path) -> Iterator[tuple[Publisher, list[int]]]:
    calls: list[int] = []

    def describe() -> dict[str, Any]:
        calls.append(1)
        return {"models": [{"name": "m", "state": "READY", "idle_seconds": 1.0}], "pools": []}

    made = Publisher(describe, clock=CLOCK, start=False)
    yield made, calls
    made.close()


def test_a_transition_writes_the_record_a_lease_does_not(
    publisher: tuple[Publisher, list[int]], run_dir: Path
) -> None:
    made, calls = publisher
    unsubscribe = events.subscribe(made)
    try:
        model = ManagedModel(lambda: tiny_mlp(0.5), name="published", device="cpu")
        with model.use() as live:
            live(torch.ones(1, live.dim))
        assert len(calls) == 1  # the load
        for _ in range(200):
            with model.use() as live:
                live(torch.ones(1, live.dim))
        assert len(calls) == 1
        model.unload()
        assert len(calls) == 2
    finally:
        unsubscribe()
    path = run_dir / f"{os.getpid()}.json"
    assert made.path == path
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    record = ProcessRecord.from_dict(json.loads(path.read_text()))
    assert record.pid == os.getpid() and record.models[0]["name"] == "m"
    assert [p.name for p in run_dir.iterdir()] == [path.name]  # no temporary left
    made.close()
    assert not path.exists()


def test_the_published_record_of_this_process(run_dir: Path) -> None:
    from vramkit._runtime import publisher as process_publisher

    with ModelPool("cpu", budget="64MiB", headroom=0, name="here") as pool:
        pool.register("a", lambda: tiny_mlp(1), size_hint="1MiB").load()
        record = _record(os.getpid())
        (mine,) = [m for m in record.models if m["pool"] == "here"]
        assert mine == {**pool["a"].to_dict(), "idle_seconds": mine["idle_seconds"]}
        (line,) = [p for p in record.pools if p["name"] == "here"]
        assert line["charged_bytes"] == pool.status().charged_bytes
    made = process_publisher()
    assert made is not None and made.path == run_dir / f"{os.getpid()}.json"


def test_refresh_rewrites_the_record_while_models_live(
    publisher: tuple[Publisher, list[int]],
) -> None:
    made, calls = publisher
    assert made.publish()
    assert made.run_due() == 0  # the refresh is not due yet
    CLOCK.now += REFRESH_SECONDS
    assert made.run_due() == 1
    assert len(calls) == 2
    CLOCK.now += REFRESH_SECONDS
    assert made.run_due() == 1  # and again, while there are models
    assert len(calls) == 3


def test_publishing_can_be_turned_off(
    publisher: tuple[Publisher, list[int]], run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, calls = publisher
    monkeypatch.setenv("VRAMKIT_PUBLISH", "0")
    # A model of an earlier test in this process may have published (its
    # keep-alive expiring on a timer) before the switch above: start clean.
    shutil.rmtree(run_dir, ignore_errors=True)
    assert not made.publish()
    assert calls == [] and not run_dir.exists()


def test_concurrent_publishes_leave_the_newest_record(
    publisher: tuple[Publisher, list[int]], run_dir: Path
) -> None:
    made, _ = publisher

    def publish_often() -> None:
        for _ in range(20):
            made.publish()

    threads = [threading.Thread(target=publish_often) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.name for p in run_dir.iterdir()] == [f"{os.getpid()}.json"]
    json.loads((run_dir / f"{os.getpid()}.json").read_text())


# ---------------------------------------------------------------------- what cannot be trusted


def _record_json(pid: int, started: float) -> str:
    return json.dumps(
        {
            "pid": pid,
            "started": started,
            "updated": 0,
            "command": "x",
            "vramkit": "0",
            "models": [{"name": "planted"}],
        }
    )


def test_dead_reused_foreign_and_broken_records_are_ignored(run_dir: Path) -> None:
    import psutil

    runtime_dir(create=True)
    me = psutil.Process()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(60)
    dead = child.pid
    (run_dir / f"{dead}.json").write_text(_record_json(dead, 1.0))
    (run_dir / f".{dead}.abc.tmp").write_text("half")
    (run_dir / f"{me.pid}.json").write_text(_record_json(me.pid, me.create_time() - 3600))
    (run_dir / "1.json").write_text("{not json")
    foreign = run_dir / "2.json"
    foreign.write_text(_record_json(2, 0))
    os.chown(foreign, 12345, 12345)
    (run_dir / "3.json").symlink_to(run_dir / f"{me.pid}.json")
    (run_dir / "4.json").write_text(_record_json(5, psutil.Process(1).create_time()))  # pid lie

    assert read_records() == []
    left = sorted(p.name for p in run_dir.iterdir())
    # Gone: the dead process's record and temporary file, and the reused PID's record.
    assert left == ["1.json", "2.json", "3.json", "4.json"]


def test_a_runtime_directory_that_is_not_ours_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o777)
    runtime_dir()
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700  # ours: tightened
    os.chown(run_dir, 12345, 12345)
    with pytest.raises(PermissionError, match="belongs to uid 12345"):
        runtime_dir()
    for command in (["ps"], ["free", "1"], ["status", "--watch", "--count", "1"]):
        assert main(command) == 2
        assert "belongs to uid 12345" in capsys.readouterr().err
    made = Publisher(lambda: {"models": [{"name": "m"}]}, start=False)
    assert not made.publish()
    os.chown(run_dir, os.getuid(), os.getgid())
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    run_dir.rmdir()
    run_dir.symlink_to(target)
    with pytest.raises(PermissionError, match="not a directory"):
        runtime_dir()


# ---------------------------------------------------------------------- the commands


def test_ps_with_nothing_published(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["processes"] == [] or all(p["pid"] != os.getpid() for p in data["processes"])
    assert main(["ps"]) == 0
    out = capsys.readouterr().out
    assert "no process publishes vramkit models" in out or "PID" in out


def test_ps_lists_this_process_and_nvml_processes_not_using_vramkit(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramkit.devices import _nvml

    with ModelPool("cpu", budget="64MiB", headroom=0, name="listed") as pool:
        pool.register("here", lambda: tiny_mlp(1), size_hint="1MiB").load()
        monkeypatch.setattr(vramkit._ps, "_nvml_absent", lambda: None)
        monkeypatch.setattr(_nvml, "device_count", lambda: 1)
        monkeypatch.setattr(_nvml, "gpu_processes", lambda i: {os.getpid(): 10, 1: 3 * 2**30})
        assert main(["ps"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if " here " in f" {line} "]
    assert row.startswith(str(os.getpid()))
    assert "READY" in row and "listed" in row
    tail = out.split("GPU processes not using vramkit:", 1)[1].splitlines()
    assert tail[1].split()[:1] == ["PID"]
    assert tail[2].split()[0] == "1" and tail[2].endswith("cuda:0  3.0 GiB")
    assert not any(line.startswith(str(os.getpid())) for line in tail)


def test_status_watch_redraws_devices_and_processes(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--watch", "--interval", "0.01", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("Ctrl-C quits") == 2
    assert out.count("device  used / total") == 2
    assert main(["status", "--watch", "--interval", "0"]) == 2
    assert "--interval must be more than 0" in capsys.readouterr().err


def test_free_of_an_unknown_pid(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["free", "999999999"]) == 2
    assert "no process 999999999 publishes vramkit models" in capsys.readouterr().err


def test_nvml_process_lists_merge_compute_and_graphics_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace as Entry

    from vramkit.devices import _nvml

    stub = Entry(
        NVMLError=RuntimeError,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [
            Entry(pid=10, usedGpuMemory=100),
            Entry(pid=11, usedGpuMemory=None),
        ],
        nvmlDeviceGetGraphicsRunningProcesses=lambda handle: [Entry(pid=10, usedGpuMemory=300)],
    )
    monkeypatch.setattr(_nvml, "_nvml", stub)
    monkeypatch.setattr(_nvml, "_handle", lambda index: object())
    assert _nvml.gpu_processes(0) == {10: 300, 11: None}
    assert _nvml.process_used(0, pid=10) == 300
    assert _nvml.process_used(0, pid=11) is None
