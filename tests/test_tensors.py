from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

import vramkit
from vramkit import TensorCensus
from vramkit import _gc as heap_walks
from vramkit._gc import tensors_in_heap
from vramkit.tensors import StorageBaseline

planted: list[torch.Tensor] = []
kept: dict[str, torch.Tensor] = {}
startup = [torch.zeros(128), torch.nn.Parameter(torch.zeros(96))]  # frozen with the heap


def test_census_finds_a_planted_tensor_once_per_storage() -> None:
    tensor = torch.zeros(512, 1024)  # 2 MiB
    views = [tensor[:10], tensor.view(-1), tensor.t()]
    census = vramkit.live_tensors("cpu")
    matching = [
        t
        for t in census
        if t.nbytes == tensor.untyped_storage().nbytes()
        and t.storage_key[1] == tensor.untyped_storage().data_ptr()
    ]
    assert len(matching) == 1  # views share the storage: counted once
    info = matching[0]
    assert info.device == "cpu"
    assert info.dtype == "torch.float32"
    assert info.nbytes == 2 * 1024**2
    assert "float32 on cpu, 2.0 MiB" in info.describe()
    del views


def test_census_holds_no_strong_reference() -> None:
    tensor = torch.zeros(1024)
    ref = weakref.ref(tensor)
    census = vramkit.live_tensors()
    (mine,) = [t for t in census if t.tensor is tensor]
    del tensor
    gc.collect()
    assert ref() is None
    assert mine.tensor is None  # the entry outlived the tensor without keeping it alive
    assert mine.nbytes == 1024 * 4  # and still says what the tensor held
    assert mine.shape == (1024,)


def test_new_since_lists_what_appeared() -> None:
    before = vramkit.live_tensors("cpu")
    planted.append(torch.ones(300, 300))
    after = vramkit.live_tensors("cpu")
    new = after.new_since(before)
    assert isinstance(new, TensorCensus)
    assert [t.shape for t in new] == [(300, 300)]
    assert new.total_bytes == 300 * 300 * 4
    assert new.by_device() == {"cpu": 300 * 300 * 4}
    chains = new[0].referrers()
    assert any("test_tensors.planted[0]" in str(c) for c in chains)
    planted.clear()


def test_parameters_are_flagged_and_meta_tensors_skipped() -> None:
    layer = torch.nn.Linear(64, 64)
    ghost = torch.nn.Linear(64, 64, device="meta")
    census = vramkit.live_tensors()
    weight = [t for t in census if t.tensor is layer.weight]
    assert weight and weight[0].is_parameter and weight[0].requires_grad
    assert not any(t.device == "meta" for t in census)
    del ghost


def test_census_is_sorted_and_formats() -> None:
    big = torch.zeros(1024, 1024)
    census = vramkit.live_tensors()
    sizes = [t.nbytes for t in census]
    assert sizes == sorted(sizes, reverse=True)
    assert "4.0 MiB" in census.format(limit=len(census))
    assert "more" in census.format(limit=0) or len(census) == 0
    assert isinstance(census[:2], TensorCensus)
    assert repr(census).startswith("TensorCensus(")
    del big


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The process's heap frozen as a server freezes it after startup; thawed after."""
    vramkit.freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def _storages(census: TensorCensus) -> set[int]:
    return {info.storage_key[1] for info in census}


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_a_frozen_heap_is_counted_whole(frozen_heap: None) -> None:
    # The census walks only what was made since the freeze: the frozen tensors
    # come from what it remembered, so a frozen and a new tensor are both there.
    frozen = startup[0]
    made_since = torch.zeros(256)
    parameter = torch.nn.Parameter(torch.zeros(64))
    census = vramkit.live_tensors("cpu")
    assert {_address(frozen), _address(made_since)} <= _storages(census)
    (found,) = [info for info in census if info.tensor is parameter]
    assert found.is_parameter


def test_a_frozen_tensor_given_a_new_storage_is_seen(frozen_heap: None) -> None:
    # A model loaded before the freeze and moved or converted later keeps its
    # (frozen) Parameter objects: their new storages must still be counted.
    frozen = startup[1]
    before = _address(frozen)
    frozen.data = torch.ones(frozen.shape)
    try:
        addresses = _storages(vramkit.live_tensors("cpu"))
        assert _address(frozen) in addresses
        assert before not in addresses
    finally:
        frozen.data = torch.zeros(frozen.shape)


def test_a_tensor_frozen_by_a_later_freeze_is_found(frozen_heap: None) -> None:
    # Someone else freezes again (a replica's startup after vramkit's): what
    # vramkit remembered is stale and the census walks the frozen heap again.
    vramkit.live_tensors("cpu")  # the record of the first freeze is in use
    late = torch.zeros(333)
    gc.freeze()
    assert _address(late) in _storages(vramkit.live_tensors("cpu"))


