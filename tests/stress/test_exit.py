"""Process exit: with models loaded, pool threads running and cache files on disk.

Each case runs a script in a fresh interpreter that sets everything up at once:

- a ``ModelPool`` on cpu whose model ``a`` (``keep_alive=60``) was used once, so
  the pool's keep-alive thread is waiting, and whose model ``b`` was loaded by
  ``prefetch`` (the prefetch executor's worker thread is alive);
- a model outside any pool with ``keep_alive=60`` (the process-wide keep-alive
  thread);
- a model offloaded to the ``disk`` tier (a safetensors file in the cache
  directory);
- NVML asked for a reading (initialised where a driver exists; where it does
  not, the same calls answer ``None`` and must not fail).

Then the process ends one way or another (script end, SIGTERM with and without
a handler, a daemon thread holding a lease, a prefetch in flight). It must end
promptly, with the expected status, without a traceback or an "Exception
ignored" line on stderr, and (where the interpreter runs its exit handlers)
without leaving the cache file behind.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Record

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and exit statuses")

ROOT = Path(__file__).resolve().parents[2]
# A process still there this long after the script's end (or the signal) hung.
# How fast it exits is a figure for the reliability page, not an assertion: a
# loaded machine slows a clean exit down without making it wrong.
HANG_LIMIT = 300.0
SETUP_LIMIT = 180.0

SETUP = """
import os, signal, sys, threading, time

import torch

import vramkit
from vramkit import ManagedModel, ModelPool
from vramkit.devices import _nvml
from vramkit.testing.models import TinyMLP


def mlp():
    return TinyMLP(256)


def mark(text):
    print(text, flush=True)


x = torch.ones(1, 256)
_nvml.memory(0)  # initialises NVML where a driver exists; answers None here otherwise
vramkit.snapshot()
mark(f"NVML {_nvml.unavailable_reason() or 'initialised'}")

pool = ModelPool("cpu", budget="2GiB", headroom=0, name="exit")
# A size hint spares the pool its "size unknown: evict every idle model" rule.
pool.register("a", mlp, keep_alive=60, size_hint="2MiB")
pool.register("b", mlp, size_hint="2MiB")
with pool.use("a") as model:
    model(x)
del model
assert pool.prefetch("b").result(timeout=60)

alone = ManagedModel.from_torch(mlp, device="cpu", keep_alive=60, name="alone")
with alone.use() as model:
    model(x)
del model

disk = ManagedModel.from_torch(mlp, device="cpu", name="disk")
disk.load()
cache_file = disk.offload("disk").path
assert cache_file is not None and os.path.exists(cache_file)
mark(f"CACHE {cache_file}")
mark("THREADS " + ",".join(sorted(t.name for t in threading.enumerate())))
"""

HOLD_LEASE = """
held = threading.Event()


def hold(mm):
    with mm.use():
        held.set()
        time.sleep(3600)


threading.Thread(target=hold, args=(pool["a"],), daemon=True, name="holder").start()
assert held.wait(60)
"""

FUNASR = """
from vramkit.testing.models import synthetic_audio

asr = ManagedModel.from_funasr(
    {asr!r}, vad_model={vad!r}, punc_model={punc!r}, device="cpu", name="asr",
    disable_pbar=True,
)
pool.add(asr)
with pool.use("asr") as am:
    text = am.generate(input=synthetic_audio(1.0), disable_pbar=True)[0]["text"]
