"""What a worker process is told to build, and the options that bound its life."""

from __future__ import annotations

import importlib
import math
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vramkit.errors import InvalidArgumentError

__all__ = ["Isolation", "WorkerSpec", "check_sendable", "isolation_options", "resolve_loader"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class Isolation:
    """How an isolated model's worker process is run and ended.

    ``isolate=True`` means ``Isolation()``; pass an instance to change a bound.

    Attributes:
        call_timeout: Seconds a call may wait for the worker's reply (``None``:
            no limit). A worker that does not answer in time is killed and the
            call raises :class:`~vramkit.WorkerTimeoutError`; per call,
            :func:`vramkit.isolation.call_timeout` overrides it.
        start_timeout: Seconds from starting the worker to its model being
            loaded (``None``, the default: no limit, as for an in-process
            load); past it the worker is killed.
        stop_timeout: Seconds an unload waits for the worker to exit by itself.
        terminate_timeout: Then seconds to wait after ``SIGTERM``.
        kill_timeout: Then seconds to wait after ``SIGKILL``.
        log_lines: How many of the worker's last output lines to keep for
            :class:`~vramkit.WorkerCrashedError`.

    Example:
        >>> from vramkit.isolation import Isolation
        >>> Isolation(call_timeout=30).stop_timeout
        10.0
    """

    call_timeout: float | None = None
    start_timeout: float | None = None
    stop_timeout: float = 10.0
    terminate_timeout: float = 5.0
    kill_timeout: float = 5.0
    log_lines: int = 100

    def __post_init__(self) -> None:
        for label in ("call_timeout", "start_timeout"):
            value = getattr(self, label)
            if value is not None:
                _check_seconds(label, value)
        for label in ("stop_timeout", "terminate_timeout", "kill_timeout"):
            _check_seconds(label, getattr(self, label))
            object.__setattr__(self, label, float(getattr(self, label)))
        if isinstance(self.log_lines, bool) or not isinstance(self.log_lines, int):
            raise InvalidArgumentError(f"log_lines must be an int >= 0; got {self.log_lines!r}")
        if self.log_lines < 0:
            raise InvalidArgumentError(f"log_lines must be an int >= 0; got {self.log_lines!r}")


def _check_seconds(label: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value < 0
    ):
        raise InvalidArgumentError(f"{label} must be seconds >= 0; got {value!r}")


def isolation_options(isolate: object) -> Isolation | None:
    """``isolate=`` as options: ``None`` when not isolated.

    Raises:
        InvalidArgumentError: ``isolate`` is neither a bool nor an
            :class:`Isolation`, or this is Windows (the transport passes file
            descriptors over Unix sockets).
    """
    if isolate is False or isolate is None:
        return None
    if isolate is not True and not isinstance(isolate, Isolation):
        raise InvalidArgumentError(
            f"isolate must be True, False or a vramkit.isolation.Isolation; got {isolate!r}"
        )
    if sys.platform == "win32":
        raise InvalidArgumentError(
            "isolate=True needs a POSIX system (Linux or macOS): workers receive shared "
            "memory as file descriptors over Unix sockets"
        )
    return Isolation() if isolate is True else isolate


def check_sendable(value: object, what: str) -> None:
    """Raise unless ``value`` can be sent to a worker process (pickled, and found there).

    Args:
        value: A loader (a callable or an import path ``"pkg.module:function"``)
            or an option the worker needs.
        what: Its name for the message, such as ``"loader"`` or ``"release"``.

    Raises:
        InvalidArgumentError: It cannot be pickled (a lambda, a nested
            function, an object holding a lock or an open file), it lives in an
            interactive ``__main__`` a worker cannot import, or an import path is
            malformed.
    """
    if isinstance(value, str):
        if not _IMPORT_PATH.match(value):
            raise InvalidArgumentError(
                f"{what} {value!r} is not an import path; expected 'package.module:function'"
            )
        return
    fix = (
        f"with isolate=True the {what} runs in a worker process, so it must be picklable: "
        "define it with `def` at module level (not a lambda or a nested function), use "
        "functools.partial for its arguments, or pass an import path such as "
        "'myapp.models:build_asr'"
    )
    if getattr(value, "__module__", None) == "__main__" and not hasattr(
        sys.modules.get("__main__"), "__file__"
    ):
        raise InvalidArgumentError(
            f"{what} {value!r} is defined in an interactive session, which a worker process "
            f"cannot import; {fix}"
        )
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise InvalidArgumentError(
            f"{what} {value!r} cannot be sent to a worker process ({type(exc).__name__}: "
            f"{exc}); {fix}"
        ) from exc


def resolve_loader(loader: Callable[[], Any] | str) -> Callable[[], Any]:
    """The loader itself, or the callable an import path ``"pkg.module:function"`` names.

    Raises:
        InvalidArgumentError: The path names something that is not callable.
        ImportError: The module cannot be imported.
        AttributeError: The module has no such attribute.
    """
    if not isinstance(loader, str):
        return loader
    module_name, _, attribute = loader.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise InvalidArgumentError(f"loader {loader!r} names {found!r}, which is not callable")
    return found  # type: ignore[no-any-return]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds: ``builder(loader, name=..., device=..., **options)``.

    The builder is :class:`vramkit.ManagedModel` itself, pickled by reference:
    the worker's own ``ManagedModel`` runs the calls (leases, inference mode),
    the offload tiers and the adapter's release, exactly as an in-process
    model would, while the caller's model holds a proxy to it. (Passing the
    class keeps this package free of an import of the model layer, which
    imports it.)

    Attributes:
        builder: Makes the worker's model; called in the worker.
        loader: A picklable zero-argument callable, or an import path.
        name: The model's name.
        device: The device, as torch writes it (``"cuda:0"``, ``"cpu"``).
        options: Keyword arguments for ``builder``.
    """

    builder: Callable[..., Any]
    loader: Callable[[], Any] | str
    name: str
    device: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`InvalidArgumentError` unless everything here can reach a worker."""
        check_sendable(self.loader, "loader")
        for key, value in self.options.items():
            check_sendable(value, key)

    def build(self) -> Any:
        """Make the worker's model (in the worker; nothing loads yet)."""
        return self.builder(
            resolve_loader(self.loader), name=self.name, device=self.device, **self.options
        )
