"""The deployment: six models of 8 to 96 MiB, two replicas, 128 MiB of memory each.

Ray Serve's ``@serve.multiplexed(max_num_models_per_replica=3)`` would let a
replica hold the three largest (208 MiB) as readily as the three smallest
(56 MiB). Here each replica holds what fits in its budget, evicts to the
cheapest tier to make room, and wakes models instead of loading them again;
new model ids go to the replica with the most room.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request

from vramkit.integrations.ray_serve import MemoryAwareRequestRouter, vramkit_multiplexed
from vramkit.testing.models import tiny_mlp

MiB = 2**20
MODELS = {"tiny": 8, "small": 16, "base": 32, "medium": 48, "large": 64, "xlarge": 96}  # MiB
BUDGET = 128 * MiB


def write_store(root: Path, model_ids: Iterable[str] = MODELS) -> Path:
    """Write the models' checkpoints, the way a model registry would hold them."""
    root.mkdir(parents=True, exist_ok=True)
    for model_id in model_ids:
        path = root / f"{model_id}.pt"
        if not path.exists():
            seed = list(MODELS).index(model_id)
            torch.save(tiny_mlp(MODELS[model_id], seed=seed).state_dict(), path)
    return root


def load(store: Path, model_id: str) -> torch.nn.Module:
    """Build the model and read its weights: what a real loader does, minus the download."""
    model = tiny_mlp(MODELS[model_id])  # KeyError for an id the store does not have
    model.load_state_dict(torch.load(store / f"{model_id}.pt", weights_only=True))
    return model


@serve.deployment(
    num_replicas=2,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class=MemoryAwareRequestRouter,
        request_routing_stats_period_s=0.25,  # how stale the replicas' free bytes may be
    ),
)
class Models:
    """Answers ``GET /`` with the header ``serve_multiplexed_model_id: <id>``."""

    def __init__(self, store: str) -> None:
        self.store = Path(store)

    @vramkit_multiplexed(
        budget=BUDGET,
        device="cpu",  # "cuda" on a GPU machine: the loader then moves the model there
        headroom=0,
        size_hint=lambda model_id: MODELS[model_id] * MiB,
    )
    async def get_model(self, model_id: str) -> torch.nn.Module:
        """Load one model (vramkit decides when, and what to evict for it)."""
        return load(self.store, model_id)

    async def answer(self, model_id: str) -> dict[str, Any]:
        """Run the model; say which replica did and what it holds."""
        model = await self.get_model(model_id)
        with torch.inference_mode():
            checksum = float(model(torch.ones(1, model.dim)).sum())
        status = self.get_model.status()
        return {"model_id": model_id, "checksum": checksum, **status.to_dict()}

    async def __call__(self, request: Request) -> dict[str, Any]:
        """One HTTP request."""
        return await self.answer(serve.get_multiplexed_model_id())
