"""Ray Serve model multiplexing with a memory budget per replica.

Ray Serve's ``@serve.multiplexed(max_num_models_per_replica=3)`` caches a
replica's models by *count*: three small models and three large ones count the
same, eviction calls the model's ``__del__`` and hopes, and one lock per
replica serialises every load. :func:`vramkit_multiplexed` is a drop-in on the
same ``async def get_model(self, model_id)`` whose cache is a
:class:`~vramkit.ModelPool` with a byte budget: models are admitted by size,
evicted to the cheapest tier (or unloaded, with vramkit's proof of release),
expire after ``keep_alive``, load concurrently when they differ, and recover
from out-of-memory errors. The replica still reports the model ids it holds, so
Serve keeps routing each request to a replica that has its model::

    from ray import serve
    from vramkit.integrations.ray_serve import vramkit_multiplexed

    @serve.deployment(num_replicas=2)
    class Models:
        @vramkit_multiplexed(budget="20GiB", device="cuda")
        async def get_model(self, model_id: str):
            return load_my_model(model_id).to("cuda")

        async def __call__(self, request):
            model = await self.get_model(serve.get_multiplexed_model_id())
            return model(await request.json())

Placement by memory across replicas: each replica also reports its free budget
(:data:`FREE_BYTES_STAT`, through the ``record_routing_stats`` method the
decorator gives the deployment), and :class:`MemoryAwareRequestRouter` sends a
model id that no replica holds to the replica with the most room, instead of to
the one with the fewest models.

Needs the ``ray`` extra: ``pip install "vramkit[ray]"``.
"""

from __future__ import annotations

from vramkit.integrations.ray_serve._decorator import vramkit_multiplexed
from vramkit.integrations.ray_serve._models import EvictTo as EvictTo
from vramkit.integrations.ray_serve._models import MultiplexedModels, MultiplexStatus
from vramkit.integrations.ray_serve._ray import FREE_BYTES_STAT
from vramkit.integrations.ray_serve._router import MemoryAwareRequestRouter, rank_replicas_by_memory

__all__ = [
    "FREE_BYTES_STAT",
    "MemoryAwareRequestRouter",
    "MultiplexStatus",
    "MultiplexedModels",
    "rank_replicas_by_memory",
    "vramkit_multiplexed",
]
