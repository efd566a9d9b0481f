r"""``ManagedModel``: the life of one model, from lazy load to a proven unload.

::

    UNLOADED --load--> LOADING --> READY <--lease/return--> (in use: leases > 0)
       ^                             |  \\--offload--> OFFLOADED (cpu / disk tier)
       |                             |                    |--wake--> READY
       +------ unload (no leases) ---+--------------------+

The package, room by room:

- :mod:`~vramkit.model.managed`: :class:`ManagedModel` itself, the life of one model
  as its users see it, each step documented;
- its base classes, each a room: ``_view`` what a model shows (its properties,
  status line and tier costs), ``_borrow`` how it lends itself out (leases, sync
  and async), ``_life`` how each step is done (load, wake, offload, unload),
  and ``_owner``'s ``Owned`` its owner and keep-alive expiry;
- :mod:`~vramkit.model.reports`: its state and what each load and unload reports;
- ``_lease``: the state machine (state, object, leases, under one lock; a lease
  on a ``READY`` model takes none), leases,
  the inference-mode guard, ``@mm.inference`` functions;
- ``_owner``: the contract with whoever owns the model (a pool): admission,
  its outcome, memory given back, the keep-alive thread;
- ``_parking``: the one record of where an offloaded model's weights are;
- ``_unload``: release and prove: weak references, survivors, holders, the driver wait;
- :mod:`~vramkit.model.tiers`: offload and wake of the weights (cpu and disk tiers),
  their reports, and what each tier would cost;
- ``_tierfile``: the disk tier's file format, folder and clean-up;
- ``_checks``, ``_loader`` and ``_isolated``: the checks of the constructors'
  arguments (the ``from_*`` ones included), of what a loader returns, and the
  loader of a model isolated in a worker process.

This package also publishes its live models for ``vramkit ps`` (see
:mod:`vramkit._runtime`).
"""

from __future__ import annotations

from typing import Any

from vramkit import _runtime
from vramkit.model.managed import ManagedModel, live_models
from vramkit.model.reports import LoadReport, ModelState, ModelStats, UnloadReport

__all__ = [
    "LoadReport",
    "ManagedModel",
    "ModelState",
    "ModelStats",
    "UnloadReport",
    "live_models",
]


def _published_state() -> dict[str, Any]:
    """What this process publishes for ``vramkit ps``: its models, and their pools' accounting."""
    models = [m for m in live_models() if not m.closed]
    pools = {id(m.pool): m.pool for m in models if m.pool is not None}
    return {
        "models": [m.to_dict() for m in models],
        # Each model has its own line, naming its pool: a pool's line leaves them out.
        "pools": [
            {k: v for k, v in pool.status().to_dict().items() if k != "models"}
            for pool in pools.values()
        ],
    }


_runtime.install(_published_state)
