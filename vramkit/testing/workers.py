"""Models that misbehave on purpose, for testing isolation (``isolate=True``).

They are meant to run in a worker process: :class:`FaultyModel` can segfault,
exit or hang on request, and :class:`NativeLeak` leaks native memory on every
call, the kind of leak only ending the process can return.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from typing import Any

import torch
from torch import nn

__all__ = ["FaultyModel", "NativeLeak", "faulty_model", "native_leak"]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return libc


class NativeLeak:
    """Calling it leaks ``leak_bytes`` through ``malloc``, written to so it is resident.

    Nothing in Python refers to the memory: no ``gc``, no ``malloc_trim`` and
    no unload inside the process can give it back.

    Args:
        leak_bytes: Bytes leaked per call.

    Attributes:
        leaked_bytes: Bytes leaked so far.
    """

    def __init__(self, leak_bytes: int) -> None:
        self.leak_bytes = int(leak_bytes)
        self.leaked_bytes = 0
        self._libc = _libc()

    def __call__(self, *args: Any) -> int:
        """Leak ``leak_bytes`` more; returns the bytes leaked so far."""
        address = self._libc.malloc(self.leak_bytes)
        if not address:
            raise MemoryError(f"malloc({self.leak_bytes}) failed")
        self._libc.memset(address, 1, self.leak_bytes)
        self.leaked_bytes += self.leak_bytes
        return self.leaked_bytes


def native_leak(leak_bytes: int = 32 << 20) -> NativeLeak:
    """A :class:`NativeLeak` of ``leak_bytes`` per call (32 MiB by default)."""
    return NativeLeak(leak_bytes)


class FaultyModel(nn.Module):
    """A small linear model whose methods crash, exit or hang its process on request.

    ``model(x)`` is an ``nn.Linear(4, 2)``; :meth:`segfault` reads address 0,
    :meth:`exit` calls ``os._exit``, :meth:`hang` sleeps, :meth:`fail` raises.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear layer."""
        return self.linear(x)  # type: ignore[no-any-return]

    def segfault(self) -> None:
        """Dereference a null pointer: the process dies of ``SIGSEGV``."""
        print("about to read address 0", flush=True)
        ctypes.string_at(0)

    def exit(self, status: int = 3) -> None:
        """End the process at once with ``status``, as native code calling ``exit`` would."""
        print(f"exiting with status {status}", flush=True)
        os._exit(status)

    def hang(self, seconds: float = 3600.0) -> None:
        """Do nothing for ``seconds``: a call that never answers."""
        time.sleep(seconds)

    def ignore_sigterm(self) -> None:
        """Ignore ``SIGTERM`` from now on, as a process stuck in some native code does."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def fail(self, message: str = "failed on purpose") -> None:
        """Raise ``ValueError(message)``."""
        raise ValueError(message)

    def pid(self) -> int:
        """The id of the process the model runs in."""
        return os.getpid()

    def disarm_parent_death_signal(self) -> None:
        """Cancel ``PR_SET_PDEATHSIG`` (Linux): only the lifeline pipe ends the worker then.

        For testing that the pipe alone suffices where the signal does not exist.
        """
        ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, 0


def faulty_model() -> FaultyModel:
    """A :class:`FaultyModel`."""
    return FaultyModel()
