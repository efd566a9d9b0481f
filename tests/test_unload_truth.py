"""An unload report tells the truth: death by storage, memory freed anyway, figures that match.

A detached copy, a view, ``.data`` or a ``state_dict()`` entry is a new tensor
object on the model's storage: the weights did not die with the Parameter
objects. Memory-mapped weights (what ``from_pretrained`` and vramkit's own
disk tier give) cannot be resized to 0 bytes; they are freed by swapping the
storage out from under every tensor. What cannot be freed is reported with
its bytes, and the text never says "freed" for it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from vramkit.errors import ModelStateError
from vramkit.model import ManagedModel

MiB = 1024**2
KEPT: list[Any] = []


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    KEPT.clear()
    gc.collect()


def _refs(module: torch.nn.Module) -> list[StorageWeakRef]:
    return [StorageWeakRef(t.untyped_storage()) for t in (*module.parameters(), *module.buffers())]


def _plant(mm: ManagedModel[Any], plant: Callable[[Any], Any]) -> list[StorageWeakRef]:
    with mm.use() as model:
        KEPT.append(plant(model))
        return _refs(model)


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda m: m[0].weight.detach(), id="detached"),
        pytest.param(lambda m: m[0].weight[:4], id="view"),
        pytest.param(lambda m: m[0].weight.data, id="data"),
        pytest.param(lambda m: m.state_dict(), id="state-dict"),
    ],
)
def test_a_tensor_sharing_a_storage_is_a_survivor(plant: Callable[[Any], Any]) -> None:
    mm = ManagedModel.from_torch(
        lambda: torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)),
        device="cpu",
        name="shared",
    )
    refs = _plant(mm, plant)
    report = mm.unload()
    assert not report.died
    assert not report.ok
    assert report.holders[0].root == "module global"
    assert str(report.holders[0]).startswith(f"{__name__}.KEPT[0]")
    assert all(ref.expired() for ref in refs)  # freed anyway
    assert report.neutralised_bytes >= 256 * 256 * 4
    assert report.held_bytes == 0
    kept = KEPT[0]
    tensor = kept["0.weight"] if isinstance(kept, dict) else kept
    with pytest.raises(ModelStateError, match=r"shared was unloaded .*`shared\.use\(\)`"):
        tensor.sum()


def _mapped_module(path: Path) -> torch.nn.Module:
    """Weights mapped from a safetensors file, as ``from_pretrained`` loads them on CPU."""
    from safetensors.torch import load_file

    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    module.load_state_dict(load_file(str(path)), assign=True)
    return module


@pytest.fixture
def mapped_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    path = tmp_path / "weights.safetensors"
    save_file(module.state_dict(), str(path))
    return path


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda m: m, id="module"),
        pytest.param(lambda m: m.state_dict(), id="state-dict"),
        pytest.param(
            lambda m: m(torch.ones(1, 512, requires_grad=True)),  # graph saves weight views
            id="autograd-graph",
        ),
    ],
)
def test_mapped_weights_are_freed_anyway(mapped_file: Path, plant: Callable[[Any], Any]) -> None:
    module = _mapped_module(mapped_file)
    assert not module[0].weight.untyped_storage().resizable()
    del module
    mm = ManagedModel(
        lambda: _mapped_module(mapped_file), name="mapped", device="cpu", inference_mode=False
    )
    refs = _plant(mm, plant)
    report = mm.unload()
    assert not report.died
    assert all(ref.expired() for ref in refs), str(report)
    assert report.neutralised_bytes == 2 * (512 * 512 + 512) * 4
    assert report.held_bytes == 0
    assert "freed anyway" in str(report)


class KeepOutput(torch.autograd.Function):
    """A custom Function that saves its output, a view of its input (as some kernels do).

    Autograd keeps a saved output as a C++ copy of the tensor that Python
    never sees, so nothing but resizing could free its storage.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor) -> torch.Tensor:
        out = weight[:256]
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.cat([grad, torch.zeros_like(grad)])


def test_bytes_that_cannot_be_freed_are_reported_as_held(mapped_file: Path) -> None:
    mm = ManagedModel(
        lambda: _mapped_module(mapped_file), name="mapped", device="cpu", inference_mode=False
    )
    refs = _plant(mm, lambda m: KeepOutput.apply(m[0].weight) * 2)
    report = mm.unload()
    assert not report.died
    weight = 512 * 512 * 4
    assert report.held_bytes == weight  # mapped, and only C++ holds it
    assert report.neutralised_bytes == 0  # the rest died with the model
    assert sum(not ref.expired() for ref in refs) == 1
    text = str(report)
    assert "still held: 1.0 MiB on cpu: held from C++ and not resizable" in text, text
    assert "freed anyway" not in text


def test_a_clean_unload_skips_the_full_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    collections: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real(*a))
    mm = ManagedModel.from_torch(lambda: torch.nn.Linear(64, 64), device="cpu", name="clean")
    with mm.use():
        pass
    report = mm.unload()
    assert report.ok
    assert collections == []  # reference counting already freed it: no full collection


def test_a_cycle_is_collected_and_still_proven_dead() -> None:
    class Cyclic(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 64)
            self.me = [self]  # only the collector frees it

    mm = ManagedModel(Cyclic, name="cyclic", device="cpu")
    refs = _plant(mm, lambda m: None)
    report = mm.unload()
    assert report.ok, str(report)
    assert all(ref.expired() for ref in refs)


_RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from vramkit.model import ManagedModel
    from vramkit.devices import get_backend

    path = sys.argv[1]
    torch.manual_seed(0)
    save_file({f"w{i}": torch.randn(2048, 2048) for i in range(4)}, path)  # 64 MiB
    KEPT = []

    class Mapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, tensor in load_file(path).items():
                self.register_buffer(name, tensor)

    def rss():
        gc.collect()
        return get_backend("cpu").read(0).process_used_bytes

    baseline = rss()
    mm = ManagedModel(Mapped, name="big", device="cpu")
    with mm.use() as model:
        for buffer in model.buffers():
            buffer.sum()  # touch every page: mapped pages count once read
        KEPT.append(model.state_dict())
    del model
    loaded = rss()
    report = mm.unload()
    after = rss()
    print(json.dumps({
        "baseline": baseline, "loaded": loaded, "after": after,
        "neutralised": report.neutralised_bytes, "held": report.held_bytes,
        "died": report.died, "text": str(report),
    }))
    """
)


@pytest.mark.slow
def test_the_freed_figure_matches_rss_in_a_fresh_process(tmp_path: Path) -> None:
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    size = 64 * MiB
    assert figures["loaded"] - figures["baseline"] >= 0.9 * size  # the pages were resident
    assert not figures["died"]
    assert figures["neutralised"] == size
    assert figures["held"] == 0
    came_back = figures["loaded"] - figures["after"]
    assert abs(came_back - figures["neutralised"]) <= 0.1 * size, figures["text"]
