"""Planted holders on real models: each is named root to leaf, freed anyway, and loud.

The holders are the ones people write by accident: an output kept in a global
(with its autograd graph), a ``state_dict()`` kept for later, a bound
``forward``, a submodule, a ``transformers.pipeline`` object, an exception
kept with its traceback, a global forward hook, a loader cached with
``functools.lru_cache``. For each, ``unload()`` must not crash, must say the
model did not die and name the holder, must free every storage anyway (weak
references to the storages prove it), and a stale use must raise
``ModelStateError`` naming the model.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ecosystem import _models
from vramkit.errors import ModelStateError
from vramkit.model import ManagedModel

KEPT: list[Any] = []
HOOKS: list[Any] = []
_paths: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    for handle in HOOKS:
        handle.remove()
    HOOKS.clear()
    KEPT.clear()
    cached_gpt2.cache_clear()
    gc.collect()


@functools.cache
def cached_gpt2() -> torch.nn.Module:
    """A loader cached "to make reloads fast": the cache keeps the model alive."""
    return _models.hf_loader(_paths["gpt2"], "gpt2")()


def _grad_output(model: Any) -> None:
    with torch.inference_mode(False), torch.enable_grad():
        KEPT.append(model(**_models.hf_inputs("gpt2")))


def _failing(model: Any) -> None:
    def predict(model: Any) -> None:
        raise ValueError("inference failed")

    try:
        predict(model)
    except ValueError as error:
        KEPT.append(error)


def _hook(model: Any) -> None:
    def hook(module: Any, args: Any, output: Any) -> None:
        model.config  # noqa: B018 - a forward hook that reads the model it closes over

    HOOKS.append(torch.nn.modules.module.register_module_forward_hook(hook))


def _pipeline(model: Any) -> None:
    transformers = _models.quiet_transformers()
    tokenizer = transformers.BertTokenizer(str(_paths["vocab"]))
    KEPT.append(transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer))


_HERE = __name__
_GPT2 = "GPT2LMHeadModel"


def _case(
    plant: Callable[[Any], None],
    expected: str,
    use: Callable[[Any], Any] | None = None,
    *,
    kind: str = "gpt2",
) -> Any:
    return pytest.param(kind, plant, expected, use)


def _call_kept(**inputs: Any) -> Callable[[Any], Any]:
    return lambda held: held(**inputs)


HF_CASES = {
    "output-in-a-global": _case(
        _grad_output,
        f"{_HERE}.KEPT[0] -> CausalLMOutputWithCrossAttentions.logits -> Tensor.grad_fn ->",
    ),
    "state-dict": _case(
        lambda m: KEPT.append(m.state_dict()),
        f"{_HERE}.KEPT[0]['",
        lambda held: held["transformer.wte.weight"] + 1,
    ),
    "bound-forward": _case(
        lambda m: KEPT.append(m.forward),
        f"{_HERE}.KEPT[0] -> bound method {_GPT2}.forward",
        _call_kept(**_models.hf_inputs("gpt2")),
    ),
    "submodule": _case(
        lambda m: KEPT.append(m.transformer.h[0]),
        f"{_HERE}.KEPT[0] -> GPT2Block.",
        lambda block: block(torch.ones(1, 4, 32)),
    ),
    "traceback": _case(
        _failing,
        f"{_HERE}.KEPT[0] -> ValueError.__traceback__ -> traceback -> _failing()",
    ),
    "global-hook": _case(_hook, "torch.nn.modules.module._global_forward_hooks["),
    "pipeline-object": _case(
        _pipeline,
        f"{_HERE}.KEPT[0] -> FeatureExtractionPipeline.model",
        lambda pipe: pipe("hello"),
        kind="bert",
    ),
}


def _lease_and_plant(mm: ManagedModel[Any], plant: Callable[[Any], None]) -> list[Any]:
    """Borrow the model in a function scope, plant the holder, return storage weakrefs."""
    with mm.use() as model:
        plant(model)
        return _models.storage_refs(_models.weights_of(model))


def _check_unload(mm: ManagedModel[Any], refs: list[Any], expected: str) -> Any:
    report = mm.unload()
    assert not report.died, str(report)
    chains = [str(c) for c in report.holders]
    assert any(c.startswith(expected) for c in chains), f"{expected!r} not in {chains}"
    assert _models.alive(refs) == 0, f"storages still alive:\n{report}"
    return report


def _stale_use_is_loud(name: str, use: Callable[[], Any]) -> None:
    with pytest.raises(ModelStateError, match=rf"{name}.*use\(\)"):
        use()


@pytest.mark.parametrize(
    ("kind", "plant", "expected", "use"), HF_CASES.values(), ids=HF_CASES.keys()
)
def test_a_planted_holder_is_named_freed_and_loud(
    hf_paths: dict[str, Path],
    kind: str,
    plant: Callable[[Any], None],
    expected: str,
    use: Callable[[Any], Any] | None,
) -> None:
    _paths.update(hf_paths)
    mm = ManagedModel.from_torch(
        _models.hf_loader(hf_paths[kind], kind), device="cpu", name=f"tiny-{kind}"
    )
    refs = _lease_and_plant(mm, plant)
    _check_unload(mm, refs, expected)
    if use is not None:
        _stale_use_is_loud(mm.name, lambda: use(KEPT[0]))


def test_an_lru_cached_loader_is_named_as_the_holder(hf_paths: dict[str, Path]) -> None:
    _paths.update(hf_paths)
    mm = ManagedModel.from_torch(cached_gpt2, device="cpu", name="cached")
    refs = _lease_and_plant(mm, lambda m: None)
    _check_unload(mm, refs, f"{_HERE}.cached_gpt2 -> lru_cache[()]")
    # The cache now hands out the unloaded object: the next load must say so.
    with pytest.raises(ModelStateError, match="returned the object vramkit unloaded before"):
        mm.load()


def _funasr_failing(automodel: Any) -> None:
    def transcribe(automodel: Any) -> None:
        raise ValueError("bad audio")

    try:
        transcribe(automodel)
    except ValueError as error:
        KEPT.append(error)


def _generate(held: Any) -> Any:
    from vramkit.testing.models import synthetic_audio

    return held(input=synthetic_audio(_models.AUDIO_SECONDS))


FUNASR_CASES = {
    "automodel": (lambda am: KEPT.append(am), f"{_HERE}.KEPT[0]", _models.funasr_text),
    "vad-model": (
        lambda am: KEPT.append(am.vad_model),
        f"{_HERE}.KEPT[0] -> FsmnVADStreaming.",
        lambda vad: next(vad.parameters()) * 2,
    ),
    "bound-generate": (
        lambda am: KEPT.append(am.generate),
        f"{_HERE}.KEPT[0] -> bound method AutoModel.generate",
        _generate,
    ),
    "state-dict": (
        lambda am: KEPT.append(am.model.state_dict()),
        f"{_HERE}.KEPT[0]['",
        lambda weights: next(iter(weights.values())) * 2,
    ),
    "traceback": (
        _funasr_failing,
        f"{_HERE}.KEPT[0] -> ValueError.__traceback__ -> traceback",
        None,
    ),
}


@pytest.mark.parametrize(
    ("plant", "expected", "use"), FUNASR_CASES.values(), ids=FUNASR_CASES.keys()
)
def test_a_holder_of_a_funasr_pipeline_is_named_freed_and_loud(
    funasr_pipeline: Any,
    plant: Callable[[Any], None],
    expected: str,
    use: Callable[[Any], Any] | None,
) -> None:
    mm = ManagedModel.from_funasr(**funasr_pipeline.automodel_kwargs(), device="cpu", name="asr")
    refs = _lease_and_plant(mm, plant)
    _check_unload(mm, refs, expected)
    if use is not None:
        _stale_use_is_loud(mm.name, lambda: use(KEPT[0]))
