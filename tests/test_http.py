"""The HTTP admin API: a real uvicorn server on 127.0.0.1 over real tiny models, driven by httpx."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import httpx
import psutil
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

import vramkit
from vramkit import ModelPool, ModelState
from vramkit.controls import Controls
from vramkit.errors import InvalidArgumentError
from vramkit.integrations.http import admin_app, admin_router, start_admin_server
from vramkit.testing.models import tiny_mlp

from .helpers import hold_lease, run_python

MiB = 1024**2


@pytest.fixture(autouse=True)
def _private_runtime_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMKIT_RUNTIME_DIR", str(tmp_path / "run"))


@pytest.fixture
def pool() -> Iterator[ModelPool]:
    with ModelPool("cpu", budget="256MiB", headroom=0, evict_to="unload", name="svc") as p:
        p.register("asr", lambda: tiny_mlp(16), size_hint="16MiB")
        p.register("llm", lambda: tiny_mlp(32), size_hint="32MiB", pin=True)
        yield p


@pytest.fixture
def client(pool: ModelPool) -> Iterator[httpx.Client]:
    with start_admin_server(pool) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_status_matches_pool_status(pool: ModelPool, client: httpx.Client) -> None:
    pool["asr"].load()
    data = client.get("/status").json()
    expected = pool.status()
    (line,) = data["pools"]
    assert line == {k: v for k, v in expected.to_dict().items() if k != "models"}
    assert [m["name"] for m in data["models"]] == [m.name for m in expected.models]
    for got, want in zip(data["models"], expected.models, strict=True):
        for key in ("state", "tier", "device_bytes", "size_bytes", "leases", "pinned"):
            assert got[key] == getattr(want, key), key
    assert data["devices"][0]["total_bytes"] == vramkit.snapshot("cpu")["cpu"].total_bytes
    assert data["devices"][0]["memory_line"].startswith("RAM: ")


def test_free_returns_the_bytes_a_snapshot_confirms(pool: ModelPool, client: httpx.Client) -> None:
    for name in ("asr", "llm"):
        pool[name].load()
    size = sum(m.size_bytes or 0 for m in pool)
    assert size > 40 * MiB
    before = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    response = client.post("/free")
    after = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    assert response.status_code == 200
    op = response.json()
    assert op["outcome"] == "ok" and op["caller"] == "127.0.0.1"
    assert sorted(op["detail"]["evicted"]) == ["asr", "llm"]
    freed = op["freed_bytes"]["cpu"]["process"]
    assert freed >= 0.75 * size
    assert before is not None and after is not None
    # The server measured around the work; the test around the whole request.
    assert abs((before - after) - freed) < 16 * MiB
    assert all(m.state is ModelState.UNLOADED for m in pool)


def test_unload_of_a_leased_model_answers_409_and_leaves_it_ready(
    pool: ModelPool, client: httpx.Client
) -> None:
    release, thread = hold_lease(pool["asr"], thread_name="request-worker")
    try:
        response = client.post("/models/asr/unload")
        assert response.status_code == 409
        body = response.json()
        assert body["outcome"] == "busy"
        assert "request-worker" in body["message"]
        assert pool["asr"].state is ModelState.READY
        assert pool["asr"].leases == 1
    finally:
        release.set()
        thread.join(60)
    assert client.post("/models/asr/unload").status_code == 200
    assert pool["asr"].state is ModelState.UNLOADED


def test_model_routes_and_their_status_codes(
    pool: ModelPool, client: httpx.Client, tmp_path: Any
) -> None:
    pool.register("tts", lambda: tiny_mlp(4), offload_dir=tmp_path / "tier")
    assert client.post("/models/nope/unload").status_code == 404
    assert client.post("/models/tts/wake").json()["outcome"] == "ok"
    assert client.post("/models/tts/offload", params={"tier": "cpu"}).status_code == 422
    assert client.post("/models/tts/offload", params={"tier": "gpu"}).status_code == 422
    offloaded = client.post("/models/tts/offload", params={"tier": "disk"})
    assert offloaded.status_code == 200, offloaded.text
    assert pool["tts"].state is ModelState.OFFLOADED
    assert client.post("/models/tts/wake").json()["message"].startswith("woke tts from disk")
    assert client.post("/clear_cache").status_code == 422  # cpu has no allocator cache
    assert client.post("/clear_cache", params={"device": "tpu"}).status_code == 422
    log = client.get("/operations").json()["operations"]
    assert [(o["action"], o["model"], o["outcome"]) for o in log] == [
        ("unload", "nope", "not_found"),
        ("wake", "tts", "ok"),
        ("offload", "tts", "unsupported"),  # the bad tier never reached the controls
        ("offload", "tts", "ok"),
        ("wake", "tts", "ok"),
        ("clear_cache", None, "unsupported"),  # an unknown device neither
    ]


def test_mutating_routes_never_accept_get(client: httpx.Client) -> None:
    for path in ("/free", "/clear_cache", "/models/asr/unload", "/models/asr/wake"):
        assert client.get(path).status_code == 405, path
    assert client.get("/operations").json() == {"operations": []}


def test_metrics_parse_and_match_the_snapshot(pool: ModelPool, client: httpx.Client) -> None:
    pool["asr"].load()
    client.post("/models/asr/unload")
    pool["llm"].load()
    with vramkit.watch(threshold=0.99, every=None, device="cpu", start=False):
        response = client.get("/metrics")
    reading = vramkit.snapshot("cpu")["cpu"]
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("vramkit_device_memory_bytes", device="cpu", layer="total") == reading.total_bytes
    rss = value("vramkit_device_memory_bytes", device="cpu", layer="process_used")
    assert reading.process_used_bytes is not None
    assert abs(rss - reading.process_used_bytes) < 32 * MiB
    status = pool.status()
    for model in status.models:
        labels = {"model": model.name, "pool": "svc", "device": "cpu"}
        assert value("vramkit_model_device_bytes", **labels) == model.device_bytes
        assert value("vramkit_model_state", **labels, state=model.state) == 1
        assert value("vramkit_model_state", **labels, state="LOADING") == 0
    assert value("vramkit_model_loads_total", model="asr", pool="svc", device="cpu") == 1
    assert value("vramkit_pool_budget_bytes", pool="svc", device="cpu") == 256 * MiB
    assert value("vramkit_pool_charged_bytes", pool="svc", device="cpu") == status.charged_bytes
    assert value("vramkit_pool_evictions_total", pool="svc", device="cpu") == status.evictions
    assert value("vramkit_model_load_seconds_count", model="llm", device="cpu") == 1
    assert value("vramkit_model_unload_seconds_count", model="asr", device="cpu") == 1
    assert value("vramkit_operations_total", action="unload", outcome="ok") == 1
    assert value("vramkit_watch_threshold_ratio", watch="watch") == 0.99
    assert value("vramkit_watch_alerting", watch="watch", device="cpu") == 0


def test_leaks_found_and_oom_recoveries_are_counted(pool: ModelPool, client: httpx.Client) -> None:
    model = pool["asr"]
    with model.use() as live:
        kept = live.layers[0]  # a stale reference the unload will find and free anyway
    client.post("/models/asr/unload")
    del kept

    def oom(m: torch.nn.Module) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        pool.call("llm", oom)
    text = client.get("/metrics").text
    assert 'vramkit_leaks_found_total{device="cpu",model="asr"} 1.0' in text
    assert 'vramkit_oom_recoveries_total{device="cpu",model="llm"} 1.0' in text


def test_concurrent_requests_during_leases_lose_nothing(
    pool: ModelPool, client: httpx.Client
) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def lease_loop(name: str) -> None:
        try:
            while not stop.is_set():
                with pool.use(name) as model:
                    model(torch.ones(1, model.dim))
        except BaseException as exc:
            errors.append(exc)

    answers: list[tuple[str, int, str]] = []
    answers_lock = threading.Lock()

    def request_loop(worker: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            for i in range(4):
                name = ("asr", "llm")[(worker + i) % 2]
                for method, path in (
                    ("POST", f"/models/{name}/unload"),
                    ("POST", f"/models/{name}/wake"),
                    ("GET", "/status"),
                    ("POST", "/free"),
                ):
                    response = own.request(method, path)
                    outcome = response.json().get("outcome", "") if method == "POST" else ""
                    with answers_lock:
                        answers.append((path, response.status_code, outcome))

    leasers = [threading.Thread(target=lease_loop, args=(n,)) for n in ("asr", "llm")]
    requesters = [threading.Thread(target=request_loop, args=(w,)) for w in range(3)]
    for thread in leasers + requesters:
        thread.start()
    for thread in requesters:
        thread.join(300)
    stop.set()
    for thread in leasers:
        thread.join(60)
    assert not errors
    assert len(answers) == 3 * 4 * 4
    assert {code for _, code, _ in answers} <= {200, 409}
    assert {outcome for _, code, outcome in answers if code == 409} == {"busy"}
    mutating = [a for a in answers if a[0] != "/status"]
    log = client.get("/operations", params={"limit": 1000}).json()["operations"]
    assert len(log) == len(mutating)
    assert sorted(o["outcome"] for o in log) == sorted(a[2] for a in mutating)
    assert all(m.leases == 0 for m in pool)


def _outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine, to connect from as a non-loopback client."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def test_a_request_without_the_token_from_a_non_loopback_bind_is_refused(pool: ModelPool) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(InvalidArgumentError, match="needs a token"):
        start_admin_server(pool, host="0.0.0.0")
    tokens = {"ops-team": "s3cret-1", "grafana": "s3cret-2"}
    with start_admin_server(pool, host="0.0.0.0", token=tokens) as server:
        url = f"http://{outside}:{server.port}"
        with httpx.Client(base_url=url, timeout=60) as remote:
            refused = remote.get("/status")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert remote.post("/free").status_code == 401
            wrong = {"Authorization": "Bearer s3cret-3"}
            assert remote.get("/metrics", headers=wrong).status_code == 401
            good = {"Authorization": "Bearer s3cret-1"}
            assert remote.get("/status", headers=good).status_code == 200
            op = remote.post("/free", headers=good).json()
            assert op["caller"] == "ops-team"
            scrape = {"Authorization": "Bearer s3cret-2"}
            assert remote.get("/metrics", headers=scrape).status_code == 200


def test_without_a_token_only_loopback_clients_are_answered(pool: ModelPool) -> None:
    import uvicorn

    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    config = uvicorn.Config(admin_app(pool), host="0.0.0.0", port=0, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = _wait_for_port(server)
        refused = httpx.get(f"http://{outside}:{port}/status", timeout=60)
        assert refused.status_code == 403
        assert "loopback clients only" in refused.json()["detail"]
        local = f"http://127.0.0.1:{port}/status"
        assert httpx.get(local, timeout=60).status_code == 200
        proxied = httpx.get(local, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=60)
        assert proxied.status_code == 403
    finally:
        server.should_exit = True
        thread.join(60)


def _wait_for_port(server: Any) -> int:
    """Bounded wait for uvicorn's startup (it sets ``started``), then its port."""
    done = threading.Event()
    for _ in range(600):
        if server.started or done.wait(0.1):
            break
    assert server.started
    return int(server.servers[0].sockets[0].getsockname()[1])


