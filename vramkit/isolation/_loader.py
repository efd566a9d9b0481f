"""The loader an isolated ``ManagedModel`` runs: start a worker, return its proxy."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from vramkit.isolation._proxy import WorkerProxy
from vramkit.isolation._spec import Isolation, WorkerSpec
from vramkit.isolation._worker import Worker

if TYPE_CHECKING:
    from vramkit.errors import WorkerCrashedError

__all__ = ["IsolatedLoader"]


class IsolatedLoader:
    """Starts a worker process that builds the model, and returns a :class:`WorkerProxy`.

    Everything the worker needs is checked when this is made, so a loader that
    cannot reach a worker (a lambda, a nested function) fails at construction
    rather than at first use.

    Args:
        builder: What the worker builds its model with (``ManagedModel``).
        loader: A picklable zero-argument callable, or an import path
            ``"package.module:function"``.
        name: The model's name (default: the loader's).
        device: Its device, as torch writes it.
        options: How the worker is run and ended.
        worker_options: Options for the worker's own ``ManagedModel``
            (``inference_mode``, ``adapter``, ``release``, ``size``, ``offload_dir``).
        on_crash: Called with the proxy and the error when a worker dies
            without being stopped (the owning model becomes ``UNLOADED``).

    Raises:
        InvalidArgumentError: Something the worker needs cannot be sent to it.
    """

    def __init__(
        self,
        builder: Callable[..., Any],
        loader: Callable[[], Any] | str,
        *,
        name: str | None,
        device: str,
        options: Isolation,
        worker_options: Mapping[str, Any] | None = None,
        on_crash: Callable[[WorkerProxy, WorkerCrashedError], object] | None = None,
    ) -> None:
        name = name or _loader_name(loader)
        self.spec = WorkerSpec(builder, loader, name, device, dict(worker_options or {}))
        self.spec.check()
        self.options = options
        self._on_crash = on_crash

    @property
    def __name__(self) -> str:
        """The model's name (what ``ManagedModel`` takes when given none)."""
        return self.spec.name

    def __call__(self) -> WorkerProxy:
        """Start a worker, wait until its model is loaded, and return a proxy to it."""
        worker = Worker(self.spec, self.options)
        worker.start()
        proxy = WorkerProxy(worker)
        on_crash = self._on_crash
        if on_crash is not None:
            # Weakly: the callback must not keep the proxy (the loaded object)
            # alive after the model drops it.
            ref = weakref.ref(proxy)

            def crashed(_: Worker, error: WorkerCrashedError) -> None:
                alive = ref()
                if alive is not None:
                    on_crash(alive, error)

            worker.on_exit(crashed)
        return proxy

    def __repr__(self) -> str:
        return f"<isolated loader {self.spec.loader!r} for {self.spec.name!r}>"


def _loader_name(loader: Callable[[], Any] | str) -> str:
    if isinstance(loader, str):
        return loader.rpartition(":")[2].rpartition(".")[2]
    name = str(getattr(loader, "__name__", "") or getattr(loader, "func", type(loader)).__name__)
    return "model" if name == "<lambda>" else name
