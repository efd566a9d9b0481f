"""ManagedModel around real FunASR AutoModels (tiny, built offline): VAD + ASR + punctuation."""

from __future__ import annotations

import gc
import logging
import random
import weakref
from typing import Any

import numpy as np
import pytest
import torch

from vramkit.adapters import FunasrAdapter, adapter_for
from vramkit.errors import InvalidArgumentError, ModelStateError
from vramkit.model import ManagedModel, ModelState
from vramkit.testing.models import synthetic_audio

held: list[Any] = []


@pytest.fixture
def pipeline(funasr_pipeline: Any) -> ManagedModel[Any]:
    return ManagedModel.from_funasr(
        **funasr_pipeline.automodel_kwargs(),
        device="cpu",
        name="asr",
        batch_size_s=60,
        hotword="魔搭",
    )


def test_vad_asr_punc_generate_under_a_lease(pipeline: ManagedModel[Any]) -> None:
    with pipeline.use() as am:
        result = am.generate(input=synthetic_audio(1.0))
    assert isinstance(result, list)
    assert result
    assert isinstance(result[0]["text"], str)
    assert result[0]["text"]
    assert pipeline.state is ModelState.READY


def test_adapter_finds_every_network_and_frontend(pipeline: ManagedModel[Any]) -> None:
    with pipeline.use() as am:
        adapter = adapter_for(am)
        assert isinstance(adapter, FunasrAdapter)
        assert set(adapter.submodels(am)) == {"model", "vad_model", "punc_model"}
        tensors = adapter.tensors(am)
        params = sum(
            p.numel() * p.element_size()
            for name in ("model", "vad_model", "punc_model")
            for p in getattr(am, name).parameters()
        )
        cmvn = [t for t in tensors if t.dim() == 2 and t.shape[0] == 2]
    assert cmvn, "frontend CMVN statistics are plain tensors and must be counted"
    assert pipeline.size_bytes is not None
    assert pipeline.size_bytes >= params


def test_unload_frees_every_submodel_and_frontend(pipeline: ManagedModel[Any]) -> None:
    with pipeline.use() as am:
        am.generate(input=synthetic_audio(1.0))  # swaps in _base_kwargs_map's copies
        refs = [weakref.ref(am)] + [weakref.ref(t) for t in adapter_for(am).tensors(am)]
    del am
    report = pipeline.unload()
    assert report.died, str(report)
    assert all(r() is None for r in refs)


def _settings(mm: ManagedModel[Any]) -> tuple[Any, Any]:
    with mm.use() as am:
        return am.kwargs.get("batch_size_s"), am.kwargs.get("hotword")


def test_settings_survive_reload(pipeline: ManagedModel[Any]) -> None:
    first = _settings(pipeline)
    assert pipeline.unload().died
    second = _settings(pipeline)
    assert first == second == (60, "魔搭")
    assert pipeline.config["batch_size_s"] == 60
    assert pipeline.stats.loads == 2


def test_funasr_global_side_effects_are_undone(pipeline: ManagedModel[Any]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    expected_torch = torch.rand(3)
    torch.manual_seed(1234)
    random.seed(7)
    expected_random = random.random()
    random.seed(7)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        mm = ManagedModel.from_funasr(pipeline.config["model"], device="cpu")
        mm.load()  # FunASR seeds every RNG, sets the thread count, configures logging
        assert torch.equal(torch.rand(3), expected_torch)
        assert random.random() == expected_random
        assert root.handlers == handlers
        assert root.level == level
        assert torch.get_num_threads() == 1
        with mm.use() as am:
            am.generate(input=synthetic_audio(0.5))
        assert torch.get_num_threads() == 1  # generate() resets it to ncpu: ours by default
        mm.unload()
    finally:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads() or 1)))


def test_a_held_automodel_is_named_and_neutralised(pipeline: ManagedModel[Any]) -> None:
    def keep() -> None:
        with pipeline.use() as am:
            held.append(am)

    keep()
    report = pipeline.unload()
    try:
        assert not report.died
        assert any("test_model_funasr.held[0]" in str(c) for c in report.holders)
        assert report.neutralised_bytes > 0
        with pytest.raises(ModelStateError, match="asr was unloaded by vramkit"):
            held[0].generate(input=synthetic_audio(0.5))
    finally:
        held.clear()
        gc.collect()


def test_bad_paths_fail_at_construction(tmp_path: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        ManagedModel.from_funasr(tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match=r"has no config\.yaml"):
        ManagedModel.from_funasr(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"punc_model='\./nope' does not exist"):
        ManagedModel.from_funasr("paraformer-zh", punc_model="./nope")
    with pytest.raises(InvalidArgumentError, match="punc_model must be"):
        ManagedModel.from_funasr("paraformer-zh", punc_model=3)


def test_sensevoice_language_setting_is_kept(funasr_module: Any, tmp_path: Any) -> None:
    from vramkit.testing.models import build_funasr_sensevoice

    directory = build_funasr_sensevoice(tmp_path / "sv")
    mm = ManagedModel.from_funasr(directory, device="cpu", language="en", use_itn=True)
    with mm.use() as am:
        text = am.generate(input=synthetic_audio(0.5), language="en")[0]["text"]
    del am
    assert isinstance(text, str)
    assert mm.config["language"] == "en"
    assert mm.unload().died


def test_audio_input_shapes() -> None:
    audio = synthetic_audio(0.25)
    assert audio.dtype == np.float32
