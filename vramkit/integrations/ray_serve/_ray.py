"""Where vramkit meets Ray Serve: its imports, two hooks of Ray 2.60, the replica, the metrics.

Every Ray import of the package goes through here, so a missing ``ray`` extra
is named once (:class:`~vramkit.MissingDependencyError`). The rest is what a
replica tells Serve: the model ids it holds, its free budget under
:data:`FREE_BYTES_STAT`, and Ray's own multiplexing metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vramkit import MissingDependencyError, PoolStatus, events

try:
    from ray import serve

    # The router's base classes, imported here (``as``: for _router) so that this
    # one guard names the missing extra for every Ray import of the package.
    from ray.serve.request_router import FIFOMixin as FIFOMixin
    from ray.serve.request_router import MultiplexMixin as MultiplexMixin
    from ray.serve.request_router import PendingRequest as PendingRequest
    from ray.serve.request_router import RequestRouter as RequestRouter
    from ray.serve.request_router import RunningReplica as RunningReplica
except ImportError as exc:  # pragma: no cover - exercised where ray is not installed
    if exc.name is not None and exc.name.partition(".")[0] != "ray":
        raise  # ray is there but one of *its* imports failed: show that
    raise MissingDependencyError("ray", "ray", "vramkit.integrations.ray_serve") from exc

FREE_BYTES_STAT = "vramkit_free_bytes"
"""The routing-stats key under which a replica reports the bytes left in its budget."""

_LATENCY_BUCKETS_MS = [10.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 3e4, 6e4]


# ------------------------------------------------------------------ Ray internals (2.60)
# Two things a multiplexed loader needs have no public API in Ray Serve 2.60; both
# are read from ray/serve/multiplex.py (_ModelMultiplexWrapper) and replica.py of
# that version, and kept to these few lines.

# Ray 2.60's replica awaits `shutdown()` of the object under this attribute of the
# deployment instance when the replica stops (replica.py, call_destructor).
_RAY_SHUTDOWN_ATTR = "__serve_multiplex_wrapper"


def _report_to_serve(replica_id: Any, model_ids: list[str]) -> None:
    """Tell Serve's controller which model ids this replica holds.

    Ray 2.60 does exactly this in ``_ModelMultiplexWrapper._push_model_ids_info``:
    the controller hands the ids to every router of the deployment, which then
    sends requests for a model to the replicas that report it. (Routing stats
    sent this way would be overwritten at the controller's next health check:
    they travel through ``record_routing_stats`` instead.)
    """
    from ray.serve._private.common import RequestRoutingInfo
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is not None:  # it raises rather than answer None when asked the default way
        client.record_request_routing_info(
            RequestRoutingInfo(replica_id=replica_id, multiplexed_model_ids=model_ids)
        )


def _replica_context() -> Any:
    """Serve's replica context, or ``None`` outside a replica."""
    try:
        return serve.get_replica_context()
    except Exception:  # RayServeException outside a replica
        return None


class _Metrics:
    """Ray's multiplexing metrics, under their Ray names, plus vramkit's (only in a replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "serve_multiplexed_get_model_requests_counter",
            description="The counter for get model requests on the current replica.",
        )
        self.loads = metrics.Counter(
            "serve_multiplexed_models_load_counter",
            description="The counter for loaded models on the current replica.",
        )
        self.unloads = metrics.Counter(
            "serve_multiplexed_models_unload_counter",
            description="The counter for unloaded models on the current replica.",
        )
        self.load_ms = metrics.Histogram(
            "serve_multiplexed_model_load_latency_ms",
            description="The time it takes to load a model.",
            boundaries=_LATENCY_BUCKETS_MS,
        )
        self.unload_ms = metrics.Histogram(
            "serve_multiplexed_model_unload_latency_ms",
            description="The time it takes to unload a model.",
            boundaries=_LATENCY_BUCKETS_MS,
        )
        self.count = metrics.Gauge(
            "serve_num_multiplexed_models",
            description="The number of models loaded on the current replica.",
        )
        self.registered = metrics.Gauge(
            "serve_registered_multiplexed_model_id",
            description="The model id registered on the current replica.",
            tag_keys=("model_id",),
        )
        self.wake_ms = metrics.Histogram(
            "vramkit_multiplexed_model_wake_latency_ms",
            description="The time it takes to wake a model from an offload tier.",
            boundaries=_LATENCY_BUCKETS_MS,
            tag_keys=("tier",),
        )
        self.evictions = metrics.Counter(
            "vramkit_multiplexed_evictions",
            description="Models evicted to make room, by tier (cpu, disk, unload).",
            tag_keys=("tier",),
        )
        self.survivors = metrics.Counter(
            "vramkit_multiplexed_unload_survivors",
            description="Unloads after which user code still held the model (freed anyway).",
        )
        self.model_bytes = metrics.Gauge(
            "vramkit_multiplexed_model_bytes",
            description="Device bytes each model holds on the current replica.",
            tag_keys=("model_id",),
        )
        self.budget = metrics.Gauge(
            "vramkit_multiplexed_budget_bytes", description="The replica's memory budget."
        )
        self.charged = metrics.Gauge(
            "vramkit_multiplexed_charged_bytes",
            description="Bytes the replica's models hold or reserve against the budget.",
        )

    def record(self, event: events.Event) -> None:
        kind = event.kind
        if kind == "load":
            self.loads.inc()
            self.load_ms.observe(event.seconds * 1000)
        elif kind == "wake":
            self.wake_ms.observe(event.seconds * 1000, tags={"tier": str(event.detail.get("tier"))})
        elif kind in ("evict", "expire"):
            self.unloads.inc()
            self.unload_ms.observe(event.seconds * 1000)
            if kind == "evict":
                self.evictions.inc(tags={"tier": str(event.detail.get("tier"))})
        elif kind == "unload" and event.detail.get("died") is False:
            self.survivors.inc()

    def report(self, status: PoolStatus, ids: Sequence[str], before: Sequence[str]) -> None:
        self.count.set(len(ids))
        for model_id in set(before) - set(ids):
            self.registered.set(0, tags={"model_id": model_id})
        for model_id in ids:
            self.registered.set(1, tags={"model_id": model_id})
        for model in status.models:
            self.model_bytes.set(model.device_bytes, tags={"model_id": model.name})
        self.budget.set(status.budget_bytes)
        self.charged.set(status.charged_bytes)
