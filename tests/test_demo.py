"""The README's main job: `vramkit demo` runs end to end, offline, within its budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramkit.demo import run_pipeline


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


def test_pipeline_stays_within_a_budget_smaller_than_the_models(
    funasr_module: Any, demo_cache: Path
) -> None:
    result = run_pipeline(items=2, cache_dir=demo_cache, echo=False)
    together = sum(result.sizes.values())
    assert result.budget_bytes < together  # the three do not fit at once
    assert result.peak_charged_bytes <= result.budget_bytes
    assert result.evictions >= 2
    assert result.loads == 3
    assert result.wakes >= 1
    assert len(result.transcripts) == 2
    assert all(result.transcripts)
    assert "within budget" in result.summary()


@pytest.mark.slow
def test_the_cli_prints_transitions_and_writes_a_png(tmp_path: Path, demo_cache: Path) -> None:
    png = tmp_path / "memory.png"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "vramkit",
            "demo",
            "--items",
            "2",
            "--plot",
            str(png),
            "--cache-dir",
            str(demo_cache),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = completed.stdout
    assert "demo: asr -> llm -> tts on cpu" in out
    assert " load     llm" in out
    assert " evict    " in out
    assert "item 2/2: heard" in out
    assert "within budget" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200
    assert image.shape[1] > 400


def test_bad_items_is_a_clean_error(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "vramkit", "demo", "--items", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert "--items must be at least 1" in completed.stderr
