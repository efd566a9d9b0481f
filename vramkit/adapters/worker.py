"""A model in a worker process (``isolate=True``): measured, offloaded and released as a process.

The loaded object is a :class:`vramkit.isolation.WorkerProxy`. Its size is
what the worker process holds on the model's device as the driver sees it
(NVML's per-process usage on CUDA, the CUDA context included; the resident
set size on ``cpu``); releasing it ends the process; the proof is the
process gone and its memory with it. The offload tiers run inside the worker,
which keeps its CUDA context, so waking is fast.

The adapter reaches the worker through the proxy's handle, by duck typing,
so that this layer does not import :mod:`vramkit.isolation`, which sits above it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from vramkit.adapters._base import AdapterBase, type_path
from vramkit.errors import ModelStateError

__all__ = ["WorkerAdapter", "WorkerHandle"]

_PROXY = "vramkit.isolation._proxy.WorkerProxy"
_DRIVER_POLL = 0.25


class WorkerHandle(Protocol):
    """What the adapter needs of a worker (``vramkit.isolation._worker.Worker`` answers it)."""

    @property
    def pid(self) -> int:
        """The worker's process id."""
        ...

    def used_bytes(self) -> int | None:
        """Bytes the process holds on its device per the driver (RSS on cpu); 0 once gone."""
        ...

    def request(self, op: str, payload: Any, *, timeout: float | None = None) -> Any:
        """Run one request in the worker and return its reply."""
        ...

    def stop(self) -> Any:
        """End the process (graceful, then terminate, then kill); its report has ``gone``."""
        ...


def handle_of(proxy: object) -> WorkerHandle:
    """The worker behind a proxy (its slot, read without going through its forwarding)."""
    handle: WorkerHandle = object.__getattribute__(proxy, "_vk_worker")
    return handle


class WorkerAdapter(AdapterBase):
    """Objects that live in a worker process, reached through a ``WorkerProxy``.

    Args:
        driver_wait: Seconds to wait, after the process ended, for the driver
            to stop listing its memory (NVML can lag a process's exit).
    """

    name = "worker"

    def __init__(self, driver_wait: float = 5.0) -> None:
        self._driver_wait = driver_wait

    def matches(self, obj: object) -> bool:
        """Worker proxies (matched by type name: nothing here imports the isolation package)."""
        return type_path(obj) == _PROXY

    def size_bytes(self, obj: object) -> int | None:
        """Bytes the worker process holds on its device, per the driver (or its RSS on cpu)."""
        return handle_of(obj).used_bytes()

    def release(self, obj: object) -> Mapping[str, int | None]:
        """End the worker process, then wait (bounded) for the driver to show it gone.

        Returns:
            ``{"worker": bytes}``: what the process held on the device before
            it ended, all of it returned, since the process no longer exists.

        Raises:
            ModelStateError: The process is still there after ``SIGKILL``.
        """
        handle = handle_of(obj)
        before = handle.used_bytes()
        report = handle.stop()
        if not report.gone:
            raise ModelStateError(
                f"worker process {handle.pid} did not exit even after SIGKILL "
                "(stuck in the kernel?); its memory is not back"
            )
        left = self._await_driver(handle)
        returned = None if before is None or left is None else before - left
        return {"worker": returned}

    def _await_driver(self, handle: WorkerHandle) -> int | None:
        """What the driver still lists for the ended process, once that is nothing (bounded)."""
        deadline = time.monotonic() + self._driver_wait
        left = handle.used_bytes()
        while left and time.monotonic() < deadline:
            time.sleep(_DRIVER_POLL)
            left = handle.used_bytes()
        return left

    def offload_in_place(self, obj: object, tier: str) -> tuple[int, str]:
        """Offload inside the worker (its own ``ManagedModel`` does it; the process stays).

        Returns:
            The bytes moved and a note saying how the worker did it.
        """
        report = handle_of(obj).request("offload", (tier,))
        return int(report.weight_bytes), f"in its worker process: {report}"

    def wake_in_place(self, obj: object) -> None:
        """Wake inside the worker."""
        handle_of(obj).request("wake", ())

    def tensors(self, obj: object) -> Sequence[Any]:
        """None here: the weights live in the worker."""
        return ()
