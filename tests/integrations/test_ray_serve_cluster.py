"""vramkit_multiplexed on a real local Ray cluster: Serve on loopback, two replicas, HTTP.

One cluster for the module (starting one takes tens of seconds here); the tests
run in file order on the same two replicas, each setting up what it needs.
Every wait is bounded: a broken cluster fails the test, it never hangs it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve")

import httpx
import ray
import ray.cloudpickle
from ray import serve
from ray.serve._private import api as serve_api
from ray.serve.config import RequestRouterConfig

from . import _ray_app as app

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray-cluster")]

WAIT = 90.0  # seconds any one wait may take on a loaded machine before the test fails
REQUEST_TIMEOUT = 60.0


class Served:
    """The deployment over HTTP, with what each replica last said about itself."""

    def __init__(self, port: int, logs: Path, views: Any) -> None:
        self.base = f"http://127.0.0.1:{port}/models"
        self.client = httpx.Client(base_url=self.base, timeout=REQUEST_TIMEOUT)
        self.logs = logs
        self.views = views
        self.latest: dict[str, dict[str, Any]] = {}  # replica -> its last status
        self.statuses: list[dict[str, Any]] = []  # every status any replica returned

    def get(self, model_id: str | None = None, route: str = "", **params: str) -> dict[str, Any]:
        headers = {"serve_multiplexed_model_id": model_id} if model_id else {}
        response = self.client.get(f"/{route}", headers=headers, params=params)
        response.raise_for_status()
        return self._seen(response.json())

    async def concurrently(self, model_ids: list[str], limit: int) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(limit)
        async with httpx.AsyncClient(base_url=self.base, timeout=REQUEST_TIMEOUT) as client:

            async def one(model_id: str) -> dict[str, Any]:
                async with gate:
                    headers = {"serve_multiplexed_model_id": model_id}
                    response = await client.get("/", headers=headers)
                    response.raise_for_status()
                    return dict(response.json())

            answers = await asyncio.gather(*(one(m) for m in model_ids))
        return [self._seen(a) for a in answers]

    def _seen(self, answer: dict[str, Any]) -> dict[str, Any]:
        status = answer.get("status", answer)
        self.latest[status["replica"]] = status
        self.statuses.append(status)
        return answer

    def reset_all(self) -> None:
        """Unload everything on both replicas (requests without a model id go anywhere)."""
        reset: set[str] = set()
        deadline = time.monotonic() + WAIT
        while len(reset) < 2:
            assert time.monotonic() < deadline, f"only reached replicas {reset}"
            reset.add(self.get(route="reset")["replica"])

    def settle(self) -> dict[str, Any]:
        """Wait until the proxy's router sees each replica as it is: free bytes, model ids."""
        deadline = time.monotonic() + WAIT
        view: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            self.get(route="status")  # the router records what it saw for this request
            view = ray.get(self.views.latest.remote(), timeout=REQUEST_TIMEOUT)
            if view is not None and self._agrees(view):
                return view
            time.sleep(0.1)
        raise AssertionError(f"the router never caught up: saw {view}, replicas {self.latest}")

    def _agrees(self, view: dict[str, Any]) -> bool:
        if len(self.latest) != 2 or set(view["free"]) != set(self.latest):
            return False
        return all(
            view["free"][r] == max(s["pool"]["budget_bytes"] - s["pool"]["charged_bytes"], 0)
            and view["holders"][r] == sorted(s["model_ids"])
            for r, s in self.latest.items()
        )

    def replica_log(self, replica: str) -> str:
        (path,) = self.logs.glob(f"replica_*_{replica}.log")
        return path.read_text(encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _deploy(logs: Path, cache: Path) -> None:
    deployment = app.Models.options(
        request_router_config=RequestRouterConfig(
            request_router_class=app.RecordingRouter,
            request_routing_stats_period_s=0.2,
            request_routing_stats_timeout_s=10,
        ),
        logging_config={"logs_dir": str(logs)},
        ray_actor_options={
            "num_cpus": 0,
            "runtime_env": {"env_vars": {"VRAMKIT_CACHE_DIR": str(cache)}},
        },
    )
    # serve.run waits for the replicas without a timeout of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as waiter:
        waiter.submit(serve.run, deployment.bind(), route_prefix="/models").result(timeout=300)


SERVE_PATIENCE = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    logs = tmp_path_factory.mktemp("replica-logs")
    cache = tmp_path_factory.mktemp("offload")
    ray.cloudpickle.register_pickle_by_value(app)  # replicas cannot import the tests package
    # Serve kills a proxy that is not ready 5 s after it started, and serve.start
    # gives up on it after a fixed 60 s: on a loaded machine starting one takes
    # longer. Serve's own patience is not what these tests test. The cluster's
    # processes inherit the environment when ray.init starts them; serve.start
    # reads its limit from a module global.
    patience = pytest.MonkeyPatch()
    for name, seconds in SERVE_PATIENCE.items():
        patience.setenv(name, seconds)
    patience.setattr(serve_api, "HTTP_PROXY_TIMEOUT", 300, raising=False)
    try:
        # "local": a cluster of its own, never one found running on the machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    except BaseException:
        patience.undo()
        raise
    try:
        views = app.RouterViews.options(name=app.VIEWS_ACTOR, namespace=app.NAMESPACE).remote()
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        finally:
            patience.undo()
        _deploy(logs, cache)
        it = Served(port, logs, views)
        yield it
        it.client.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            with contextlib.suppress(ValueError):  # ray.shutdown() may have forgotten it
                ray.cloudpickle.unregister_pickle_by_value(app)


def test_a_new_model_goes_to_the_replica_with_room_not_the_one_with_fewest_models(
    served: Served,
) -> None:
    served.reset_all()
    served.settle()
    first = served.get("xl")["status"]["replica"]  # 6 of 8 MiB
    served.settle()
    second = served.get("xs")["status"]["replica"]
    assert second != first
    served.settle()
    assert served.get("s")["status"]["replica"] == second  # 1 + 2 of 8 MiB
    served.settle()
    evictions = {r: dict(s["evictions"]) for r, s in served.latest.items()}
    # `first` holds one model and 2 MiB of room, `second` two models and 5 MiB:
    # Serve's own router sends a new id to the replica with the fewest models,
    # where it would evict xl; by memory it goes where it fits.
    answer = served.get("m")
    assert answer["status"]["replica"] == second
    assert answer["value"] == app.expected("m")
    served.get(route="status")
    assert {r: dict(s["evictions"]) for r, s in served.latest.items()} == evictions
    assert "xl" in served.latest[first]["model_ids"]


def test_requests_for_a_model_go_to_the_replica_that_holds_it(served: Served) -> None:
    holder = served.get("l")["status"]["replica"]
    served.settle()
    loads = {r: s["loads"] for r, s in served.latest.items()}
    for _ in range(8):
        assert served.get("l")["status"]["replica"] == holder
    assert {r: s["loads"] for r, s in served.latest.items()} == loads


def test_a_mix_of_ids_is_answered_correctly_within_each_replicas_budget(served: Served) -> None:
    rng = random.Random(20)
    model_ids = [rng.choice(list(app.MODELS)) for _ in range(48)]
    answers = asyncio.run(served.concurrently(model_ids, limit=4))
    assert [a["value"] for a in answers] == [app.expected(m) for m in model_ids]
    assert [a["model_id"] for a in answers] == model_ids
    for status in served.statuses:  # every status either replica returned, so far
        assert status["pool"]["budget_bytes"] == app.BUDGET
        assert status["pool"]["charged_bytes"] <= app.BUDGET
        assert status["pool"]["peak_charged_bytes"] <= app.BUDGET
    assert sum(sum(s["evictions"].values()) for s in served.latest.values()) > 0


def test_evicted_models_wake_from_disk_instead_of_loading_again(served: Served) -> None:
    for model_id in app.MODELS:  # each id held by some replica, loaded or offloaded
        served.get(model_id)
    served.settle()
    before = {r: (s["loads"], s["wakes"]) for r, s in served.latest.items()}
    cycle = [*app.MODELS, *reversed(app.MODELS), *app.MODELS]
    for model_id in cycle:  # more than a budget holds: every replica evicts
        assert served.get(model_id)["value"] == app.expected(model_id)
    served.settle()
    after = {r: (s["loads"], s["wakes"]) for r, s in served.latest.items()}
    assert {r: loads for r, (loads, _) in after.items()} == {
        r: loads for r, (loads, _) in before.items()
    }
    assert sum(w for _, w in after.values()) > sum(w for _, w in before.values())
    for status in served.latest.values():
        assert set(status["evictions"]) <= {"disk"}  # cheaper to wake from than to load


def test_a_stray_reference_is_named_in_the_replica_log_and_freed(served: Served) -> None:
    served.reset_all()
    holder = served.get("s", keep="1")["status"]["replica"]  # the handler keeps the model
    served.settle()
    report = served.get("s", route="unload")
    assert report["status"]["replica"] == holder
    assert report["died"] is False
    assert any(chain.endswith("Models.kept[0]") for chain in report["held_by"]), report
    assert report["neutralised_bytes"] >= app.size_of("s")  # freed anyway
    deadline = time.monotonic() + WAIT
    while "model 's' survived unloading" not in served.replica_log(holder):
        assert time.monotonic() < deadline, served.replica_log(holder)
        time.sleep(0.2)
    (line,) = [
        line
        for line in served.replica_log(holder).splitlines()
        if "model 's' survived unloading" in line
    ]
    assert line.startswith("WARNING")
    assert "Models.kept[0]" in line
    assert "2.0 MiB freed anyway" in line
    assert served.get("s")["value"] == app.expected("s")  # a fresh load, unharmed
