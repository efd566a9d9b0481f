from __future__ import annotations

import gc
import weakref

import torch

import vramkit
from vramkit import TensorCensus

planted: list[torch.Tensor] = []


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
