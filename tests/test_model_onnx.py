"""ManagedModel around real ONNX Runtime sessions."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vramkit.adapters import OnnxRuntimeAdapter, adapter_for
from vramkit.errors import InvalidArgumentError, ModelStateError
from vramkit.model import ManagedModel

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

bindings: list[Any] = []


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vramkit.testing.models import build_onnx_matmul_chain

    return build_onnx_matmul_chain(tmp_path_factory.mktemp("onnx") / "chain.onnx", mib=16)


def _run(mm: ManagedModel[Any]) -> tuple[Any, weakref.ref[Any]]:
    with mm.use() as session:
        assert isinstance(adapter_for(session), OnnxRuntimeAdapter)
        n = session.get_inputs()[0].shape[1]
        (out,) = session.run(None, {"x": np.ones((2, n), dtype=np.float32)})
        return out, weakref.ref(session._sess)


def test_session_runs_under_a_lease_and_unloads(mlp_path: Path) -> None:
    mm = ManagedModel.from_onnx(mlp_path)
    assert mm.device.kind == "cpu"
    out, native = _run(mm)
    assert out.shape == (2, out.shape[1])
    assert mm.size_bytes is not None
    assert mm.size_bytes > 8 * 1024**2  # measured as the load's memory difference
    report = mm.unload()
    assert report.died, str(report)
    assert native() is None


def test_a_load_that_reuses_memory_is_sized_at_least_by_its_weights(
    mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The size is the memory the load added; here the process gives back a
    # larger block just before the session is built (as when a load reuses
    # pages another model left), so the difference alone would say nothing.
    import onnxruntime as ort

    spare = [bytearray(48 * 1024**2)]
    spare[0][::4096] = b"\x01" * len(spare[0][::4096])  # resident
    real = ort.InferenceSession

    def session_after_giving_back(*args: Any, **kwargs: Any) -> Any:
        spare.clear()
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session_after_giving_back)
    mm = ManagedModel.from_onnx(mlp_path)
    with mm.use():
        pass
    assert not spare
    assert mm.size_bytes is not None and mm.size_bytes >= mlp_path.stat().st_size
    assert mm.unload().died


def test_an_io_binding_keeps_the_native_session_and_is_named(mlp_path: Path) -> None:
    mm = ManagedModel.from_onnx(mlp_path, name="bound")

    def bind() -> None:
        with mm.use() as session:
            bindings.append(session.io_binding())

    bind()
    report = mm.unload()
    try:
        assert not report.died
        assert any(
            "test_model_onnx.bindings[0] -> IOBinding._session" in str(c) for c in report.holders
        ), [str(c) for c in report.holders]
        with pytest.raises(ModelStateError, match="bound was unloaded by vramkit"):
            bindings[0].bind_output("y")
    finally:
        bindings.clear()
        gc.collect()


def test_arena_option_and_providers(mlp_path: Path) -> None:
    mm = ManagedModel.from_onnx(mlp_path, arena=False, providers=["CPUExecutionProvider"])
    with mm.use() as session:
        assert session.get_providers() == ["CPUExecutionProvider"]
    del session
    assert mm.config["arena"] is False
    assert mm.unload().died


def test_bad_paths_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist or is not a file"):
        ManagedModel.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(InvalidArgumentError, match="does not exist or is not a file"):
        ManagedModel.from_onnx(tmp_path)
    with pytest.raises(InvalidArgumentError, match="path must be"):
        ManagedModel.from_onnx(123)  # type: ignore[arg-type]
