"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