def test_router_mounted_in_a_fastapi_app(pool: ModelPool) -> None:
    import uvicorn

    from vramkit._runtime import read_records

    app = FastAPI()

    @app.get("/transcribe")
    def transcribe() -> dict[str, str]:
        with pool.use("asr") as model:
            model(torch.ones(1, model.dim))
        return {"text": "ok"}

    app.include_router(admin_router(pool), prefix="/admin")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = _wait_for_port(server)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/transcribe", timeout=60).json() == {"text": "ok"}
        unload = httpx.post(f"{base}/admin/models/asr/unload", timeout=60)
        assert unload.json()["outcome"] == "ok"
        (record,) = [r for r in read_records() if r.pid == psutil.Process().pid]
        assert record.admin_url == f"{base}/admin"
        mine = [m["state"] for m in record.models if m["name"] == "asr" and m["pool"] == "svc"]
        assert mine == ["UNLOADED"]
    finally:
        server.should_exit = True
        thread.join(60)


def test_admin_router_bad_arguments(pool: ModelPool) -> None:
    with pytest.raises(InvalidArgumentError, match="either controls= or"):
        admin_router(pool, controls=Controls(pool))
    with pytest.raises(InvalidArgumentError, match="token must be"):
        admin_router(pool, token=b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="non-empty strings"):
        admin_router(pool, token={"ops": ""})
    with pytest.raises(InvalidArgumentError, match="port must be"):
        start_admin_server(pool, port=70000)