del am
mark(f"FUNASR {{len(text)}} chars")
"""

END = 'mark(f"END {time.time()}")\n'
READY = 'mark(f"READY {time.time()}")\n'
BAD_STDERR = ("Traceback", "Exception ignored", "Fatal Python error")


class Child:
    """A script running in a fresh interpreter, with stdout and stderr in files."""

    def __init__(self, script: str, tmp_path: Path) -> None:
        self.cache = tmp_path / "cache"
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        env = dict(os.environ, VRAMKIT_CACHE_DIR=str(self.cache), PYTHONWARNINGS="ignore")
        env.pop("VRAMKIT_RELIABILITY_OUT", None)
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(script)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def lines(self, tag: str) -> list[str]:
        text = self.stdout_path.read_text(encoding="utf-8", errors="replace")
        return [line[len(tag) + 1 :] for line in text.splitlines() if line.startswith(tag + " ")]

    def wait_for(self, tag: str, timeout: float = SETUP_LIMIT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(tag)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                pytest.fail(f"child ended ({self.proc.returncode}) before {tag}:\n{self.stderr}")
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"child did not reach {tag} in {timeout} s:\n{self.stderr}")

    def wait_exit(self, since: float) -> tuple[int, float]:
        """Wait (bounded) for the process to end; the seconds it took after ``since``."""
        try:
            code = self.proc.wait(timeout=HANG_LIMIT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process hung at exit (> {HANG_LIMIT:g} s):\n{self.stderr}")
        return code, time.time() - since

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def cache_files(self) -> list[str]:
        """Files left anywhere under the cache folder (vramkit writes in a subfolder)."""
        return sorted(p.name for p in self.cache.rglob("*") if not p.is_dir())


@functools.cache
def bare_exit_seconds(imports: str) -> float:
    """How long a process that only imports ``imports`` takes to end after its last line.

    Measured once per session: interpreter teardown with torch loaded takes a
    second or more on a busy two-core machine, and the figures say so.
    """
    code = f"import {imports}, time; print(time.time(), flush=True)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    ended = time.time()
    return round(ended - float(result.stdout.split()[-1]), 3)


def _setup_figures(child: Child) -> dict[str, Any]:
    threads = child.wait_for("THREADS").split(",")
    for expected in ("vramkit-keepalive-exit", "vramkit-keepalive"):
        assert expected in threads, threads
    assert any(t.startswith("vramkit-prefetch-exit") for t in threads), threads
    child.wait_for("CACHE")  # the child checked that the file exists
    return {
        "threads running": ", ".join(threads),
        "NVML": child.wait_for("NVML"),
    }


def _check_stderr(child: Child) -> None:
    stderr = child.stderr
    for bad in BAD_STDERR:
        assert bad not in stderr, f"{bad!r} on stderr:\n{stderr}"


def _record(record: Record, load: str, figures: dict[str, Any]) -> None:
    record.area = "process exit"
    record.load = load
    record.figures = figures


def _exit_at_script_end(
    tmp_path: Path,
    reliability: Record,
    script: str,
    load: str,
    faults: str = "none",
    imports: str = "torch, vramkit",
    marks: dict[str, str] | None = None,
) -> None:
    child = Child(script + END, tmp_path)
    try:
        figures = _setup_figures(child)
        ended = float(child.wait_for("END"))
        code, seconds = child.wait_exit(ended)
    finally:
        child.kill()
    left = child.cache_files()
    figures = {
        "exit status": code,
        "exit after script end (s)": round(seconds, 3),
        f"bare `import {imports}` process exit (s)": bare_exit_seconds(imports),
        "cache files left": len(left),
        **figures,
    }
    for tag, figure in (marks or {}).items():
        figures[figure] = bool(child.lines(tag))
    _record(reliability, load, figures)
    reliability.faults = faults
    reliability.lost = f"{len(left)} cache files left behind" if left else "nothing"
    assert code == 0, child.stderr
    _check_stderr(child)
    assert left == [], "the disk-tier file outlived the process"


@pytest.mark.slow
def test_clean_exit_with_everything_live(tmp_path: Path, reliability: Record) -> None:
    _exit_at_script_end(
        tmp_path,
        reliability,
        SETUP,
        "script ends with 3 torch models loaded (one in a pool with keep_alive=60, one "
        "prefetched, one outside the pool with keep_alive=60), one offloaded to disk, NVML asked",
    )


@pytest.mark.slow
def test_clean_exit_with_a_funasr_pipeline_loaded(
    funasr_pipeline: Any, tmp_path: Path, reliability: Record
) -> None:
    dirs = {k: str(getattr(funasr_pipeline, k)) for k in ("asr", "vad", "punc")}
    _exit_at_script_end(
        tmp_path,
        reliability,
        SETUP + FUNASR.format(**dirs),
        "as the clean exit, plus a FunASR VAD + ASR + punctuation pipeline in the pool, "
        "loaded and used once",
        imports="torch, vramkit, funasr",
    )


def test_exit_while_a_daemon_thread_holds_a_lease(tmp_path: Path, reliability: Record) -> None:
    _exit_at_script_end(
        tmp_path,
        reliability,
        SETUP + HOLD_LEASE,
        "as the clean exit, and a daemon thread sleeping inside `with pool['a'].use()` when "
        "the main thread ends",
        faults="a lease that is never returned",
    )


def test_exit_while_a_prefetch_is_loading(tmp_path: Path, reliability: Record) -> None:
    slow = """
