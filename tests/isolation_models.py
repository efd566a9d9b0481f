"""Loaders that worker processes import by name in tests/test_isolation*.py."""

from __future__ import annotations

import os
import sys
import threading
import types
from typing import Any

import numpy as np
import torch
from torch import nn


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling passes one argument: fails
        super().__init__(f"{a} and {b}")


class Inspector(nn.Module):
    """Reports what its arguments looked like on arrival, and returns tensors and arrays."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 2)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
        self.scale = 2.0
        self.settings = {"language": "en", "beam": 4}
        self.guard = threading.Lock()  # cannot be pickled: stays in the worker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale  # type: ignore[no-any-return]

    def describe(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """How each argument arrived: its kind, and for tensors whether it is shared memory."""
        seen = []
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                seen.append(
                    {
                        "kind": "tensor",
                        "shared": value.is_shared(),
                        "dtype": str(value.dtype),
                        "sum": float(value.double().sum()),
                    }
                )
            elif isinstance(value, np.ndarray):
                seen.append(
                    {"kind": "ndarray", "dtype": str(value.dtype), "sum": float(value.sum())}
                )
            else:
                seen.append({"kind": type(value).__name__})
        return seen

    def ramp(self, n: int) -> torch.Tensor:
        """``arange(n)`` as float32: large results travel through shared memory."""
        return torch.arange(n, dtype=torch.float32)

    def audio(self, samples: int) -> np.ndarray[Any, Any]:
        """A float32 numpy array, as an audio pipeline returns."""
        return np.linspace(-1, 1, samples, dtype=np.float32)

    def double_inplace(self, x: torch.Tensor) -> None:
        """Write into the caller's tensor (it is shared memory, so the caller sees it)."""
        x.mul_(2)

    def itself(self) -> Inspector:
        return self

    def pid(self) -> int:
        return os.getpid()

    def raise_unpicklable(self) -> None:
        raise _Unpicklable(1, 2)

    def only_here(self) -> object:
        """An instance of a class from a module that exists in this process only."""
        module = types.ModuleType("vk_worker_only")
        exec("class Thing:\n    pass\n", module.__dict__)
        sys.modules[module.__name__] = module
        return module.Thing()


def inspector() -> Inspector:
    return Inspector()


def failing_loader() -> None:
    raise FileNotFoundError("no weights at /nowhere/model.pt")


SHARED = nn.Linear(4, 2)


def shared() -> nn.Module:
    """A module-level model, the same object at each call: the loader contract's owns=False case."""
    return SHARED
