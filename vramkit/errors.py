"""Errors raised by vramkit.

Every error vramkit raises on purpose derives from :class:`VramkitError`, and
where a builtin exception means the same thing the error derives from that too,
so existing ``except`` clauses keep working::

    VramkitError(Exception)
    ├── InvalidArgumentError(ValueError, TypeError)   bad input, caught at the call
    │   └── UnknownModelError(KeyError)               no model of that name in the pool
    ├── ModelStateError(RuntimeError)                 operation not allowed in this state
    │   ├── ModelBusyError                            leases are out; cannot unload now
    │   └── WorkerCrashedError                        an isolated model's worker process died
    │       └── WorkerTimeoutError(TimeoutError)      a call got no reply in time; worker killed
    ├── BudgetExceededError(RuntimeError)             a memory budget cannot make room
    ├── OutOfMemoryError(MemoryError)                 the device ran out even after recovery
    ├── OffloadError(OSError)                         an offload tier could not be written
    ├── VramLeakError(AssertionError)                 memory did not come back
    ├── DeviceUnavailableError(RuntimeError)          no such device on this machine
    ├── MissingDependencyError(ImportError)           an optional extra is not installed
    └── MissingModelError(FileNotFoundError)          a hub model is not in the local cache

    VramLeakWarning(ResourceWarning)                  memory did not come back (a warning)

Foreign errors (torch, ONNX Runtime, the OS) are translated at vramkit's
boundary with ``raise ... from exc``, so the original stays on ``__cause__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BudgetExceededError",
    "DeviceUnavailableError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "MissingModelError",
    "ModelBusyError",
    "ModelStateError",
    "OffloadError",
    "OutOfMemoryError",
    "UnknownModelError",
    "VramLeakError",
    "VramLeakWarning",
    "VramkitError",
    "WorkerCrashedError",
    "WorkerTimeoutError",
]


class VramkitError(Exception):
    """Base class of every error vramkit raises on purpose."""


class InvalidArgumentError(VramkitError, ValueError, TypeError):
    """An argument has the wrong type or value.

    It is both a :class:`ValueError` and a :class:`TypeError` so that callers
    catching either builtin keep working; the message names what was expected.
    """


class UnknownModelError(InvalidArgumentError, KeyError):
    """A pool was asked for a model name it does not have; the message lists the names it has."""

    def __str__(self) -> str:
        # KeyError quotes its argument; this message is a sentence.
        return str(self.args[0]) if self.args else ""


class ModelStateError(VramkitError, RuntimeError):
    """The operation is not allowed in the model's (or pool's) current state."""


class ModelBusyError(ModelStateError):
    """A model cannot be unloaded or offloaded because leases are still out."""


class WorkerCrashedError(ModelStateError):
    """The worker process of an isolated model died (segfault, ``os._exit``, OOM kill, SIGKILL).

    Calls that were in flight fail with it; the model is ``UNLOADED`` and its
    next use starts a new worker.

    Attributes:
        model: The model's name.
        pid: The worker's process id.
        exitcode: Its exit status, or ``None`` when it was ended by a signal
            (or could not be reaped).
        signal: The number of the signal that ended it, or ``None``.
        log_lines: The last lines it wrote to stdout and stderr (a segfault's
            Python traceback among them), oldest first.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        pid: int | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
        log_lines: tuple[str, ...] = (),
    ) -> None:
        """Build the error; the message already says how the worker ended."""
        super().__init__(message)
        self.model = model
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.log_lines = log_lines


class WorkerTimeoutError(WorkerCrashedError, TimeoutError):
    """An isolated model's call got no reply within its ``timeout``; the worker was killed.

    A worker that does not answer is in an unknown state (hung in native code,
    deadlocked, swapping), so vramkit ends it rather than queue more calls
    behind it. A :class:`TimeoutError`, so ``except TimeoutError`` catches it.
    """


class BudgetExceededError(VramkitError, RuntimeError):
    """A memory budget cannot make room for a model; the message says who holds what."""


class OutOfMemoryError(VramkitError, MemoryError):
    """A device ran out of memory and vramkit's recovery (cleanup, eviction, retry) did not help.

    The allocator's own error (``torch.OutOfMemoryError``, ONNX Runtime's
    allocation failure, ``DefaultCPUAllocator: can't allocate memory``) is on
    ``__cause__``, and its text is repeated in the message so tools that
    recognise OOM by message keep working.
    """


class OffloadError(VramkitError, OSError):
    """An offload tier could not be written (disk full, unwritable or untrusted cache directory).

    ``errno`` is the operating system's error number when the OS refused
    (``errno.ENOSPC`` for a full disk, ``errno.EFBIG`` past a file-size
    limit), so handlers written for ``OSError`` keep working; ``None`` when
    vramkit itself refused (a directory it does not trust).
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        """Build the error.

        Args:
            message: What failed and what state the model is in.
            errno: The OS error number behind it, if any.
        """
        super().__init__(message)
        # Set after the constructor: passed to it, OSError would print
        # "[Errno 28] ..." instead of the message.
        self.errno = errno

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep errno across pickling (multiprocessing, worker processes).
        return (type(self), (str(self),), {"errno": self.errno})


class VramLeakError(VramkitError, AssertionError):
    """Memory did not come back: a leak check failed or an object survived unloading.

    An :class:`AssertionError`, so test runners report it as a failed assertion.
    """


class DeviceUnavailableError(VramkitError, RuntimeError):
    """The requested device does not exist on this machine or its backend is missing."""


class MissingDependencyError(VramkitError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        """Build the error.

        Args:
            package: The import name that failed, such as ``"onnxruntime"``.
            extra: The vramkit extra that installs it, such as ``"onnx"``.
            purpose: What needed it, such as ``"ManagedModel.from_onnx"``.
        """
        super().__init__(
            f"{purpose} needs the {package!r} package, which is not installed; "
            f'install it with: pip install "vramkit[{extra}]"',
            name=package,
        )
        self.package = package
        self.extra = extra


class MissingModelError(VramkitError, FileNotFoundError):
    """A model named by its hub id is not in the local cache.

    vramkit never downloads: a reload must not depend on the network. The
    message names the id and the cache directory searched, and how to fill it.
    """


class VramLeakWarning(ResourceWarning):
    """Memory did not come back, reported as a warning.

    Issued by ``leak_check="warn"``, and for an ``"unverified"`` verdict (the
    allocator shows growth the driver does not confirm) whatever ``leak_check``
    says, since that case may be the allocator's bookkeeping rather than a leak.
    """
