"""Session fixtures for the ecosystem suite: each third-party model is built once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ecosystem import _models


@pytest.fixture(scope="session")
def hf_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2, Whisper, Llama and BERT, saved with ``save_pretrained``."""
    pytest.importorskip("transformers")
    return _models.save_hf_models(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def sensevoice_dir(funasr_module: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vramkit.testing.models import build_funasr_sensevoice

    return build_funasr_sensevoice(tmp_path_factory.mktemp("sensevoice") / "SenseVoiceSmall")


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    return _models.export_onnx(tmp_path_factory.mktemp("onnx") / "mlp.onnx")


@pytest.fixture
def offload_dir(tmp_path: Path) -> Path:
    return tmp_path / "offload"


@pytest.fixture
def options(offload_dir: Path) -> dict[str, Any]:
    """ManagedModel options every case shares: a private disk tier directory."""
    return {"offload_dir": offload_dir}
