"""The loader of an isolated model: what ``ManagedModel(isolate=...)`` hands its life.

An isolated model's loader starts a worker process that builds its own,
in-process ``ManagedModel`` from the caller's loader and options; the caller's
model then holds a :class:`~vramkit.isolation.WorkerProxy`. This module turns
the constructor's arguments into that loader, so the constructor only decides
whether to isolate.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from vramkit.devices import DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError
from vramkit.isolation import Isolation
from vramkit.isolation._loader import IsolatedLoader
from vramkit.isolation._spec import isolation_options

__all__ = ["isolated_loader"]


def isolated_loader(
    builder: type,
    loader: object,
    *,
    name: str | None,
    device: DeviceLike | None,
    isolate: bool | Isolation,
    on_lost: Callable[[object, BaseException], None],
    **worker_options: Any,
) -> Callable[[], Any]:
    """A loader that runs ``loader`` in a worker, which builds ``builder(loader, **options)``.

    Args:
        builder: The model class the worker builds (``ManagedModel``).
        loader: The caller's loader: a picklable callable or ``"package.module:function"``.
        name: The model's name, or ``None`` to name it after the loader.
        device: Where the worker loads it.
        isolate: ``True`` or an :class:`~vramkit.isolation.Isolation` with time bounds.
        on_lost: A bound method called with the proxy and the error when the
            worker dies on its own; held weakly, so the worker's monitor never
            keeps the model alive.
        **worker_options: The model options that go to the worker; ``None``
            values are left out (the worker's defaults apply).

    Raises:
        InvalidArgumentError: ``loader`` is neither callable nor an import path.
    """
    options = isolation_options(isolate)
    assert options is not None
    if not (callable(loader) or isinstance(loader, str)):
        raise InvalidArgumentError(
            "loader must be a zero-argument callable or an import path "
            f"'package.module:function'; got {loader!r}"
        )
    lost = weakref.WeakMethod(on_lost)

    def crashed(proxy: object, error: BaseException) -> None:
        method = lost()
        if method is not None:
            method(proxy, error)

    return IsolatedLoader(
        builder,
        loader,
        name=name,
        device=str(resolve_device(device)),
        options=options,
        worker_options={k: v for k, v in worker_options.items() if v is not None},
        on_crash=crashed,
    )