def slow():
    time.sleep(2.0)
    mark(f"LOADED {time.time()}")
    return mlp()


pool.register("slow", slow, size_hint="2MiB")
pool.prefetch("slow")
time.sleep(0.2)  # the worker is inside the loader now
"""
    _exit_at_script_end(
        tmp_path,
        reliability,
        SETUP + slow,
        "as the clean exit, and the main thread ends 0.2 s into a 2 s prefetch load",
        faults="exit during a background load",
        # Python's executor exit hook lets the load in flight finish (a load
        # cannot be interrupted safely): exit waits for at most the rest of it.
        marks={"LOADED": "in-flight load finished before exit"},
    )


def _sigterm(tmp_path: Path, script: str) -> tuple[Child, dict[str, Any], int, float]:
    child = Child(script, tmp_path)
    try:
        figures = _setup_figures(child)
        child.wait_for("READY")
        time.sleep(0.3)  # the main thread is blocked in unload(wait=True) by now
        sent = time.time()
        child.proc.send_signal(signal.SIGTERM)
        code, seconds = child.wait_exit(sent)
    finally:
        child.kill()
    return child, figures, code, seconds


# The main thread blocks in unload(wait=True) on a model whose lease a daemon
# thread never returns: the hardest place to be when the signal arrives.
BLOCKED = HOLD_LEASE + READY + 'pool["a"].unload(wait=True)\nmark("UNREACHED")\n'


def test_sigterm_without_a_handler(tmp_path: Path, reliability: Record) -> None:
    child, figures, code, seconds = _sigterm(tmp_path, SETUP + BLOCKED)
    left = child.cache_files()
    _record(
        reliability,
        "as the clean exit; the main thread blocked in unload(wait=True) behind a lease a "
        "daemon thread never returns; no signal handler installed",
        {
            "exit status": code,
            "exit after SIGTERM (s)": round(seconds, 3),
            "cache files left": len(left),
            **figures,
        },
    )
    reliability.faults = "SIGTERM (default action)"
    # The default action ends the process without running exit handlers: this is
    # the documented reason to install a handler (next test).
    reliability.lost = (
        f"{len(left)} disk-tier file left in the cache directory until the next process "
        "writes there (SIGTERM's default action skips exit handlers)"
        if left
        else "nothing"
    )
    assert code == -signal.SIGTERM, child.stderr
    _check_stderr(child)
    assert not child.lines("UNREACHED")


def test_sigterm_with_a_handler_that_exits(tmp_path: Path, reliability: Record) -> None:
    handler = (
        "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))\n"
        "mark('HANDLER installed')\n"
    )
    child, figures, code, seconds = _sigterm(tmp_path, SETUP + handler + BLOCKED)
    left = child.cache_files()
    _record(
        reliability,
        "as the SIGTERM case, with `signal.signal(SIGTERM, lambda *_: sys.exit(0))` installed",
        {
            "exit status": code,
            "exit after SIGTERM (s)": round(seconds, 3),
            "cache files left": len(left),
            **figures,
        },
    )
    reliability.faults = "SIGTERM, handled by sys.exit(0)"
    reliability.lost = f"{len(left)} cache files left behind" if left else "nothing"
    assert code == 0, child.stderr
    _check_stderr(child)
    assert left == [], "exit handlers ran but the disk-tier file stayed"
    assert not child.lines("UNREACHED")
