"""scripts/gpu-check: its table pastes into docs/hardware-validation.md, and its dry run works.

The GPU machine that runs it for real comes rarely; the dry run keeps every
step of the script (the cuda tests' collection, each benchmark's CPU path, the
table) working in between.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_table_has_the_columns_of_the_hardware_validation_page() -> None:
    gpu_check = _gpu_check()
    page = (ROOT / "docs" / "hardware-validation.md").read_text(encoding="utf-8")
    table = gpu_check.render(
        "2026-01-02", "NVIDIA T4 (15 GiB)", "torch 2.13.0 / driver 1", [("suite a|b", "ok")]
    )
    header, rule, row = table.splitlines()
    assert header in page.splitlines()
    assert rule in page.splitlines()
    # A pipe inside a cell would split it: the row keeps exactly five cells.
    assert row.count("|") == header.count("|")
    assert row.startswith("| 2026-01-02 | NVIDIA T4 (15 GiB) |")


def test_without_a_gpu_it_refuses_unless_it_is_a_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "t.md")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--dry-run" in out.stderr
    assert not (tmp_path / "t.md").exists()


@pytest.mark.slow
def test_the_dry_run_runs_every_step_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("funasr")
    table = tmp_path / "table.md"
    # The wrapper runs the `python` on PATH in a dry run: this interpreter.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--out", str(table)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    rows = table.read_text(encoding="utf-8").splitlines()[2:]
    suites = [row.split(" | ")[3] for row in rows]
    assert len(rows) == 5, rows
    assert suites[0].startswith("`-m cuda`")
    assert "skipped" in rows[0]  # collected, and skipped without a GPU
    assert suites[1].startswith("`bench_batch_asr.py`, 24 files")
    assert "planted cache named at batch 1" in rows[1]
    assert suites[2].startswith("cpu-tier wake of 16 MiB")
    assert suites[3] == '`vramkit.snapshot("cpu")`'
    assert suites[4].startswith("`gpu_session` on cpu")
    assert all("failed" not in row for row in rows)
    assert all(row.split(" | ")[1] == "none (CPU only: dry run)" for row in rows)
