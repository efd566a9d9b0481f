"""An HTTP admin API for services: status, synchronous free and unload, Prometheus metrics.

Extra ``http`` (FastAPI, uvicorn, prometheus-client). Mount :func:`admin_router`
in your FastAPI app, serve :func:`admin_app` with any ASGI server, or start one
beside a script with :func:`start_admin_server`. Every route works through a
:class:`vramkit.Controls`, so a web panel over the same controls does the same
operations and writes the same operation log.

Routes (relative to where the router is mounted)::

    GET  /status                      devices (three layers), pools, models, watches
    GET  /operations?limit=100        the operation log, oldest first
    GET  /metrics                     Prometheus text format
    POST /free                        evict idle models, clean up; bytes back per device and layer
    POST /clear_cache?device=cuda:0   empty allocator caches
    POST /models/{name}/unload        409 while leased, naming the holders
    POST /models/{name}/offload?tier=cpu|disk
    POST /models/{name}/wake

Mutating routes accept POST only. Without a token the API answers loopback
clients only (and refuses proxied requests, whose real client it cannot see);
with one, every request needs ``Authorization: Bearer <token>``, compared in
constant time. :func:`start_admin_server` refuses to bind anything but
loopback without a token.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from vramkit.errors import InvalidArgumentError, MissingDependencyError

try:  # before vramkit's own imports, so a missing extra is named before torch loads
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised where the extra is missing
    raise MissingDependencyError(
        exc.name or "fastapi", "http", "vramkit.integrations.http"
    ) from exc

from vramkit import ManagedModel, ModelPool, events
from vramkit.controls import Controls, Operation, OperationLog, advertise_admin_url

__all__ = ["AdminServer", "admin_app", "admin_router", "start_admin_server"]

Target = ModelPool | ManagedModel[Any]
Token = str | Mapping[str, str] | None

# HTTP status per outcome: a busy model or a full budget is a conflict with the
# current state, an action a device cannot do is a request that cannot be met.
_STATUS = {
    "ok": 200,
    "noop": 200,
    "busy": 409,
    "no_room": 409,
    "not_found": 404,
    "unsupported": 422,
    "failed": 500,
}
_FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Route name -> its path relative to the mount point (path parameters as format fields).
_ROUTES = {
    "vramkit_status": "/status",
    "vramkit_operations": "/operations",
    "vramkit_metrics": "/metrics",
    "vramkit_free": "/free",
    "vramkit_clear_cache": "/clear_cache",
    "vramkit_unload": "/models/{name}/unload",
    "vramkit_offload": "/models/{name}/offload",
    "vramkit_wake": "/models/{name}/wake",
}
_STATES = ("UNLOADED", "LOADING", "READY", "OFFLOADING", "OFFLOADED", "WAKING", "UNLOADING")


# ---------------------------------------------------------------------- access


class _Access:
    """Who may call: token holders, or (with no token) loopback clients only."""

    def __init__(self, token: Token) -> None:
        self._tokens = _parse_tokens(token)

    def __call__(self, request: Request) -> str:
        """A FastAPI dependency: the caller's name for the log, or a 401/403."""
        if self._tokens:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            name = self._match(given.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise HTTPException(
                    401,
                    "this admin API needs 'Authorization: Bearer <token>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return name
        host = request.client.host if request.client is not None else None
        if not _is_loopback(host) or any(h in request.headers for h in _FORWARDED):
            raise HTTPException(
                403,
                "this admin API has no token, so it answers loopback clients only (and no "
                "proxied requests); give it token=... to serve other addresses",
            )
        return str(host)

    def _match(self, given: str) -> str | None:
        found = None
        for name, token in self._tokens.items():  # every token compared: no early exit
            if hmac.compare_digest(token.encode(), given.encode()):
                found = name
        return found


def _parse_tokens(token: Token) -> dict[str, str]:
    if token is None:
        return {}
    if isinstance(token, str):
        token = {"token": token}
    if not isinstance(token, Mapping) or not token:
        raise InvalidArgumentError(
            f"token must be a string, a mapping of names to tokens, or None; got {token!r}"
        )
    for name, value in token.items():
        if not isinstance(name, str) or not name or not isinstance(value, str) or not value:
            raise InvalidArgumentError(
                "token names and tokens must be non-empty strings; got "
                f"{name!r}: {'<empty>' if value == '' else type(value).__name__}"
            )
    return dict(token)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- metrics


class _Metrics(Collector):
    """Prometheus metrics of one set of controls: read at scrape time, plus event-fed series."""

    def __init__(self, controls: Controls) -> None:
        self._controls = controls
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "device")
        self._load = Histogram(
            "vramkit_model_load_seconds",
            "Seconds from a load's start to READY",
            labels,
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._wake = Histogram(
            "vramkit_model_wake_seconds",
            "Seconds from a wake's start to READY",
            labels,
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._unload = Histogram(
            "vramkit_model_unload_seconds",
            "Seconds an unload took, proof of death and cleanup included",
            labels,
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._oom = Counter(
            "vramkit_oom_recoveries",
            "Out-of-memory errors in a lease that the pool recovered from by evicting",
            labels,
            registry=self.registry,
        )
        self._leaks = Counter(
            "vramkit_leaks_found",
            "Unloads after which something still held the model (its memory freed anyway)",
            labels,
            registry=self.registry,
        )
        self._operations = Counter(
            "vramkit_operations",
            "Control operations by action and outcome",
            ("action", "outcome"),
            registry=self.registry,
        )
        self.registry.register(self)
        _subscribe_weakly(events.subscribe, self, "on_event")
        _subscribe_weakly(controls.log.subscribe, self, "on_operation")

    def on_event(self, event: events.Event) -> None:
        """Feed histograms and counters from a transition."""
        series = {"load": self._load, "wake": self._wake, "unload": self._unload}.get(event.kind)
        if series is not None:
            series.labels(event.model, event.device).observe(event.seconds)
        if event.kind == "oom":
            self._oom.labels(event.model, event.device).inc()
        if event.kind == "unload" and event.detail.get("died") is False:
            self._leaks.labels(event.model, event.device).inc()

    def on_operation(self, operation: Operation) -> None:
        """Count a control operation."""
        self._operations.labels(operation.action, operation.outcome).inc()

    def collect(self) -> Iterable[Any]:
        """The gauges and counters read from :meth:`Controls.status` at scrape time."""
        status = self._controls.status()
        yield from _device_metrics(status["devices"])
        yield from _model_metrics(status["models"])
        yield from _pool_metrics(status["pools"])
        yield from _watch_metrics(status["watches"])

    def describe(self) -> Iterable[Any]:
        """Nothing: read-at-scrape metrics are not described ahead (no checks for clashes)."""
        return ()

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return bytes(generate_latest(self.registry))


def _subscribe_weakly(
    subscribe: Callable[[Callable[[Any], object]], Callable[[], None]], owner: object, method: str
) -> None:
    """Subscribe ``owner.<method>`` without keeping ``owner`` alive (apps come and go)."""
    ref = weakref.WeakMethod(getattr(owner, method))
    unsubscribe: Callable[[], None] | None = None

    def forward(item: Any) -> None:
        bound = ref()
        if bound is None:
            if unsubscribe is not None:
                unsubscribe()
            return
        bound(item)

    unsubscribe = subscribe(forward)


def _gauge(name: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


_LAYERS = (
    "allocated",
    "peak_allocated",
    "reserved",
    "used",
    "free",
    "total",
    "process_used",
    "process_peak",
)


def _device_metrics(devices: list[dict[str, Any]]) -> Iterable[Any]:
    memory = _gauge(
        "vramkit_device_memory_bytes",
        "Device memory per layer: allocated/reserved (framework), used/free/total (driver or "
        "OS, all processes), process_used (this process per the driver, or RSS)",
        ("device", "layer"),
    )
    ratio = _gauge(
        "vramkit_device_used_ratio", "Used over total, driver or OS numbers", ("device",)
    )
    for device in devices:
        for layer in _LAYERS:
            value = device.get(f"{layer}_bytes")
            if value is not None:
                memory.add_metric([device["device"], layer], value)
        if device["used_fraction"] is not None:
            ratio.add_metric([device["device"]], device["used_fraction"])
    return (memory, ratio)


def _model_metrics(models: list[dict[str, Any]]) -> Iterable[Any]:
    labels = ("model", "pool", "device")
    gauges = {
        "device_bytes": _gauge(
            "vramkit_model_device_bytes", "Bytes the model holds on its device now", labels
        ),
        "size_bytes": _gauge(
            "vramkit_model_size_bytes", "The model's size, measured at load or expected", labels
        ),
        "leases": _gauge("vramkit_model_leases", "Leases out now", labels),
        "idle_seconds": _gauge(
            "vramkit_model_idle_seconds", "Seconds since the last lease ended", labels
        ),
        "keep_alive": _gauge(
            "vramkit_model_keep_alive_seconds", "Idle seconds before expiry", labels
        ),
    }
    counters = {
        key: CounterMetricFamily(
            f"vramkit_model_{key}", f"Completed {key} of the model", labels=list(labels)
        )
        for key in ("loads", "wakes", "offloads", "unloads")
    }
    state = _gauge(
        "vramkit_model_state", "1 for the model's state now, 0 for the others", (*labels, "state")
    )
    for model in models:
        values = [model["name"], model.get("pool") or "", model["device"]]
        for key, family in gauges.items():
            if model.get(key) is not None:
                family.add_metric(values, model[key])
        for key, counter in counters.items():
            counter.add_metric(values, model.get(key, 0))
        for name in _STATES:
            state.add_metric([*values, name], 1.0 if model["state"] == name else 0.0)
    return (*gauges.values(), *counters.values(), state)


def _pool_metrics(pools: list[dict[str, Any]]) -> Iterable[Any]:
    labels = ("pool", "device")
    gauges = {
        key: _gauge(f"vramkit_pool_{key}", doc, labels)
        for key, doc in (
            ("budget_bytes", "The pool's budget now"),
            ("charged_bytes", "Bytes charged against the budget: resident models and loads"),
            ("peak_charged_bytes", "Highest charged bytes seen"),
            ("headroom_bytes", "Bytes kept free beyond each reservation"),
        )
    }
    counters = {
        key: CounterMetricFamily(f"vramkit_pool_{key}", doc, labels=list(labels))
        for key, doc in (
            ("loads", "Loads and wakes the pool admitted"),
            ("evictions", "Models evicted to make room"),
        )
    }
    for pool in pools:
        values = [pool["name"], pool["device"]]
        for key, family in gauges.items():
            family.add_metric(values, pool[key])
        for key, counter in counters.items():
            counter.add_metric(values, pool[key])
    return (*gauges.values(), *counters.values())


def _watch_metrics(watches: list[dict[str, Any]]) -> Iterable[Any]:
    threshold = _gauge("vramkit_watch_threshold_ratio", "The alert threshold", ("watch",))
    alerting = _gauge(
        "vramkit_watch_alerting", "1 while the device is over the threshold", ("watch", "device")
    )
    alerts = CounterMetricFamily("vramkit_watch_alerts", "Threshold crossings", labels=["watch"])
    actions = CounterMetricFamily("vramkit_watch_actions", "Timed cleanups run", labels=["watch"])
    for watch in watches:
        if watch["threshold"] is not None:
            threshold.add_metric([watch["name"]], watch["threshold"])
        for device, line in watch["devices"].items():
            alerting.add_metric([watch["name"], device], 1.0 if line["alerting"] else 0.0)
        alerts.add_metric([watch["name"]], watch["alerts"])
        actions.add_metric([watch["name"]], watch["actions_run"])
    return (threshold, alerting, alerts, actions)


# ---------------------------------------------------------------------- routes


def admin_router(
    *targets: Target,
    controls: Controls | None = None,
    token: Token = None,
    log: OperationLog | None = None,
) -> APIRouter:
    """A FastAPI ``APIRouter`` with the admin routes, to mount in your app.

    Args:
        *targets: Pools and models to control (none: every one of the process).
        controls: Use these :class:`~vramkit.Controls` instead (their pools,
            models and log; share them with a web panel). Not with ``targets``.
        token: ``None`` (loopback clients only), a token, or ``{name: token}``
            (the name goes to the operation log as the caller).
        log: The operation log for new controls (default: a new one).

    Returns:
        The router: ``app.include_router(router, prefix="/admin")``.

    Raises:
        InvalidArgumentError: Bad targets or tokens, or ``controls`` with targets or ``log``.
    """
    if controls is not None and (targets or log is not None):
        raise InvalidArgumentError("pass either controls= or pools/models (and log=), not both")
    if controls is not None and not isinstance(controls, Controls):
        raise InvalidArgumentError(f"controls must be a vramkit.Controls; got {controls!r}")
    controls = controls if controls is not None else Controls(*targets, log=log)
    access = _Access(token)
    metrics = _Metrics(controls)
    advertised = threading.Event()

    def caller(request: Request) -> str:
        name = access(request)
        if not advertised.is_set():
            advertised.set()
            _advertise(request)
        return name

    router = APIRouter(dependencies=[Depends(caller)])
    router.add_api_route("/status", controls.status, methods=["GET"], name="vramkit_status")

    @router.get("/operations", name="vramkit_operations")
    def operations(limit: int = Query(100, ge=0, le=100_000)) -> dict[str, Any]:
        return {"operations": controls.log.to_list(limit=limit)}

    @router.get("/metrics", name="vramkit_metrics")
    def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.post("/free", name="vramkit_free")
    def free(who: str = Depends(caller)) -> JSONResponse:
        return _answer(controls.free(caller=who))

    @router.post("/clear_cache", name="vramkit_clear_cache")
    def clear_cache(device: str | None = None, who: str = Depends(caller)) -> JSONResponse:
        try:
            return _answer(controls.clear_cache(caller=who, device=device))
        except InvalidArgumentError as exc:
            raise HTTPException(422, str(exc)) from exc

    @router.post("/models/{name:path}/unload", name="vramkit_unload")
    def unload(name: str, who: str = Depends(caller)) -> JSONResponse:
        return _answer(controls.unload(name, caller=who))

    @router.post("/models/{name:path}/offload", name="vramkit_offload")
    def offload(
        name: str, tier: Literal["cpu", "disk"] = "cpu", who: str = Depends(caller)
    ) -> JSONResponse:
        return _answer(controls.offload(name, tier, caller=who))

    @router.post("/models/{name:path}/wake", name="vramkit_wake")
    def wake(name: str, who: str = Depends(caller)) -> JSONResponse:
        return _answer(controls.wake(name, caller=who))

    return router


def _answer(operation: Operation) -> JSONResponse:
    return JSONResponse(operation.to_dict(), status_code=_STATUS[operation.outcome])


def _advertise(request: Request) -> None:
    """Publish this API's address for ``vramkit ps`` / ``vramkit free``, from the first request."""
    server = request.scope.get("server")
    template = _ROUTES.get(getattr(request.scope.get("route"), "name", ""))
    if not server or template is None:
        return
    # The mount prefix is what precedes our own route in the path requested.
    suffix = template.format(**request.path_params)
    root, path = request.scope.get("root_path", ""), request.scope["path"]
    full = path if path.startswith(root) else root + path
    if not full.endswith(suffix):
        return
    host, port = str(server[0]), int(server[1])
    host = f"[{host}]" if ":" in host else host
    advertise_admin_url(f"{request.url.scheme}://{host}:{port}{full[: len(full) - len(suffix)]}")


def admin_app(
    *targets: Target,
    controls: Controls | None = None,
    token: Token = None,
    log: OperationLog | None = None,
) -> FastAPI:
    """An ASGI app serving :func:`admin_router` at its root (same arguments).

    Serve it with uvicorn (``uvicorn.run(admin_app(pool), host="127.0.0.1")``)
    or mount it in another ASGI app.

    Returns:
        A FastAPI application.
    """
    app = FastAPI(title="vramkit admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(admin_router(*targets, controls=controls, token=token, log=log))
    return app


# ---------------------------------------------------------------------- a server beside a script


_KEEP_ALIVE_SECONDS = 75
"""How long the admin server keeps an idle connection open (longer than clients' pools do)."""


class AdminServer:
    """uvicorn serving the admin app on a background thread (see :func:`start_admin_server`)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            def __init__(self, config: uvicorn.Config) -> None:
                super().__init__(config)
                self.ready = threading.Event()

            async def startup(self, sockets: Any = None) -> None:
                try:
                    await super().startup(sockets)
                finally:
                    self.ready.set()  # started or failed: the caller reads `started`

        # An idle keep-alive connection is closed by whichever side times out
        # first; if the server does (uvicorn's default is 5 s, the same as
        # httpx's pool) a request sent at that moment is reset. Holding idle
        # connections longer than clients do leaves the closing to them.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=_KEEP_ALIVE_SECONDS,
        )
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._serve, name="vramkit-admin-http", daemon=True)
        self._host = host
        self._port = port

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: _start says so
            self._server.run()

    def _start(self) -> None:
        self._thread.start()
        if not self._server.ready.wait(60) or not self._server.started:
            self.stop()
            raise OSError(f"the admin server could not start on {self._host}:{self._port}")
        sockets = [s for server in self._server.servers for s in server.sockets]
        self._port = int(sockets[0].getsockname()[1])
        advertise_admin_url(self.url)

    @property
    def url(self) -> str:
        """Where the API answers, such as ``http://127.0.0.1:8765``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if self._host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and wait for its thread (idempotent)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        advertise_admin_url(None)

    def __enter__(self) -> AdminServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_admin_server(
    *targets: Target,
    host: str = "127.0.0.1",
    port: int = 0,
    token: Token = None,
    controls: Controls | None = None,
    log: OperationLog | None = None,
) -> AdminServer:
    """Serve the admin API on a background thread, beside a script or a batch job.

    Args:
        *targets: Pools and models to control (none: every one of the process).
        host: The address to bind: loopback by default; any other needs a token.
        port: The port (``0``: a free one; read it from ``server.port``).
        token: As in :func:`admin_router`.
        controls: As in :func:`admin_router`.
        log: As in :func:`admin_router`.

    Returns:
        The running :class:`AdminServer` (a context manager that stops it).

    Raises:
        InvalidArgumentError: A non-loopback ``host`` without a token, or a bad port.
        OSError: The server could not start (the port is taken).
    """
    if not isinstance(host, str) or not host:
        raise InvalidArgumentError(f"host must be an address such as '127.0.0.1'; got {host!r}")
    if token is None and not _is_loopback(host):
        raise InvalidArgumentError(
            f"binding the admin API to {host!r} needs a token (token='...'): without one it "
            "is served on loopback only"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be 0..65535; got {port!r}")
    server = AdminServer(admin_app(*targets, controls=controls, token=token, log=log), host, port)
    server._start()
    return server
