"""accelerate-dispatched models, FunASR hub names and loader mistakes, with real libraries."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ecosystem import _models
from vramkit.errors import InvalidArgumentError, MissingModelError, ModelStateError
from vramkit.model import ManagedModel, ModelState

# ---------------------------------------------------------------------- accelerate


def _resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors accelerate left in place (not meta): parameters, buffers, attributes."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if not t.is_meta
    }
    return sum(storages.values())


def _hook_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights accelerate's hooks keep in memory (not the ones on disk)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        dataset = getattr(weights, "dataset", None)
        in_memory = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", {})
        for tensor in in_memory.values():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_a_cpu_offloaded_model_is_not_moved_and_its_hook_weights_count(
    hf_paths: dict[str, Path],
) -> None:
    mm = ManagedModel.from_torch(
        lambda: _models.cpu_offloaded_llama(hf_paths["llama"]), device="cpu", name="hooked"
    )
    with mm.use() as model:
        assert all(p.is_meta for p in model.parameters())  # not moved: hooks own the weights
        hooked = _hook_weight_bytes(model)
        expected = hooked + _resident_bytes(model)  # buffers stay where they were
        want = _models.hf_run("llama", model)
    del model
    assert hooked > 0
    assert mm.size_bytes == expected
    mm.offload("disk")
    with mm.use() as model:
        assert torch.equal(_models.hf_run("llama", model), want)
    del model
    assert mm.unload().ok


def test_a_dispatched_model_counts_what_is_in_memory(
    hf_paths: dict[str, Path], tmp_path: Path
) -> None:
    mm = ManagedModel.from_torch(
        lambda: _models.dispatched_llama(hf_paths["llama"], tmp_path / "offload"),
        device="cpu",
        name="dispatched",
    )
    with mm.use() as model:
        resident = _resident_bytes(model)
        expected = resident + _hook_weight_bytes(model)
    del model
    assert 0 < resident <= mm.size_bytes == expected  # type: ignore[operator]
    assert mm.unload().ok


def test_dtype_on_a_dispatched_model_is_refused(hf_paths: dict[str, Path]) -> None:
    mm = ManagedModel.from_torch(
        lambda: _models.cpu_offloaded_llama(hf_paths["llama"]), device="cpu", dtype=torch.float16
    )
    with pytest.raises(InvalidArgumentError, match=r"dispatched by accelerate.*dtype"), mm.use():
        pass
    assert mm.state is ModelState.UNLOADED


# ---------------------------------------------------------------------- FunASR hub names


def _plant_cache(root: Path, model_id: str, source: Path) -> Path:
    """The ModelScope cache layout of models downloaded by ``modelscope_hub``."""
    import shutil

    owner, name = model_id.split("/")
    snapshot = root / "models" / f"{owner}--{name}" / "snapshots" / "abc123"
    shutil.copytree(source, snapshot)
    (root / "models" / f"{owner}--{name}" / "refs").mkdir()
    (root / "models" / f"{owner}--{name}" / "refs" / "master").write_text("abc123")
    return snapshot


def test_a_hub_name_is_resolved_from_the_local_cache(
    sensevoice_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    snapshot = _plant_cache(tmp_path / "cache", "iic/SenseVoiceSmall", sensevoice_dir)
    mm = ManagedModel.from_funasr("iic/SenseVoiceSmall", device="cpu", language="en")
    assert mm.name == "SenseVoiceSmall"
    assert Path(mm.config["model"]) == snapshot
    with mm.use() as model:
        assert isinstance(_models.funasr_text(model), str)
    del model
    assert mm.unload().ok


def test_a_hub_name_missing_from_the_cache_says_where_it_looked(
    funasr_module: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingModelError, match=r"iic/SenseVoiceSmall.*empty") as info:
        ManagedModel.from_funasr("iic/SenseVoiceSmall", device="cpu")
    assert isinstance(info.value, FileNotFoundError)


def test_a_relative_path_that_does_not_exist_is_still_a_missing_path(funasr_module: object) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        ManagedModel.from_funasr("./no/such/dir", device="cpu")


# ---------------------------------------------------------------------- loader mistakes


def _meta_module() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Linear(4, 4)


def _generator() -> Any:
    yield torch.nn.Linear(4, 4)


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        pytest.param(lambda: None, r"returned None", id="none"),
        pytest.param(_generator, r"returned a generator", id="generator"),
        pytest.param(
            _meta_module, r"returned a model whose weights are all on the meta device", id="meta"
        ),
    ],
)
def test_loader_mistakes_are_clear_errors(loader: Any, message: str) -> None:
    mm = ManagedModel(loader, name="bad", device="cpu")
    with pytest.raises(InvalidArgumentError, match=rf"bad: the loader {message}"), mm.use():
        pass
    assert mm.state is ModelState.UNLOADED
    assert inspect.isfunction(loader)


def test_a_loader_returning_the_callers_object_is_refused_or_left_alone() -> None:
    prebuilt = torch.nn.Linear(64, 64)
    before = prebuilt.weight.detach().clone()
    mm = ManagedModel(lambda: prebuilt, name="borrowed", device="cpu")
    with pytest.raises(InvalidArgumentError, match=r"prebuilt.*owns=False"), mm.use():
        pass
    shared = ManagedModel(lambda: prebuilt, name="borrowed", device="cpu", owns=False)
    with shared.use() as model:
        assert model is prebuilt
    del model
    report = shared.unload()
    assert report.neutralised_bytes == 0
    assert torch.equal(prebuilt.weight, before)  # the caller's weights are intact
    assert prebuilt(torch.ones(1, 64)).shape == (1, 64)


def test_a_loader_returning_the_unloaded_object_again_is_refused() -> None:
    cache: dict[str, torch.nn.Module] = {}

    def load() -> torch.nn.Module:
        if "m" not in cache:
            cache["m"] = torch.nn.Linear(8, 8)
        return cache["m"]

    mm = ManagedModel(load, name="cached", device="cpu")
    with mm.use():
        pass
    mm.unload()
    with pytest.raises(ModelStateError, match=r"cached: the loader returned the object vramkit"):
        mm.load()