def test_shared_controls_share_one_log(pool: ModelPool) -> None:
    controls = Controls(pool)
    controls.unload("asr", caller="panel-user")
    with start_admin_server(controls=controls) as server:
        httpx.post(f"{server.url}/models/llm/unload", timeout=60)
        log = httpx.get(f"{server.url}/operations", timeout=60).json()["operations"]
    assert [o["caller"] for o in log] == ["panel-user", "127.0.0.1"]


def test_without_the_extra_the_import_names_it() -> None:
    out = run_python(
        """
        import sys
        sys.modules["fastapi"] = None
        try:
            import vramkit.integrations.http
        except ImportError as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert out.startswith("MissingDependencyError ")
    assert 'pip install "vramkit[http]"' in out


def test_a_taken_port_fails_at_the_call(pool: ModelPool) -> None:
    with start_admin_server(pool) as first:
        with pytest.raises(OSError, match=f"could not start on 127.0.0.1:{first.port}"):
            start_admin_server(pool, port=first.port)
        assert httpx.get(f"{first.url}/status", timeout=60).status_code == 200


def test_an_idle_connection_outlives_a_client_pools_keep_alive(client: httpx.Client) -> None:
    # Clients close their idle connections (httpx after 5 s); if the server closed
    # first, a request sent at that moment would be reset, as seen under load.
    url = httpx.URL(str(client.base_url))
    with socket.create_connection((url.host, url.port or 80), timeout=30) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        length = int(
            next(
                line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            ).split(b":")[1]
        )
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += sock.recv(65536)
        sock.settimeout(5.0 + 1.5)
        with pytest.raises(TimeoutError):
            assert sock.recv(1) != b"", "the server closed an idle connection before clients do"
