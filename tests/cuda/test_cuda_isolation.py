"""Isolated models on a real GPU. Skipped where torch.cuda.is_available() is False.

The reason isolation exists: the CUDA context (hundreds of MiB per process)
comes back only when the process ends. Each check runs in a fresh interpreter,
so that the caller's own context (or its absence) is this test's alone.
"""

from __future__ import annotations

import json

import pytest

from ..helpers import run_python

pytestmark = pytest.mark.cuda

MiB = 1024**2


def test_the_worker_context_comes_back_and_the_caller_never_opens_one() -> None:
    out = run_python(
        """
        import functools, json, os, torch, vramkit
        from vramkit.devices import _nvml
        from vramkit.isolation import worker_pid

        mm = vramkit.ManagedModel.from_torch(
            functools.partial(torch.nn.Linear, 4096, 4096), device="cuda:0", isolate=True
        )
        with mm.use() as model:
            pid = worker_pid(model)
            text = model.extra_repr()  # runs there; a string comes back, no CUDA here
        del model
        held = _nvml.process_used(0, pid)
        report = mm.unload()
        print(json.dumps({
            "text": text,
            "caller_initialized": torch.cuda.is_initialized(),
            "caller_nvml": _nvml.process_used(0),
            "size": mm.size_bytes,
            "held": held,
            "left": _nvml.process_used(0, pid),
            "worker_freed": report.freed_bytes.get("worker"),
            "used_freed": report.freed_bytes.get("used"),
            "died": report.died,
            "gone": not os.path.exists(f"/proc/{pid}"),
        }))
        """,
        timeout=600,
    )
    data = json.loads(out.splitlines()[-1])
    assert "in_features=4096" in data["text"]
    assert data["caller_initialized"] is False  # the caller never touched CUDA
    assert data["caller_nvml"] in (0, None)
    assert data["died"] and data["gone"]
    if data["held"] is not None:  # NVML answers per process here
        # 64 MiB of weights plus the context: the size is what nvidia-smi shows.
        assert data["held"] >= 64 * MiB + 100 * MiB
        assert data["size"] >= 64 * MiB + 100 * MiB
        assert data["left"] == 0
        assert data["worker_freed"] >= 64 * MiB + 100 * MiB
    # The device as a whole got the worker's memory back, context included.
    assert data["used_freed"] is not None
    assert data["used_freed"] >= 64 * MiB + 100 * MiB


def test_cuda_tensors_cross_by_ipc_and_outlive_the_worker() -> None:
    out = run_python(
        """
        import functools, json, torch, vramkit

        mm = vramkit.ManagedModel.from_torch(
            functools.partial(torch.nn.Linear, 1024, 1024), device="cuda:0", isolate=True
        )
        x = torch.randn(8, 1024, device="cuda:0")
        with mm.use() as model:
            weight, bias = model.weight, model.bias  # CUDA values, copied here on arrival
            y = model(x)  # a CUDA argument there (Linear refuses any other), a CUDA result back
        del model
        expected = torch.nn.functional.linear(x, weight, bias)
        report = mm.unload()  # the worker and its allocations are gone...
        torch.cuda.synchronize()
        print(json.dumps({
            "device": str(y.device),
            "weight_device": str(weight.device),
            "close": bool(torch.allclose(y, expected, atol=1e-4)),  # ...and y is still ours
            "died": report.died,
        }))
        """,
        timeout=600,
    )
    data = json.loads(out.splitlines()[-1])
    assert data["device"] == "cuda:0" and data["weight_device"] == "cuda:0"
    assert data["close"] is True
    assert data["died"] is True
