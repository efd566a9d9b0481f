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


@pytest.mark.slow
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
    # One mark per pool event (a model's own offload under an eviction is not
    # a second one), and every stage of every item shaded.
    assert {kind for _, kind, _, _, _ in result.events} <= {"load", "wake", "evict", "expire"}
    assert len(result.stage_spans) == 3 * 2
    assert all(begin <= end for begin, end, _ in result.stage_spans)


@pytest.mark.slow
def test_the_cli_prints_transitions_and_writes_a_png(tmp_path: Path, demo_cache: Path) -> None:
    png = tmp_path / "memory.png"
    completed = _demo("--items", "1", "--plot", str(png), "--cache-dir", str(demo_cache))
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = completed.stdout
    assert "demo: asr -> llm -> tts on cpu" in out
    assert "random weights" in out  # says what the models are
    assert " load     llm" in out
    assert " evict    " in out
    assert "item 1/1: heard" in out
    assert "within budget" in out
    # FunASR's own banners stay out of the demo's output.
    for noise in ("Notice: ffmpeg", "funasr version", "sudo apt install"):
        assert noise not in out
        assert noise not in completed.stderr
    assert "Couldn't find ffmpeg" not in completed.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200
    assert image.shape[1] > 400


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    """``vramkit demo ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "vramkit", "demo", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "block", "message"),
    [
        (["--items", "0"], "", "--items must be at least 1"),
        (["--budget", "lots"], "", "--budget must be"),
        (["--budget", "0B"], "", "--budget must be more than 0 bytes"),
        (["--device", "tpu"], "", "unknown device 'tpu'"),
        (["--plot", "memory.svg"], "", "--plot writes a PNG"),
        (["--plot", "memory.png"], "matplotlib", 'pip install "vramkit[plot]"'),
        ([], "funasr", 'pip install "vramkit[funasr]"'),
    ],
    ids=["items", "budget", "zero-budget", "device", "plot-suffix", "no-matplotlib", "no-funasr"],
)
def test_bad_input_fails_before_any_work(
    args: list[str],
    block: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vramkit.cli import main

    if block:
        monkeypatch.setitem(sys.modules, block, None)  # as if it were not installed
    cache = tmp_path / "cache"
    assert main(["demo", *args, "--cache-dir", str(cache)]) == 2
    assert message in capsys.readouterr().err
    assert not cache.exists()  # nothing was built


def test_a_bad_option_exits_2_from_the_command_line() -> None:
    completed = _demo("--items", "0")
    assert completed.returncode == 2
    assert "vramkit: error: --items must be at least 1" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_python_dash_m_vramkit_demo_is_vramkit_demo() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "vramkit.demo", "--items", "0"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert (completed.returncode, completed.stderr) == (2, _demo("--items", "0").stderr)
