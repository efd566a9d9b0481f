"""One request sequence through Ray Serve's @serve.multiplexed and through @vramkit_multiplexed.

The deployments run in one local Ray cluster on loopback, two replicas each,
with the same loader (build the model, read its checkpoint from a local store),
the same seeded request sequence over six model ids of 8 to 96 MiB (Zipf-like
popularity), the same concurrency and Serve's default router. vramkit's cache
holds what fits in 128 MiB a replica, evicting to the cheapest tier. Serve's
counts models, whatever their size: at its default of 3 a replica it holds up
to 208 MiB here; the largest count that can never exceed 128 MiB is 1.

Prints p50/p95 latency seen by the client, loads vs wakes, and the peak bytes of
model weights resident in each replica (measured the same way in both: the
storages of every live model the loader built, meta skeletons excluded), with
plain Serve as the reference.

Run: ``python benchmarks/bench_ray_multiplex.py [--requests 120] [--concurrency 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import shutil
import socket
import statistics
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import ray
import torch
from _common import fmt_seconds, versions
from ray import serve
from starlette.requests import Request

from vramkit import format_bytes
from vramkit.integrations.ray_serve import vramkit_multiplexed
from vramkit.testing.models import tiny_mlp

MiB = 2**20
MODELS = {"tiny": 8, "small": 16, "base": 32, "medium": 48, "large": 64, "xlarge": 96}  # MiB
BUDGET = 128 * MiB
# Serve's default max_num_models_per_replica, and the largest count that can never
# exceed BUDGET whichever models it holds: 1, since the two largest make 160 MiB.
DEFAULT_COUNT, SAFE_COUNT = 3, 1


def load(store: Path, model_id: str) -> torch.nn.Module:
    model = tiny_mlp(MODELS[model_id])
    model.load_state_dict(torch.load(store / f"{model_id}.pt", weights_only=True))
    return model


def resident_bytes(built: weakref.WeakSet[torch.nn.Module]) -> int:
    """Bytes of weights held by every model the replica built and still keeps alive."""
    storages: dict[int, int] = {}
    for model in list(built):
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _Answering:
    """What both deployments share: the store, the models they built, the answer."""

    def __init__(self, store: str) -> None:
        self.store = Path(store)
        self.built: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.peak = 0

    def load(self, model_id: str) -> torch.nn.Module:
        model = load(self.store, model_id)
        self.built.add(model)
        return model

    def answer(self, model: torch.nn.Module, loads: int, wakes: int) -> dict[str, Any]:
        with torch.inference_mode():
            model(torch.ones(1, model.dim))
        resident = resident_bytes(self.built)  # while the request still holds its model
        self.peak = max(self.peak, resident)
        return {
            "replica": serve.get_replica_context().replica_tag,
            "resident": resident,
            "peak": self.peak,
            "loads": loads,
            "wakes": wakes,
        }


def count_cached(max_models: int) -> Any:
    """Serve's own multiplexing, caching ``max_models`` models a replica."""

    @serve.deployment(num_replicas=2, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
    class CountCached(_Answering):
        def __init__(self, store: str) -> None:
            super().__init__(store)
            self.loads = 0

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> torch.nn.Module:
            self.loads += 1
            return await asyncio.to_thread(self.load, model_id)

        async def __call__(self, request: Request) -> dict[str, Any]:
            model = await self.get_model(serve.get_multiplexed_model_id())
            return self.answer(model, self.loads, 0)

    return CountCached


@serve.deployment(num_replicas=2, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
class Budgeted(_Answering):
    @vramkit_multiplexed(
        budget=BUDGET, device="cpu", headroom=0, size_hint=lambda m: MODELS[m] * MiB
    )
    async def get_model(self, model_id: str) -> torch.nn.Module:
        return await asyncio.to_thread(self.load, model_id)

    async def __call__(self, request: Request) -> dict[str, Any]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        status = self.get_model.status()
        return self.answer(model, status.loads, status.wakes)


def write_store(root: Path) -> None:
    for seed, (model_id, mib) in enumerate(MODELS.items()):
        torch.save(tiny_mlp(mib, seed=seed).state_dict(), root / f"{model_id}.pt")
    for path in root.iterdir():  # into the page cache, so neither run reads the disk first
        path.read_bytes()


def sequence(requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ids = list(MODELS)
    rng.shuffle(ids)  # popularity unrelated to size
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ids))]
    return rng.choices(ids, weights=weights, k=requests)


