"""The multiplexed deployment the Ray Serve tests run (shipped to replicas by value)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.request_router import PendingRequest, RunningReplica
from starlette.requests import Request

from vramkit.integrations.ray_serve import (
    FREE_BYTES_STAT,
    MemoryAwareRequestRouter,
    vramkit_multiplexed,
)

MiB = 2**20
WIDTH = 256
# Model id -> (size in MiB, the constant its weights hold). Budget: 8 MiB a replica,
# so no replica holds them all, and the two together hold fewer than all.
MODELS = {
    "xs": (1, 1.0),
    "s": (2, 2.0),
    "m": (3, 3.0),
    "l": (4, 4.0),
    "xl": (6, 5.0),
    "xxl": (7, 6.0),
}
BUDGET = 8 * MiB
VIEWS_ACTOR = "vramkit-router-views"
NAMESPACE = "vramkit-tests"


def size_of(model_id: str) -> int:
    return MODELS[model_id][0] * MiB


def expected(model_id: str) -> float:
    """What the model of ``model_id`` answers for an input of ones."""
    return WIDTH * MODELS[model_id][1]


def build(model_id: str) -> torch.nn.Linear:
    size, value = MODELS[model_id]  # KeyError for an unknown id: the request fails
    layer = torch.nn.Linear(WIDTH, size * MiB // 4 // WIDTH, bias=False)
    torch.nn.init.constant_(layer.weight, value)
    return layer


@serve.deployment(num_replicas=2, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
class Models:
    def __init__(self) -> None:
        self.kept: list[Any] = []  # where a careless handler keeps a model

    @vramkit_multiplexed(budget=BUDGET, device="cpu", headroom=0, size_hint=size_of)
    async def get_model(self, model_id: str) -> torch.nn.Linear:
        # Stands for fetching the checkpoint: loading costs clearly more than waking
        # from the disk tier, so "auto" eviction picks the disk.
        await asyncio.sleep(0.3)
        return build(model_id)

    async def __call__(self, request: Request) -> dict[str, Any]:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        models = self.get_model
        if route == "status":
            return models.status().to_dict()
        if route == "reset":  # this replica starts from nothing
            self.kept.clear()
            for model in list(models.pool):
                await models.unload(model.name)
            return models.status().to_dict()
        model_id = serve.get_multiplexed_model_id()
        if route == "unload":
            report = await models.unload(model_id)
            return {
                "died": report.died,
                "held_by": [str(chain) for chain in report.holders],
                "neutralised_bytes": report.neutralised_bytes,
                "status": models.status().to_dict(),
            }
        if route == "probe":  # where the router sent a request for model_id, without loading it
            return {"held": model_id in models.model_ids(), "status": models.status().to_dict()}
        model = await self.get_model(model_id)
        if request.query_params.get("keep"):
            self.kept.append(model)
        with torch.inference_mode():
            value = float(model(torch.ones(1, WIDTH))[0, 0])
        return {"model_id": model_id, "value": value, "status": models.status().to_dict()}


@ray.remote(num_cpus=0)
class RouterViews:
    """What the proxy's router saw at each request: free bytes per replica, holders."""

    def __init__(self) -> None:
        self.views: list[dict[str, Any]] = []

    def add(self, view: dict[str, Any]) -> None:
        self.views.append(view)

    def latest(self) -> dict[str, Any] | None:
        return self.views[-1] if self.views else None


class RecordingRouter(MemoryAwareRequestRouter):
    """MemoryAwareRequestRouter that tells the tests what it saw (they cannot ask the proxy)."""

    _views: Any = None

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if self._views is None:
            self._views = ray.get_actor(VIEWS_ACTOR, namespace=NAMESPACE)
        self._views.add.remote(
            {
                "free": {
                    r.replica_id.unique_id: r.routing_stats.get(FREE_BYTES_STAT)
                    for r in candidate_replicas
                },
                "holders": {
                    r.replica_id.unique_id: sorted(r.multiplexed_model_ids)
                    for r in candidate_replicas
                },
            }
        )
        return await super().choose_replicas(candidate_replicas, pending_request)