def test_a_thawed_heap_is_counted_once(frozen_heap: None) -> None:
    vramkit.live_tensors("cpu")
    gc.unfreeze()  # what was remembered is walked again now: listed once all the same
    tensors = [t for t in tensors_in_heap() if t is startup[0]]
    assert len(tensors) == 1


def test_frozen_tensors_are_held_weakly(frozen_heap: None) -> None:
    doomed = torch.zeros(100)
    gc.freeze()
    vramkit.live_tensors("cpu")  # remembers `doomed` among the frozen
    ref = weakref.ref(doomed)
    del doomed
    assert ref() is None  # reference counting frees frozen objects; vramkit holds none


def test_baseline_tells_new_storages_from_old_ones() -> None:
    old = torch.zeros(1000)
    dies = torch.zeros(2000)
    baseline = StorageBaseline("cpu")
    view = old[:10]  # a new tensor object on an old storage: nothing new
    new = torch.zeros(3000)
    del dies  # its address may be reused: only a live storage counts as old
    reuse = torch.zeros(2000)
    fresh = _storages(baseline.new_tensors())
    assert _address(view) not in fresh
    assert {_address(new), _address(reuse)} <= fresh
    (info,) = [i for i in baseline.new_tensors() if i.tensor is new]
    assert info.nbytes == 3000 * 4


def test_baseline_shares_a_heap_walk() -> None:
    tensors = tensors_in_heap()
    baseline = StorageBaseline("cpu", tensors)
    new = torch.zeros(500)
    assert _address(new) not in _storages(baseline.new_tensors(tensors))  # the old walk
    assert _address(new) in _storages(baseline.new_tensors())  # a new one
    tensors.clear()


def test_freezing_again_keeps_what_was_made_in_between(frozen_heap: None) -> None:
    between = torch.zeros(777)
    assert vramkit.freeze_heap() > 0
    census = vramkit.live_tensors("cpu")
    assert {_address(between), _address(startup[0])} <= _storages(census)


def test_garbage_is_collected_before_the_heap_freezes() -> None:
    class Node:
        pass

    gc.disable()  # no automatic collection may free the cycle first
    try:
        node = Node()
        node.itself = node  # type: ignore[attr-defined]  # a cycle: only the collector frees it
        node.tensor = torch.zeros(100)  # type: ignore[attr-defined]
        ref = weakref.ref(node.tensor)  # type: ignore[attr-defined]
        del node
        vramkit.freeze_heap()
        assert ref() is None  # frozen, the cycle would never have been collected
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_holder_search_on_a_frozen_heap_leaves_the_census_cheap(
    frozen_heap: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The search thaws the heap and freezes it again, taking in `late`: the
    # census must still count it, without thawing to walk the whole heap again.
    late = torch.zeros(444)
    kept["late"] = late
    try:
        chains = vramkit.find_referrers(late)
    finally:
        kept.clear()
    assert any("test_tensors.kept['late']" in str(chain) for chain in chains), chains
    walks: list[object] = []
    monkeypatch.setattr(heap_walks, "_walk_frozen", lambda kinds: walks.append(kinds) or [])
    assert _address(late) in _storages(vramkit.live_tensors("cpu"))
    assert walks == []


class _Subclass(torch.Tensor):
    pass


def test_a_parameter_of_a_tensor_subclass_is_flagged() -> None:
    # Parameter(x) keeps x's class when x is a subclass: only `_is_param` tells.
    from vramkit._gc import tensor_classes
    from vramkit.tensors import _is_parameter

    parameter = torch.nn.Parameter(torch.zeros(64).as_subclass(_Subclass))
    assert type(parameter) is _Subclass and isinstance(parameter, torch.nn.Parameter)
    known = tensor_classes(torch.nn.Parameter)
    assert _is_parameter(parameter, known)
    assert _is_parameter(torch.nn.Parameter(torch.zeros(4)), known)
    assert not _is_parameter(torch.zeros(4).as_subclass(_Subclass), known)
    assert not _is_parameter(torch.zeros(4), known)


def test_fake_tensors_left_in_the_heap_are_skipped_by_baselines_and_sessions() -> None:
    # torch.compile leaves FakeTensors behind; their storage has no readable
    # address, and a leak check must neither fail on them nor count them.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(1021, 3)
    baseline = StorageBaseline("cpu")
    kept = torch.ones(256)
    assert [t.nbytes for t in baseline.new_tensors()] == [kept.nbytes]
    assert all(t.shape != (1021, 3) for t in vramkit.live_tensors("cpu"))
    with vramkit.gpu_session("cpu", leak_check="raise"):
        scratch = torch.ones(64)
        del scratch
    del fake, kept