def drive(url: str, model_ids: list[str], concurrency: int) -> list[tuple[float, dict[str, Any]]]:
    def one(model_id: str) -> tuple[float, dict[str, Any]]:
        request = urllib.request.Request(url, headers={"serve_multiplexed_model_id": model_id})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.load(response)
        return time.perf_counter() - started, answer

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, model_ids))


def summarise(results: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    latencies = sorted(seconds for seconds, _ in results)
    replicas: dict[str, dict[str, int]] = {}
    for _, answer in results:  # counters only grow: each replica's largest is its last
        seen = replicas.setdefault(answer["replica"], {"peak": 0, "loads": 0, "wakes": 0})
        for key in seen:
            seen[key] = max(seen[key], answer[key])
    peaks = sorted((r["peak"] for r in replicas.values()), reverse=True)
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "loads": sum(r["loads"] for r in replicas.values()),
        "wakes": sum(r["wakes"] for r in replicas.values()),
        "peaks": peaks + [0] * (2 - len(peaks)),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="vramkit-bench-ray-store-"))
    offload = Path(tempfile.mkdtemp(prefix="vramkit-bench-ray-offload-"))
    write_store(store)
    model_ids = sequence(args.requests, args.seed)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VRAMKIT_CACHE_DIR": str(offload)}},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runs = {
            f"Serve, {DEFAULT_COUNT}/replica": count_cached(DEFAULT_COUNT),
            f"Serve, {SAFE_COUNT}/replica": count_cached(SAFE_COUNT),
            f"vramkit, {format_bytes(BUDGET)}": Budgeted,
        }
        for i, deployment in enumerate(runs.values()):
            serve.run(deployment.bind(str(store)), name=f"app{i}", route_prefix=f"/app{i}")
        base = f"http://127.0.0.1:{port}"
        results = {
            label: summarise(drive(f"{base}/app{i}", model_ids, args.concurrency))
            for i, label in enumerate(runs)
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(offload, ignore_errors=True)

    print(versions(threads=True) + f" · ray {ray.__version__}")
    sizes = ", ".join(f"{k} {v}" for k, v in MODELS.items())
    print(
        f"{len(MODELS)} models (MiB: {sizes}; {sum(MODELS.values())} MiB in all), "
        f"2 replicas each, {args.requests} requests (Zipf 1.1, seed {args.seed}), "
        f"{args.concurrency} at a time, cpu"
    )
    report(results)


def report(results: dict[str, dict[str, Any]]) -> None:
    """The table: one column per run, then vramkit's figures as a ratio of each Serve run."""
    labels = list(results)
    ours = results[labels[-1]]
    references = labels[:-1]
    header = "".join(f"{label:>20}" for label in labels)
    header += "".join(f"{'vs ' + label.split(', ')[1]:>14}" for label in references)
    print()
    print(f"{'':<30}{header}")
    rows: list[tuple[str, str, Any]] = [
        ("p50 latency", "p50", fmt_seconds),
        ("p95 latency", "p95", fmt_seconds),
        ("loads", "loads", str),
        ("wakes (from an offload tier)", "wakes", str),
    ]
    for label, key, show in rows:
        line = f"{label:<30}" + "".join(f"{show(results[r][key]):>20}" for r in labels)
        if key != "wakes":
            line += "".join(
                f"{ours[key] / results[r][key]:>13.2f}x" if results[r][key] else f"{'':>14}"
                for r in references
            )
        print(line)
    for i, name in enumerate(("busiest", "other")):
        line = f"{'peak resident, ' + name + ' replica':<30}"
        line += "".join(f"{format_bytes(results[r]['peaks'][i]):>20}" for r in labels)
        line += "".join(f"{ours['peaks'][i] / results[r]['peaks'][i]:>13.2f}x" for r in references)
        print(line)
    print()
    for label in labels:
        peak = max(results[label]["peaks"])
        verdict = "within" if peak <= BUDGET else "OVER"
        print(f"{label}: peak {format_bytes(peak)} a replica, {verdict} {format_bytes(BUDGET)}")


if __name__ == "__main__":
    main()
