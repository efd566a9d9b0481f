from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vramkit.cli import main, status_text


def test_status_prints_host_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("vramkit ")
    assert any(line.startswith("cpu ") for line in out.splitlines())
    if not torch.cuda.is_available():
        assert "no GPU" in out


def test_status_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"][0]["device"] == "cpu"
    assert data["gpu"] is torch.cuda.is_available()
    assert isinstance(data["devices"][0]["total_bytes"], int)


def test_status_of_a_missing_device_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_status_text_for_one_device() -> None:
    lines = status_text("cpu").splitlines()
    assert lines[1].split()[:2] == ["device", "used"]
    assert lines[2].startswith("cpu")


def test_python_dash_m_and_the_console_script_work() -> None:
    for command in ([sys.executable, "-m", "vramkit", "status"], ["vramkit", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "status" in capsys.readouterr().out


def test_the_command_shows_no_process_column_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    # The command runs in its own process: its "process" figure was the CLI itself.
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("device"))
    assert "process" not in header
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert all(d["process_used_bytes"] is None for d in data["devices"])
    assert any("vramkit.status()" in note for note in data["notes"])


def test_status_inside_an_application_shows_this_process() -> None:
    header = status_text("cpu").splitlines()[1]
    assert "this process" in header
