"""The adapter registry: a third-party kind of object joins, is used, and leaves."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import pytest
import torch

from vramkit import InvalidArgumentError, ManagedModel
from vramkit.adapters import (
    AdapterBase,
    ObjectAdapter,
    TorchAdapter,
    adapter_for,
    register_adapter,
    unregister_adapter,
)


class Engine:
    """A native engine: its memory is a buffer no tensor walk can see."""

    def __init__(self) -> None:
        self.buffer: bytearray | None = bytearray(12345)


class EngineAdapter(AdapterBase):
    """What a third party would ship for its engines."""

    name = "engine"

    def __init__(self) -> None:
        self.released: list[weakref.ref[Engine]] = []

    def matches(self, obj: object) -> bool:
        return isinstance(obj, Engine)

    def size_bytes(self, obj: object) -> int | None:
        assert isinstance(obj, Engine) and obj.buffer is not None
        return len(obj.buffer)

    def release(self, obj: object) -> None:
        assert isinstance(obj, Engine)
        self.released.append(weakref.ref(obj))
        obj.buffer = None


@pytest.fixture
def engine_adapter() -> Iterator[EngineAdapter]:
    adapter = EngineAdapter()
    register_adapter(adapter)
    yield adapter
    unregister_adapter(adapter)


def test_a_registered_adapter_is_found_for_its_objects_only(engine_adapter: EngineAdapter) -> None:
    assert adapter_for(Engine()) is engine_adapter
    assert isinstance(adapter_for(torch.nn.Linear(2, 2)), TorchAdapter)


def test_managed_model_measures_and_releases_through_it(engine_adapter: EngineAdapter) -> None:
    mm = ManagedModel(Engine, name="engine", device="cpu")
    with mm.use() as engine:
        assert isinstance(engine, Engine)
        del engine
    assert mm.adapter is engine_adapter
    assert mm.size_bytes == 12345  # only the adapter knows this
    report = mm.unload()
    assert report.died
    assert len(engine_adapter.released) == 1
    assert engine_adapter.released[0]() is None  # released, then it died


def test_unregistered_it_is_no_longer_found() -> None:
    adapter = EngineAdapter()
    register_adapter(adapter)
    unregister_adapter(adapter)
    assert isinstance(adapter_for(Engine()), ObjectAdapter)
    unregister_adapter(adapter)  # twice: nothing to forget
    mm = ManagedModel(Engine, name="engine", device="cpu")
    mm.load()
    assert mm.adapter is not adapter
    assert mm.unload().died
    assert adapter.released == []


def test_registered_adapters_come_before_the_built_in_ones() -> None:
    class Quiet(TorchAdapter):
        name = "quiet"

    adapter = Quiet()
    register_adapter(adapter)
    register_adapter(adapter)  # again: moved to the front, not listed twice
    try:
        assert adapter_for(torch.nn.Linear(2, 2)) is adapter
    finally:
        unregister_adapter(adapter)
    assert adapter_for(torch.nn.Linear(2, 2)) is not adapter


def test_an_object_that_is_not_an_adapter_is_refused() -> None:
    class Half:
        name = "half"

        def matches(self, obj: object) -> bool:
            return True

    with pytest.raises(InvalidArgumentError, match="must implement"):
        register_adapter(Half())  # type: ignore[arg-type]
