"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vramkit import ManagedModel, ModelPool

LONG = os.environ.get("VRAMKIT_STRESS", "").lower() == "long"


def scale(short: int, long: int) -> int:
    """How many iterations: ``short`` in CI, ``long`` with ``VRAMKIT_STRESS=long``."""
    return long if LONG else short


def run_python(code: str, *, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter (for RSS figures and import checks); return stdout."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def reserved_bytes(pool: ModelPool) -> int:
    """Bytes a pool holds for loads and wakes in progress, from its public status.

    What it charges beyond what its models hold on the device: 0 whenever no
    load is under way, and so after every failed one.
    """
    status = pool.status()
    return status.charged_bytes - sum(m.device_bytes for m in status.models)


def hold_lease(
    model: ManagedModel[Any], *, thread_name: str = "lease-holder"
) -> tuple[threading.Event, threading.Thread]:
    """Hold a lease on ``model`` in a thread named ``thread_name`` until the event is set."""
    taken, release = threading.Event(), threading.Event()

    def worker() -> None:
        with model.use():
            taken.set()
            release.wait(60)

    thread = threading.Thread(target=worker, name=thread_name)
    thread.start()
    assert taken.wait(60)
    return release, thread
