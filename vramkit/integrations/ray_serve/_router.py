"""Placement by memory: a request for a model no replica holds goes to the one with most room.

:func:`rank_replicas_by_memory` is the rule; :class:`MemoryAwareRequestRouter`
is that rule as a Serve request router.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from vramkit.integrations.ray_serve._ray import (
    FREE_BYTES_STAT,
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

R = TypeVar("R", bound="_ReplicaView")


class _ReplicaView(Protocol):
    @property
    def multiplexed_model_ids(self) -> set[str]: ...
    @property
    def routing_stats(self) -> dict[str, Any]: ...


def rank_replicas_by_memory(replicas: Sequence[R], model_id: str) -> list[list[R]]:
    """Order replicas for a request: those holding ``model_id``, then by free budget.

    The replicas that report ``model_id`` come first, together (Serve picks
    the least busy of a rank). The others follow one free-bytes level per rank,
    most room first, so a model no replica holds goes where it fits instead of
    evicting on a full replica. A replica that has not reported its budget yet
    counts as empty. A request without a model id may go anywhere: one rank.
    Replicas within a rank come in random order.

    Args:
        replicas: Objects with ``multiplexed_model_ids`` and ``routing_stats``
            (Serve's :class:`~ray.serve.request_router.RunningReplica`).
        model_id: The request's model id (``""`` when it has none).

    Returns:
        Ranks of replicas, the most preferred first; empty ranks are left out.
    """
    if not model_id:  # nothing to load: any replica will do
        ranks = [list(replicas)] if replicas else []
    else:
        holders = [r for r in replicas if model_id in r.multiplexed_model_ids]
        by_room: dict[float, list[R]] = {}
        for replica in replicas:
            if model_id not in replica.multiplexed_model_ids:
                by_room.setdefault(_free_bytes(replica), []).append(replica)
        ranks = [holders] if holders else []
        ranks += [by_room[room] for room in sorted(by_room, reverse=True)]
    for rank in ranks:
        # Serve takes the least busy replica of a rank and the first one on a tie:
        # shuffled, equal replicas share the new models instead of one taking them all.
        random.shuffle(rank)
    return ranks


def _free_bytes(replica: _ReplicaView) -> float:
    value = replica.routing_stats.get(FREE_BYTES_STAT)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return math.inf


class MemoryAwareRequestRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """A Serve request router that places new model ids on the replica with the most room.

    Requests for a model go to the replicas that hold it, as with Serve's own
    router; a model no replica holds goes to the replica reporting the most free
    budget (:data:`FREE_BYTES_STAT`, sent by :func:`vramkit_multiplexed`), not to the
    one with the fewest models. Serve asks replicas for that figure every
    ``request_routing_stats_period_s`` (10 s unless configured), so set it to
    how stale a placement may be::

        from ray.serve.config import RequestRouterConfig

        @serve.deployment(
            num_replicas=2,
            request_router_config=RequestRouterConfig(
                request_router_class=MemoryAwareRequestRouter,
                request_routing_stats_period_s=1,
            ),
        )
    """

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the candidates for one request (see :func:`rank_replicas_by_memory`)."""
        model_id = ""
        if pending_request is not None:
            model_id = pending_request.metadata.multiplexed_model_id or ""
            # When every rank is busy, back off before the next round, as Serve's
            # own routers do; without this flag it would retry at once.
            pending_request.routing_context.should_backoff = True
        return rank_replicas_by_memory(candidate_replicas, model_id)
