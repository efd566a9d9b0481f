"""Stale references are loud everywhere, and a reference kept across an offload works after wake.

After ``unload()``, and while a model is offloaded, every use of any part of
it (the top module, a submodule, a bound ``forward``, a tensor taken from it,
a name bound by ``with pool.use(...) as llm:``) raises ``ModelStateError``
naming the model and what to do. Waking puts the real weights back into the
same objects.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ecosystem import _models
from vramkit import ModelPool
from vramkit.errors import ModelStateError
from vramkit.model import ManagedModel

KEPT: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    KEPT.clear()
    gc.collect()


def _gpt2(hf_paths: dict[str, Path], offload_dir: Path, name: str = "llm") -> ManagedModel[Any]:
    return ManagedModel.from_torch(
        _models.hf_loader(hf_paths["gpt2"], "gpt2"),
        device="cpu",
        name=name,
        offload_dir=offload_dir,
    )


def _keep_parts(mm: ManagedModel[Any]) -> torch.Tensor:
    with mm.use() as model:
        KEPT["forward"] = model.forward
        KEPT["block"] = model.transformer.h[0]
        KEPT["weight"] = model.lm_head.weight
        KEPT["model"] = model
        return _models.hf_run("gpt2", model)


def _uses() -> dict[str, Any]:
    inputs = _models.hf_inputs("gpt2")
    return {
        "model": lambda: KEPT["model"](**inputs),
        "forward": lambda: KEPT["forward"](**inputs),
        "block": lambda: KEPT["block"](torch.ones(1, 4, 32)),
        "weight": lambda: KEPT["weight"] @ torch.ones(32),
    }


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_every_part_is_loud_while_offloaded_and_works_again_after_wake(
    hf_paths: dict[str, Path], offload_dir: Path, tier: str
) -> None:
    mm = _gpt2(hf_paths, offload_dir)
    want = _keep_parts(mm)
    mm.offload(tier)
    for part, use in _uses().items():
        with pytest.raises(ModelStateError, match=r"llm is offloaded .*`llm\.use\(\)`"):
            use()
        assert part  # each part was tried
    mm.wake()
    _works_again(mm, want)
    KEPT.clear()
    assert mm.unload().ok


def _works_again(mm: ManagedModel[Any], want: torch.Tensor) -> None:
    """The parts kept across the offload run again, and are the model's own objects."""
    with torch.inference_mode():
        assert torch.equal(KEPT["forward"](**_models.hf_inputs("gpt2")).logits, want)
        out = KEPT["block"](torch.ones(1, 4, 32))
    assert (out[0] if isinstance(out, tuple) else out).shape == (1, 4, 32)
    with mm.use() as model:  # the same objects: nothing was replaced
        assert model is KEPT["model"]
        assert model.lm_head.weight is KEPT["weight"]


def test_every_part_is_loud_after_unload(hf_paths: dict[str, Path], offload_dir: Path) -> None:
    mm = _gpt2(hf_paths, offload_dir)
    _keep_parts(mm)
    report = mm.unload()
    assert not report.died
    for use in _uses().values():
        with pytest.raises(ModelStateError, match=r"llm was unloaded .*`llm\.use\(\)`"):
            use()


def test_a_name_bound_by_pool_use_is_loud_after_eviction(
    hf_paths: dict[str, Path], offload_dir: Path
) -> None:
    with ModelPool("cpu", budget="1GiB", evict_to="disk", start_threads=False) as pool:
        pool.add(_gpt2(hf_paths, offload_dir))
        with pool.use("llm") as llm:
            want = _models.hf_run("gpt2", llm)
        assert pool.evict_idle() == ["llm"]
        with pytest.raises(ModelStateError, match=r"llm is offloaded .*pool\.use\('llm'\)"):
            llm(**_models.hf_inputs("gpt2"))
        with pool.use("llm") as again:
            assert again is llm
            assert torch.equal(_models.hf_run("gpt2", llm), want)
        del llm, again


def test_a_kept_funasr_submodule_is_loud(funasr_pipeline: Any, offload_dir: Path) -> None:
    from vramkit.testing.models import synthetic_audio

    mm = ManagedModel.from_funasr(
        **funasr_pipeline.automodel_kwargs(),
        device="cpu",
        name="asr",
        manager_options={"offload_dir": offload_dir},
    )
    with mm.use() as am:
        KEPT["vad"] = am.vad_model
        KEPT["am"] = am
        expected = am.generate(input=synthetic_audio(1.0))[0]["text"]
    del am
    mm.offload("disk")
    with pytest.raises(ModelStateError, match=r"asr is offloaded"):
        KEPT["am"].generate(input=synthetic_audio(1.0))
    mm.wake()
    assert KEPT["am"].generate(input=synthetic_audio(1.0))[0]["text"] == expected
    report = mm.unload()
    assert not report.died
    assert any("KEPT['vad']" in str(c) or "KEPT['am']" in str(c) for c in report.holders)
    with pytest.raises(ModelStateError, match=r"asr was unloaded"):
        KEPT["vad"](torch.ones(1, 10, 400))


def test_a_kept_onnx_session_is_loud_after_offload_and_unload(
    exported_onnx: Path, offload_dir: Path
) -> None:
    mm = ManagedModel.from_onnx(exported_onnx, device="cpu", name="mlp", offload_dir=offload_dir)
    with mm.use() as session:
        KEPT["session"] = session
        want = _models.onnx_run(session)
    del session
    mm.offload("cpu")  # a session cannot be offloaded live: it is dropped and rebuilt
    with pytest.raises(ModelStateError, match=r"mlp"):
        _models.onnx_run(KEPT["session"])
    with mm.use() as fresh:
        assert _models.same(_models.onnx_run(fresh), want)
    del fresh
    mm.unload()
    with pytest.raises(ModelStateError, match=r"mlp"):
        _models.onnx_run(KEPT["session"])
