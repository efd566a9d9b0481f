"""Offload tiers and wake: bit-identical round trips, faults, costs."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vramkit
from vramkit import ManagedModel, ModelState
from vramkit.errors import InvalidArgumentError, ModelBusyError, ModelStateError, OffloadError
from vramkit.testing.models import TinyMLP, synthetic_audio

from .helpers import run_python


class Rich(torch.nn.Module):
    """Everything a round trip must restore: ties, dtypes, buffers of each kind, frozen weights."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = TinyMLP(256, layers=3, tied=True)
        self.frozen = torch.nn.Linear(256, 256)
        self.frozen.requires_grad_(False)
        self.halfp = torch.nn.Parameter(torch.randn(256).half())
        self.register_buffer("steps", torch.arange(256, dtype=torch.int64))
        self.register_buffer("cache", torch.randn(256), persistent=False)
        self.stats = torch.randn(2, 256)  # a plain tensor attribute, as FunASR's CMVN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.frozen(self.mlp(x)) + self.halfp.float() + self.cache + self.stats[0]
        return y * self.steps.float().mean()


def rich(offload_dir: Path, **options: Any) -> ManagedModel[torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return Rich()

    return ManagedModel.from_torch(
        build, device="cpu", name="rich", offload_dir=offload_dir, **options
    )


def describe(module: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    found = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        found[name] = ("param", p.dtype, p.requires_grad, p.device.type, p.detach().clone())
    for name, b in module.named_buffers(remove_duplicate=False):
        found[name] = ("buffer", b.dtype, b.device.type, b.clone())
    found["stats"] = ("attr", module.stats.dtype, module.stats.clone())
    return found


def same(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            if isinstance(x, torch.Tensor):
                if not torch.equal(x, y):
                    return False
            elif x != y:
                return False
    return True


def inspect_model(mm: ManagedModel[Any], x: torch.Tensor) -> tuple[torch.Tensor, Any, bool]:
    with mm.use() as model:
        tied = model.mlp.layers[0].weight is model.mlp.layers[-1].weight
        return model(x), describe(model), tied


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_round_trips_are_bit_identical(tier: str, tmp_path: Path) -> None:
    mm = rich(tmp_path)
    x = torch.randn(3, 256)
    before, state, tied = inspect_model(mm, x)
    assert tied
    for _ in range(5):
        report = mm.offload(tier)
        assert mm.state is ModelState.OFFLOADED
        assert mm.tier == tier
        assert report.weight_bytes == mm.size_bytes
        after, restored, tied = inspect_model(mm, x)  # a lease wakes it
        assert mm.state is ModelState.READY
        assert torch.equal(after, before)
        assert same(state, restored)
        assert tied, "tied weights must wake as one Parameter"
    assert mm.stats.offloads == 5
    assert mm.stats.wakes == 5
    assert tier in mm.stats.wake_seconds


def test_disk_tier_makes_a_meta_skeleton_and_writes_once(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    with mm.use() as skeleton:  # the object itself: the tiers keep it through a round trip
        pass
    held = vramkit.live_tensors("cpu").total_bytes
    first = mm.offload("disk")
    assert first.method == "file"
    assert first.path is not None
    assert Path(first.path).exists()
    # Every weight, buffer and tensor attribute left host RAM: what stays is a skeleton,
    # the same objects emptied: they hold no memory and refuse every use.
    assert held - vramkit.live_tensors("cpu").total_bytes >= first.weight_bytes
    assert first.weight_bytes >= (mm.size_bytes or 0)
    with torch._C.DisableTorchFunctionSubclass():
        assert all(p.numel() == 0 for p in skeleton.parameters())
        assert skeleton.stats.numel() == 0
    with pytest.raises(ModelStateError, match="rich is offloaded to disk"):
        skeleton.frozen.weight.sum()
    del skeleton
    mm.wake()
    second = mm.offload("disk")
    assert second.reused_file
    assert second.path == first.path
    mm.wake()
    with mm.use() as model, torch.no_grad():
        model.frozen.weight.add_(1.0)  # weights changed in place: the file is stale
    del model
    third = mm.offload("disk")
    assert not third.reused_file
    assert mm.unload().died
    assert not Path(third.path or "").exists()  # the cache file goes with the model


def test_switching_tiers_while_offloaded(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    x = torch.randn(1, 256)
    before = mm(x)
    mm.offload("cpu")
    mm.offload("disk")
    assert mm.tier == "disk"
    assert torch.equal(mm(x), before)
    assert mm.offload("disk").note == ""
    assert "already offloaded" in mm.offload("disk").note


def test_unload_from_an_offloaded_state_frees_everything(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    mm.load()
    mm.offload("cpu")
    report = mm.unload()
    assert report.died
    assert report.state_before is ModelState.OFFLOADED
    assert mm.state is ModelState.UNLOADED
    assert mm.tier is None


def test_offload_refuses_while_leased_and_when_unloaded(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    with pytest.raises(ModelStateError, match="not loaded"):
        mm.offload("cpu")
    busy = pytest.raises(ModelBusyError, match="cannot offload from inside its own lease")
    with mm.use(), busy:
        mm.offload("cpu")
    with pytest.raises(InvalidArgumentError, match="tier must be 'cpu' or 'disk'"):
        mm.offload("gpu")
    assert mm.wake() is None  # nothing to wake


def test_unwritable_cache_dir_leaves_the_model_ready(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    mm = rich(blocker / "cache")
    x = torch.randn(1, 256)
    before = mm(x)
    with pytest.raises(OffloadError, match="could not write the disk tier") as info:
        mm.offload("disk")
    assert isinstance(info.value, OSError)
    assert "nothing was lost" in str(info.value)
    assert mm.state is ModelState.READY
    assert torch.equal(mm(x), before)


def test_the_disk_tier_needs_no_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch installed without numpy raises this from Tensor.numpy(); the disk
    # tier used it to write and to stamp weights, and blamed the disk.
    def no_numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    mm = ManagedModel.from_torch(lambda: TinyMLP(64), device="cpu", offload_dir=tmp_path)
    x = torch.ones(1, 64)
    before = mm(x)
    mm.offload("disk")
    assert torch.equal(mm(x), before)  # written, mapped back, bit-identical
    report = mm.offload("disk")
    assert report.reused_file  # the unchanged-weights stamp works too
    assert torch.equal(mm(x), before)
    assert mm.unload().died


def test_a_write_error_that_is_not_the_disks_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramkit.model import _tierfile

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug, not a disk")

    monkeypatch.setattr(_tierfile, "_write", broken)
    mm = ManagedModel.from_torch(lambda: TinyMLP(64), device="cpu", offload_dir=tmp_path)
    mm.load()
    with pytest.raises(OffloadError) as info:
        mm.offload("disk")
    message = str(info.value)
    del info  # its traceback's frames hold the tensors that were being written
    assert "failed while writing the disk tier" in message
    assert "RuntimeError: a bug, not a disk" in message
    assert "could not write" not in message
    assert mm.state is ModelState.READY
    assert mm.unload().died


def test_disk_full_leaves_the_model_ready_and_no_partial_file(tmp_path: Path) -> None:
    # A file-size limit makes every write past 1 MiB fail with EFBIG, as a full disk would.
    out = run_python(
        f"""
        import json, os, resource, signal, torch
        from pathlib import Path
        from vramkit import ManagedModel, OffloadError
        from vramkit.testing.models import TinyMLP
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mm = ManagedModel.from_torch(lambda: TinyMLP(512), device="cpu",
                                     offload_dir={str(tmp_path)!r})
        x = torch.ones(1, 512)
        before = mm(x)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            mm.offload("disk")
            error = None
        except OffloadError as exc:
            error = str(exc)
        print(json.dumps({{"error": error, "state": mm.state.value,
                           "same": bool(torch.equal(mm(x), before)),
                           "files": [f for _, _, fs in os.walk({str(tmp_path)!r}) for f in fs]}}))
        """
    )
    import json

    result = json.loads(out)
    assert result["error"] is not None
    assert "nothing was lost" in result["error"]
    assert result["state"] == "READY"
    assert result["same"] is True
    assert result["files"] == []


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_cache_file_falls_back_to_the_loader(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mm = rich(tmp_path)
    x = torch.randn(1, 256)
    before = mm(x)
    report = mm.offload("disk")
    path = Path(report.path or "")
    if damage == "delete":
        path.unlink()
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        wake = mm.wake()
    assert wake is not None
    assert wake.fallback is not None
    assert "reloading with the loader" in caplog.text
    assert mm.state is ModelState.READY
    assert torch.equal(mm(x), before)  # the loader builds the same model
    assert mm.stats.loads == 2


def test_round_trips_do_not_grow_memory_or_file_handles(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    x = torch.randn(1, 256)
    mm(x)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0

    for _ in range(5):  # warm up allocator and file caches
        mm.offload("disk")
        mm(x)
    gc.collect()
    base_rss = vramkit.snapshot("cpu")["cpu"].process_used_bytes or 0
    base_fds = fds()
    for i in range(50):
        mm.offload("disk" if i % 2 else "cpu")
        mm(x)
    gc.collect()
    vramkit.cleanup("cpu")
    rss = vramkit.snapshot("cpu")["cpu"].process_used_bytes or 0
    assert rss - base_rss < 16 * 1024**2
    assert fds() <= base_fds


def test_tier_costs_and_choice(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    mm.load()
    costs = mm.tier_costs()
    size = mm.size_bytes or 0
    assert costs["cpu"].frees_device_bytes == 0  # already in host RAM on a cpu device
    assert costs["disk"].frees_device_bytes == size
    assert costs["disk"].disk_bytes == size
    assert costs["unload"].measured
    assert not costs["disk"].measured
    mm.offload("disk")
    mm.wake()
    costs = mm.tier_costs()
    assert costs["disk"].measured
    # The cpu tier frees nothing on a cpu device, however much RAM is free; between
    # the others the measured wake times decide (which is faster depends on the machine).
    faster = "disk" if costs["disk"].wake_seconds < costs["unload"].wake_seconds else "unload"
    assert mm.choose_tier(host_free_bytes=10**12) == faster


def test_offload_of_an_onnx_session_drops_and_rebuilds(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from vramkit.testing.models import build_onnx_mlp

    mm = ManagedModel.from_onnx(build_onnx_mlp(tmp_path / "m.onnx"))
    x = {"x": np.ones((1, 16), dtype=np.float32)}
    with mm.use() as session:
        before = session.run(None, x)[0]
        dropped = weakref.ref(session)
    del session
    report = mm.offload("disk")
    assert report.method == "rebuild"
    assert "cannot be offloaded live" in report.note
    gc.collect()
    assert dropped() is None  # nothing of the session is kept while offloaded
    wake = mm.wake()
    assert wake is not None
    assert wake.method == "rebuild"
    with mm.use() as session:
        assert np.array_equal(session.run(None, x)[0], before)


def test_the_cache_file_is_removed_at_exit(tmp_path: Path) -> None:
    run_python(
        f"""
        from vramkit import ManagedModel
        from vramkit.testing.models import TinyMLP
        mm = ManagedModel.from_torch(lambda: TinyMLP(64), device="cpu",
                                     offload_dir={str(tmp_path)!r})
        mm.load()
        print(mm.offload("disk").path)
        """
    )
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []  # lock file included


@pytest.fixture
def asr(funasr_pipeline: Any, tmp_path: Path) -> ManagedModel[Any]:
    return ManagedModel.from_funasr(
        **funasr_pipeline.automodel_kwargs(),
        device="cpu",
        name="asr",
        manager_options={"offload_dir": tmp_path},
    )


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_funasr_round_trip_gives_the_same_transcript(asr: ManagedModel[Any], tier: str) -> None:
    audio = synthetic_audio(1.0)

    def transcribe() -> str:
        with asr.use() as am:
            return str(am.generate(input=audio)[0]["text"])

    before = transcribe()
    for _ in range(3):
        report = asr.offload(tier)
        assert report.method == ("move" if tier == "cpu" else "file")
        assert transcribe() == before
    with asr.use() as am:
        modules = asr.adapter.modules(am)  # type: ignore[union-attr]
        assert {"model", "vad_model", "punc_model"} <= set(modules)
        assert any(name.startswith("kwargs") for name in modules), "frontends travel too"
    del am, modules
    assert asr.unload().died


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.frozen.weight.data.fill_(7.0), id="data-inplace"),
        pytest.param(
            lambda m: setattr(m.frozen.weight, "data", torch.full((256, 256), 7.0)),
            id="data-assign",
        ),
        pytest.param(lambda m: m.frozen.weight.fill_(7.0), id="inplace"),
    ],
)
def test_edits_after_a_disk_wake_are_never_lost(edit: Any, tmp_path: Path) -> None:
    mm = rich(tmp_path, inference_mode=False)
    mm.load()
    mm.offload("disk")
    mm.wake()
    with mm.use() as model, torch.no_grad():
        edit(model)
    del model
    report = mm.offload("disk")
    assert not report.reused_file
    with mm.use() as model:
        assert torch.all(model.frozen.weight == 7.0)


def test_rewrite_forces_a_fresh_file(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    mm.load()
    mm.offload("disk")
    mm.wake()
    assert not mm.offload("disk", rewrite=True).reused_file


def test_choose_tier_counts_writing_the_file(tmp_path: Path) -> None:
    mm = rich(tmp_path)
    mm.load()
    costs = mm.tier_costs()
    assert costs["disk"].offload_seconds > 0  # no file yet: it must be written
    mm.offload("disk")
    mm.wake()
    costs = mm.tier_costs()
    assert costs["disk"].offload_seconds == 0  # the file it woke from is reusable
    assert costs["disk"].round_trip_seconds == costs["disk"].wake_seconds


@pytest.mark.parametrize("width", [100, 128])
def test_disk_wake_is_aligned_and_bit_identical_for_any_layout(width: int, tmp_path: Path) -> None:
    # Weights mapped at an 8-byte boundary took another BLAS path and gave outputs
    # that differed in the last bits; the file now aligns every tensor to 64 bytes.
    generator = torch.Generator().manual_seed(0)
    template = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(4)))
    state = {k: torch.randn(v.shape, generator=generator) for k, v in template.state_dict().items()}

    def build() -> torch.nn.Module:
        module = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(4)))
        module.load_state_dict(state)
        return module.eval()

    x = torch.ones(1, width)
    mm = ManagedModel.from_torch(build, device="cpu", offload_dir=tmp_path)
    before = mm(x)
    report = mm.offload("disk")
    from safetensors.torch import load_file

    on_disk = load_file(report.path or "")  # a valid safetensors file for any reader
    assert all(torch.equal(on_disk[k], v) for k, v in state.items())
    with mm.use() as model:
        assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
        assert torch.equal(model(x), before)


def test_disk_wake_of_a_tensor_over_2_to_the_24_elements_reads_the_file(tmp_path: Path) -> None:
    # The unchanged-weights stamp once took float32 sample indices, which ran past
    # the end of such a tensor: every wake of a model with one (any LLM's
    # embedding) fell back to the loader.
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Embedding(2**24 + 8, 1)

    mm = ManagedModel.from_torch(build, device="cpu", name="wide", offload_dir=tmp_path)
    ids = torch.tensor([0, 2**24 + 7])
    before = mm(ids)
    mm.offload("disk")
    report = mm.wake()
    assert report is not None
    assert report.fallback is None, str(report)
    assert mm.stats.loads == 1
    assert torch.equal(mm(ids), before)
    assert mm.offload("disk").reused_file  # and the stamp recognises the file as unchanged
