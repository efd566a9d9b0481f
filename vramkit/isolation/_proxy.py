"""What the caller holds instead of the model: a proxy that forwards to the worker.

``model(x)`` and ``model.generate(input=audio, hotword="...")`` run in the
worker; arguments and results travel pickled (tensors and large numpy arrays
through shared memory). Reading an attribute returns a copy of its value,
except for methods, submodules and anything that cannot be pickled: those stay
in the worker, and the read returns another proxy for them, so
``model.encoder(x)`` works too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from vramkit.errors import InvalidArgumentError
from vramkit.isolation._child import ROOT, Remote

if TYPE_CHECKING:
    from vramkit.isolation._worker import Worker

__all__ = ["WorkerProxy", "call_timeout", "worker_pid"]

Path = tuple[tuple[str, Any], ...]
_DEFAULT: Final[Any] = object()


class WorkerProxy:
    """Stands for a model (or a part of it) that lives in a worker process.

    Calls, attribute reads and writes, ``proxy[key]`` and ``len(proxy)`` run in
    the worker. Values come back as copies (tensors share memory with the
    worker's results instead); a proxy is never pickled or copied itself.
    After the model is unloaded a kept proxy raises
    :class:`~vramkit.ModelStateError`; after a crash,
    :class:`~vramkit.WorkerCrashedError`.
    """

    __slots__ = ("__weakref__", "_vk_path", "_vk_timeout", "_vk_worker")

    def __init__(self, worker: Worker, path: Path = (), timeout: Any = _DEFAULT) -> None:
        object.__setattr__(self, "_vk_worker", worker)
        object.__setattr__(self, "_vk_path", path)
        object.__setattr__(
            self, "_vk_timeout", worker.options.call_timeout if timeout is _DEFAULT else timeout
        )

    def _vk_request(self, op: str, *payload: Any) -> Any:
        return self._vk_worker.request(op, payload, timeout=self._vk_timeout)

    def _vk_child(self, path: Path) -> WorkerProxy:
        return WorkerProxy(self._vk_worker, path, self._vk_timeout)

    def _vk_value(self, reply: Any, path: Path) -> Any:
        if reply is ROOT:
            return self._vk_child(())
        if isinstance(reply, Remote):
            self._vk_worker.remote_paths.add(path)
            return self._vk_child(path)
        return reply

    def _vk_get(self, step: tuple[str, Any]) -> Any:
        path = (*self._vk_path, step)
        if path in self._vk_worker.remote_paths:
            return self._vk_child(path)  # a method seen before: no round trip
        return self._vk_value(self._vk_request("get", path), path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            # Protocol probes (copy, pickle, numpy, IPython) must not reach the worker.
            raise AttributeError(name)
        return self._vk_get(("attr", name))

    def __setattr__(self, name: str, value: Any) -> None:
        self._vk_request("set", self._vk_path, ("attr", name), value)

    def __getitem__(self, key: Any) -> Any:
        return self._vk_get(("item", key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._vk_request("set", self._vk_path, ("item", key), value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._vk_value(self._vk_request("call", self._vk_path, args, kwargs), ())

    def __len__(self) -> int:
        return int(self._vk_request("len", self._vk_path))

    def __dir__(self) -> list[str]:
        return list(self._vk_request("dir", self._vk_path))

    def __bool__(self) -> bool:
        return True  # a reference, not a container: never ask the worker

    def __repr__(self) -> str:
        worker = self._vk_worker
        kind = str(worker.info.get("type", "object")).rpartition(".")[2]
        where = "".join(f".{k}" if t == "attr" else f"[{k!r}]" for t, k in self._vk_path)
        return (
            f"<WorkerProxy {kind}{where} of {worker.name!r} in worker pid {worker.pid} "
            f"({worker.state.value})>"
        )

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(
            f"a WorkerProxy of {self._vk_worker.name!r} cannot be pickled or copied: it stands "
            "for an object in a worker process; pass the values you need instead"
        )


def _check_proxy(proxy: object) -> WorkerProxy:
    if not isinstance(proxy, WorkerProxy):
        raise InvalidArgumentError(
            f"expected the proxy an isolated model lends (`with mm.use() as model:`); got {proxy!r}"
        )
    return proxy


def call_timeout(proxy: WorkerProxy, seconds: float | None) -> WorkerProxy:
    """The same proxy with a different per-call time limit.

    A call that gets no reply within ``seconds`` kills the worker (it is hung
    or lost) and raises :class:`~vramkit.WorkerTimeoutError`; the model is
    then ``UNLOADED`` and its next use starts a new worker.

    Args:
        proxy: What ``mm.use()`` lent, or a part of it (``model.generate``).
        seconds: The limit for calls made through the returned proxy
            (``None``: none).

    Returns:
        A proxy for the same object with that limit.

    Raises:
        InvalidArgumentError: ``proxy`` is not a :class:`WorkerProxy`, or
            ``seconds`` is not a number >= 0 or ``None``.
    """
    found = _check_proxy(proxy)
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0
    ):
        raise InvalidArgumentError(f"seconds must be >= 0 or None; got {seconds!r}")
    worker: Worker = object.__getattribute__(found, "_vk_worker")
    path: Path = object.__getattribute__(found, "_vk_path")
    return WorkerProxy(worker, path, seconds)


def worker_pid(proxy: WorkerProxy) -> int:
    """The process id of the worker behind ``proxy`` (what ``nvidia-smi`` and ``ps`` show).

    Raises:
        InvalidArgumentError: ``proxy`` is not a :class:`WorkerProxy`.
    """
    worker: Worker = object.__getattribute__(_check_proxy(proxy), "_vk_worker")
    return worker.pid


def worker_of(proxy: WorkerProxy) -> Worker:
    """The :class:`~vramkit.isolation._worker.Worker` behind ``proxy``."""
    worker: Worker = object.__getattribute__(_check_proxy(proxy), "_vk_worker")
    return worker
