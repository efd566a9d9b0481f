"""The life of a real third-party model under vramkit.

For each model people run: nothing loads before first use, a lease hands out
a working model, offloading to host RAM and to disk and waking gives back
bit-identical outputs, and unloading gives back every storage the weights
used (proven by weak references to the storages themselves).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ecosystem import _models
from vramkit.model import ManagedModel, ModelState


def _torch_case(name: str, factory: Any, run: Any, **options: Any) -> _models.Case:
    return _models.Case(
        name, lambda: ManagedModel.from_torch(factory, device="cpu", name=name, **options), run
    )


def _hf_case(request: pytest.FixtureRequest, kind: str, options: dict[str, Any]) -> _models.Case:
    paths = request.getfixturevalue("hf_paths")
    return _torch_case(
        kind,
        _models.hf_loader(paths[kind], kind),
        functools.partial(_models.hf_run, kind),
        **options,
    )


def make_case(request: pytest.FixtureRequest, name: str) -> _models.Case:
    """Build the case ``name`` from the session's saved models."""
    options: dict[str, Any] = request.getfixturevalue("options")
    if name in _models.HF_KINDS:
        return _hf_case(request, name, options)
    if name == "hf-pipeline":
        paths = request.getfixturevalue("hf_paths")
        return _models.Case(
            name,
            lambda: ManagedModel(
                lambda: _models.bert_pipeline(paths), name=name, device="cpu", **options
            ),
            _models.pipeline_run,
        )
    if name == "accelerate-dispatched":
        paths = request.getfixturevalue("hf_paths")
        folder: Path = request.getfixturevalue("tmp_path") / "accelerate"
        return _torch_case(
            name,
            lambda: _models.dispatched_llama(paths["llama"], folder),
            functools.partial(_models.hf_run, "llama"),
            **options,
        )
    if name == "accelerate-cpu-offload":
        paths = request.getfixturevalue("hf_paths")
        return _torch_case(
            name,
            lambda: _models.cpu_offloaded_llama(paths["llama"]),
            functools.partial(_models.hf_run, "llama"),
            **options,
        )
    if name == "torch-compile":
        return _torch_case(
            name,
            lambda: torch.compile(_models.tiny_mlp(), backend="eager"),
            lambda m: m(torch.ones(2, 32)),
            **options,
        )
    if name in ("float16", "bfloat16"):
        dtype = getattr(torch, name)
        return _torch_case(
            name,
            _models.tiny_mlp,
            lambda m: m(torch.ones(2, 32, dtype=dtype)),
            dtype=dtype,
            **options,
        )
    if name == "int8-buffers":
        return _torch_case(name, _models.Int8Linear, lambda m: m(torch.ones(2, 32)), **options)
    if name == "funasr-pipeline":
        dirs = request.getfixturevalue("funasr_pipeline")
        return _models.Case(
            name,
            lambda: ManagedModel.from_funasr(
                **dirs.automodel_kwargs(), device="cpu", name=name, manager_options=options
            ),
            _models.funasr_text,
        )
    if name == "sensevoice":
        path = request.getfixturevalue("sensevoice_dir")
        return _models.Case(
            name,
            lambda: ManagedModel.from_funasr(
                path, device="cpu", name=name, language="en", manager_options=options
            ),
            _models.funasr_text,
        )
    if name == "onnx-exported":
        path = request.getfixturevalue("exported_onnx")
        return _models.Case(
            name,
            lambda: ManagedModel.from_onnx(path, device="cpu", name=name, **options),
            _models.onnx_run,
            torch_weights=False,
        )
    raise AssertionError(f"unknown case {name}")


CASES = [
    *_models.HF_KINDS,
    "hf-pipeline",
    "accelerate-dispatched",
    "accelerate-cpu-offload",
    "torch-compile",
    "float16",
    "bfloat16",
    "int8-buffers",
    "funasr-pipeline",
    "sensevoice",
    "onnx-exported",
]


@pytest.mark.parametrize("name", CASES)
def test_lazy_lease_offload_wake_and_unload(request: pytest.FixtureRequest, name: str) -> None:
    case = make_case(request, name)
    mm = case.manage()
    assert mm.state is ModelState.UNLOADED
    assert mm.stats.loads == 0  # lazy: nothing ran yet

    refs: list[Any] = []
    with mm.use() as model:
        want = case.run(model)
        refs += _weights(case, model)
    assert mm.stats.loads == 1
    assert mm.size_bytes if case.torch_weights else True
    del model

    for tier in ("cpu", "disk", "cpu"):
        mm.offload(tier)
        assert mm.state is ModelState.OFFLOADED
        with mm.use() as model:
            assert _models.same(case.run(model), want), f"{name}: {tier} round trip changed outputs"
            refs += _weights(case, model)  # woken weights live in new storages (a mapped file)
        del model

    report = mm.unload()
    assert report.ok, str(report)
    assert _models.alive(refs) == 0, f"{name}: storages still alive after unload:\n{report}"


def _weights(case: _models.Case, model: Any) -> list[Any]:
    if not case.torch_weights:
        return []
    refs = _models.storage_refs(_models.weights_of(model))
    assert refs
    return refs
