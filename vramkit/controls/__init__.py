"""Memory controls for services and UIs: status, free, clear cache, unload, offload, wake.

An HTTP admin API, a web panel and a maintenance script must do the same
operations with the same results, and write them to the same log. This module
is that one layer, in plain Python: :class:`Controls` works over given pools
and models (or every one alive in the process), each operation runs
synchronously and returns an :class:`Operation` saying what came back, in
bytes, and :class:`OperationLog` keeps the recent ones. A busy model is an
outcome, never an exception and never a wait.

>>> import torch, vramkit
>>> from vramkit.controls import Controls
>>> pool = vramkit.ModelPool("cpu", budget="64MiB", headroom=0, name="doc")
>>> _ = pool.register("small", lambda: torch.nn.Linear(64, 64))
>>> controls = Controls(pool)
>>> with pool.use("small"):
...     controls.unload("small", caller="doc").outcome
'busy'
>>> controls.unload("small", caller="doc").outcome
'ok'
>>> pool.close()

:func:`watch` adds the two automations Fun-ASR WebUI's documentation asks
for: an alert when a device crosses a fraction of its memory, and a cleanup
on a timer.
"""

from __future__ import annotations

from vramkit import _runtime
from vramkit.controls._controls import ACTIONS, Controls, watch
from vramkit.controls._operations import OUTCOMES, Operation, OperationLog, memory_line
from vramkit.controls._watch import Watch, live_watches
from vramkit.errors import InvalidArgumentError

__all__ = [
    "ACTIONS",
    "OUTCOMES",
    "Controls",
    "Operation",
    "OperationLog",
    "Watch",
    "advertise_admin_url",
    "live_watches",
    "memory_line",
    "watch",
]


def advertise_admin_url(url: str | None) -> None:
    """Publish where this process's admin API answers, for ``vramkit ps`` and ``vramkit free``.

    Every process that uses vramkit publishes its models to a per-user
    runtime directory; this adds the URL of its admin API (``None``
    withdraws it). :mod:`vramkit.integrations.http` calls it for you.

    Args:
        url: Such as ``"http://127.0.0.1:8000/admin"``, or ``None``.

    Raises:
        InvalidArgumentError: ``url`` is not an ``http://`` or ``https://`` URL.
    """
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise InvalidArgumentError(f"url must be an http:// or https:// URL, or None; got {url!r}")
    _runtime.advertise_admin(url)
