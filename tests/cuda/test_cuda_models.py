"""ManagedModel, its offload tiers and ModelPool on a real GPU.

Skipped where torch.cuda.is_available() is False. Each test measures device
memory through the allocator (``torch.cuda.memory_allocated``), which counts
this process only, so a busy shared GPU does not make them flaky; the driver
layer is asserted only where this process's own change dominates it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import vramkit

pytestmark = pytest.mark.cuda

MiB = 1024**2
WIDTH = 2048  # 8 layers of 2048x2048 fp32 weights: 128 MiB, enough to see on any GPU


def _stack() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(8):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(0)


@pytest.fixture
def model() -> Iterator[vramkit.ManagedModel[torch.nn.Module]]:
    torch.empty(1, device="cuda:0")  # the context first, so it is not counted below
    vramkit.cleanup("cuda:0")
    mm = vramkit.ManagedModel.from_torch(_stack, device="cuda:0", name="stack")
    yield mm
    mm.close()
    vramkit.cleanup("cuda:0")


def test_unload_gives_the_memory_back_to_allocator_and_driver(
    model: vramkit.ManagedModel[torch.nn.Module],
) -> None:
    x = torch.ones(4, WIDTH, device="cuda:0")
    base = _allocated()
    model(x)
    size = model.size_bytes
    assert size is not None and size >= 120 * MiB
    assert _allocated() - base >= size

    report = model.unload()

    assert report.died, report
    assert _allocated() - base < 1 * MiB
    assert report.freed_bytes["allocated"] is not None
    assert report.freed_bytes["allocated"] >= 0.95 * size
    # cleanup() emptied the cache, and unload waited (bounded) for the driver.
    assert report.freed_bytes["reserved"] is not None
    assert report.freed_bytes["reserved"] >= 0.95 * size
    assert report.freed_bytes["used"] is not None
    assert report.freed_bytes["used"] >= 0.75 * size


registry: dict[str, object] = {}


def _plant_closure(mm: vramkit.ManagedModel[torch.nn.Module]) -> None:
    """Borrow the model in a function scope and leave a closure holding it."""
    with mm.use() as net:

        def predict(x: torch.Tensor) -> torch.Tensor:
            return net(x)  # type: ignore[no-any-return]

        registry["predict"] = predict


def test_unload_with_a_holder_frees_the_gpu_memory_anyway(
    model: vramkit.ManagedModel[torch.nn.Module],
) -> None:
    x = torch.ones(4, WIDTH, device="cuda:0")
    base = _allocated()
    _plant_closure(model)
    try:
        report = model.unload()

        assert not report.died
        assert any("predict" in str(chain) for chain in report.holders), report.holders
        assert _allocated() - base < 1 * MiB  # moved to meta: the holder pins nothing
        with pytest.raises(vramkit.ModelStateError, match="unloaded by vramkit"):
            registry["predict"](x)  # type: ignore[operator]
    finally:
        registry.clear()


def test_cpu_tier_pins_host_copies_frees_the_device_and_wakes_identical(
    model: vramkit.ManagedModel[torch.nn.Module],
) -> None:
    x = torch.randn(4, WIDTH, device="cuda:0", generator=torch.Generator("cuda").manual_seed(1))
    base = _allocated()
    expected = model(x).cpu()
    size = model.size_bytes
    assert size is not None

    report = model.offload("cpu")

    assert report.method == "move"
    assert report.pinned, report.note
    assert _allocated() - base < 1 * MiB
    assert model.tier == "cpu"

    wake = model.wake()
    assert wake is not None
    with model.use() as net:
        assert {p.device for p in net.parameters()} == {torch.device("cuda", 0)}
    assert torch.equal(model(x).cpu(), expected)
    assert _allocated() - base >= size


def test_disk_tier_wakes_onto_the_gpu_bit_identical(
    model: vramkit.ManagedModel[torch.nn.Module],
) -> None:
    x = torch.randn(4, WIDTH, device="cuda:0", generator=torch.Generator("cuda").manual_seed(2))
    base = _allocated()
    expected = model(x).cpu()

    report = model.offload("disk")

    assert report.method == "file" and report.path is not None
    assert _allocated() - base < 1 * MiB
    assert torch.equal(model(x).cpu(), expected)  # the lease woke it
    assert model.state is vramkit.ModelState.READY
    with model.use() as net:
        assert {p.device for p in net.parameters()} == {torch.device("cuda", 0)}


def test_unloading_a_cpu_offloaded_model_releases_the_pinned_copies(
    model: vramkit.ManagedModel[torch.nn.Module],
) -> None:
    model.load()
    size = model.size_bytes
    assert size is not None
    report = model.offload("cpu")
    assert report.pinned
    host_before = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    assert host_before is not None

    unload = model.unload()

    assert unload.died, unload
    host_after = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    assert host_after is not None
    # Pinned pages are not returned by malloc_trim; vramkit frees them itself
    # and empties torch's pinned host cache.
    assert host_before - host_after >= 0.75 * size


def test_a_pool_without_a_budget_follows_the_drivers_free_memory() -> None:
    torch.empty(1, device="cuda:0")
    vramkit.cleanup("cuda:0")
    with vramkit.ModelPool("cuda:0") as pool:
        free, _ = torch.cuda.mem_get_info(0)
        assert abs(pool.budget_bytes() - free) < 64 * MiB
        block = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        assert free - pool.budget_bytes() >= 480 * MiB
        del block
        vramkit.cleanup("cuda:0")
        assert abs(pool.budget_bytes() - free) < 64 * MiB


def test_a_pool_on_the_gpu_evicts_to_stay_inside_its_budget() -> None:
    torch.empty(1, device="cuda:0")
    vramkit.cleanup("cuda:0")
    base = _allocated()
    with vramkit.ModelPool("cuda:0", budget="200MiB", headroom="8MiB") as pool:
        a = pool.add(vramkit.ManagedModel.from_torch(_stack, device="cuda:0", name="a"))
        b = pool.add(vramkit.ManagedModel.from_torch(_stack, device="cuda:0", name="b"))
        x = torch.ones(1, WIDTH, device="cuda:0")
        a(x)
        peak_one = _allocated() - base
        b(x)  # a (128 MiB) must leave the GPU for b to fit in 200 MiB
        assert a.state is not vramkit.ModelState.READY
        assert _allocated() - base < peak_one + 8 * MiB
        status = pool.status()
        assert status.peak_charged_bytes <= status.budget_bytes


def test_a_funasr_pipeline_on_the_gpu_offloads_wakes_and_unloads(funasr_pipeline: Any) -> None:
    from vramkit.adapters import adapter_for
    from vramkit.testing.models import synthetic_audio

    torch.empty(1, device="cuda:0")
    vramkit.cleanup("cuda:0")
    base = _allocated()
    mm = vramkit.ManagedModel.from_funasr(
        **funasr_pipeline.automodel_kwargs(),
        device="cuda:0",
        name="asr",
    )
    audio = synthetic_audio(1.0)
    try:
        with mm.use() as am:
            first = am.generate(input=audio)[0]["text"]
            devices = {t.device for t in adapter_for(am).tensors(am)}
        del am
        assert devices == {torch.device("cuda", 0)}
        assert _allocated() - base > 0

        for tier in ("cpu", "disk"):
            mm.offload(tier)
            assert _allocated() - base < 1 * MiB, tier
            with mm.use() as am:
                assert am.generate(input=audio)[0]["text"] == first, tier
            del am

        report = mm.unload()
        assert report.died, report
        assert _allocated() - base < 1 * MiB
    finally:
        mm.close()
