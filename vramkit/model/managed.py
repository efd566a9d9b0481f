r"""``ManagedModel``: the life of one model, from lazy load to a proven unload.

::

    UNLOADED --load--> LOADING --> READY <--lease/return--> (in use: leases > 0)
       ^                             |  \\--offload--> OFFLOADED (cpu / disk tier)
       |                             |                    |--wake--> READY
       +------ unload (no leases) ---+--------------------+

A ``ManagedModel`` holds the only strong reference to the loaded object. Code
borrows it through a *lease* (``with mm.use() as model:``, ``@mm.inference``,
``mm(...)``); while any lease is out the model cannot be unloaded or offloaded.
``unload()`` releases the object, drops the reference, collects, and proves with
weak references that it died; if something else still holds it, the report
names the holder and the memory is freed anyway.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

import torch

from vramkit import _runtime, events
from vramkit._keepalive import KeepAliveScheduler, default_scheduler, keep_alive_seconds
from vramkit._units import check_flag, check_seconds, format_bytes, parse_bytes, parse_timeout
from vramkit._utils import callable_name, clear_frames
from vramkit.adapters import Adapter, GenericAdapter, adapter_for
from vramkit.adapters._checkpoint import checkpoint_bytes
from vramkit.adapters.funasr import check_funasr, funasr_loader
from vramkit.adapters.onnxruntime import (
    check_onnx_path,
    check_provider_options,
    check_providers,
    default_providers,
    device_from_providers,
    onnx_loader,
)
from vramkit.adapters.torch import check_torch_factory, torch_loader
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceLike, DeviceMemory, get_backend, resolve_device
from vramkit.errors import (
    InvalidArgumentError,
    ModelBusyError,
    ModelStateError,
    VramLeakError,
    WorkerCrashedError,
)
from vramkit.isolation import Isolation, WorkerProxy, worker_pid
from vramkit.isolation._loader import IsolatedLoader
from vramkit.isolation._spec import isolation_options
from vramkit.model import tiers
from vramkit.model._lease import InferenceFunction, Lease
from vramkit.model._loader import check_loaded, remember
from vramkit.model._unload import Unload, release_and_prove
from vramkit.model.reports import LoadReport, ModelState, ModelStats, UnloadReport

if TYPE_CHECKING:
    from vramkit.model.tiers import OffloadReport, TierCost, WakeReport
    from vramkit.policy import CleanupPolicy, CleanupTracker

__all__ = ["ManagedModel", "live_models"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

_SETTLED = frozenset({ModelState.UNLOADED, ModelState.READY, ModelState.OFFLOADED})
_LOADING = frozenset({ModelState.LOADING, ModelState.WAKING})
_LEASE_REENTERED = (
    "{name}: a lease was requested while this thread is {doing} the model "
    "(a loader or release that uses the model it is building?)"
)

_lease_ids = itertools.count(1)
_get_ident = threading.get_ident
_monotonic = time.monotonic


def _thread_name(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return f"thread {ident} (ended)"


_instances: weakref.WeakSet[ManagedModel[Any]] = weakref.WeakSet()
_instances_lock = threading.Lock()


def live_models() -> list[ManagedModel[Any]]:
    """Every ``ManagedModel`` alive in this process, oldest first (for reports and status)."""
    with _instances_lock:
        models = list(_instances)
    return sorted(models, key=lambda m: m._created)


def _manager_options(options: object) -> dict[str, Any]:
    """Check ``manager_options=``: a mapping of the constructor's own keyword options.

    Passed on as ``**options``, a wrong key would fail inside the constructor
    with a TypeError about an "unexpected keyword argument".
    """
    if options is None:
        return {}
    # The from_* method sets these itself (isolate= is its own parameter).
    taken = ("loader", "name", "device", "config", "isolate")
    allowed = [p for p in inspect.signature(ManagedModel.__init__).parameters if p != "self"]
    allowed = [p for p in allowed if p not in taken]
    if not isinstance(options, Mapping) or not all(k in allowed for k in options):
        raise InvalidArgumentError(
            f"manager_options must be a mapping of ManagedModel options ({', '.join(allowed)}) "
            f"or None; got {options!r}"
        )
    return dict(options)


class ManagedModel(Generic[T]):
    """One model under management: lazy loading, leases, reference-safe unloading.

    Args:
        loader: A zero-argument callable that builds and returns the model
            object (a torch module, a FunASR ``AutoModel``, an ONNX Runtime
            session, anything). What it closes over is the model's
            configuration: it survives unload, so a reload is the same model.
            The loader places the model on its device; the ``from_*``
            constructors do that for you. It must build a *new* object at
            each call: ``None``, a generator, a module whose weights are all
            on ``meta``, an object it closes over or one it returned before
            (a ``functools.lru_cache``) are refused at load (see ``owns``).
        name: A name for reports, events and pools (default: the loader's name).
        device: The device the model lives on (default: the best available).
        keep_alive: Seconds an idle model stays loaded after its last lease
            (``0``: unload as soon as the last lease ends; ``None`` or
            infinity: never expire). A ``datetime.timedelta`` works too.
        adapter: How to measure and release the object (default: looked up
            from the loaded object's type).
        release: For objects with their own teardown: called with the object
            on unload (builds a :class:`~vramkit.adapters.GenericAdapter`).
        size: With ``release``: returns the object's size in bytes.
        inference_mode: Run leases under ``torch.inference_mode()`` so outputs
            drag no autograd graph (async leases excepted; see docs).
        cleanup: A :class:`~vramkit.policy.CleanupPolicy` applied after each
            ``@inference`` call (default: clean only under memory pressure).
        strict: Make ``unload()`` raise :class:`VramLeakError` when something
            still held the model (default: report it).
        free_survivors: Free the memory of objects that outlive unloading
            (every tensor on the model's storages emptied and made to raise,
            ONNX sessions detached) so a stale reference pins nothing and
            fails loudly when used.
        owns: ``False`` when the loader hands out an object you keep and own
            (``lambda: prebuilt``): vramkit then lends it out and offloads it,
            but an unload only lets go of vramkit's reference, never frees or
            breaks the object, and does not search for its holders.
        driver_wait: On accelerators, seconds to wait after unloading for the
            driver to show the memory back (polled every 0.25 s); finite.
        offload_dir: Where the disk tier writes, in a private subdirectory of
            its own (default: ``$VRAMKIT_CACHE_DIR``, else the user cache
            directory). See "Security" in the docs for what it trusts.
        size_hint: Expected size (bytes or ``"1.5GiB"``) before the first load,
            for budgets; replaced by the measured size once loaded.
        config: The configuration the loader closes over, for display
            (``mm.config``); the ``from_*`` constructors fill it in.
        isolate: Run the loader in a worker process of its own (``True``, or
            a :class:`~vramkit.isolation.Isolation` with time bounds): leases
            lend a :class:`~vramkit.isolation.WorkerProxy`, unloading ends the
            process, a crash raises :class:`~vramkit.WorkerCrashedError`. The
            loader (and ``adapter``, ``release``, ``size``) must then be
            picklable, or ``loader`` an import path ``"package.module:function"``.

    Example:
        >>> import torch
        >>> mm = ManagedModel(lambda: torch.nn.Linear(4, 2), name="tiny", device="cpu")
        >>> with mm.use() as model:
        ...     y = model(torch.ones(1, 4))
        >>> mm.unload().died
        True
    """

    def __init__(
        self,
        loader: Callable[[], T],
        *,
        name: str | None = None,
        device: DeviceLike | None = None,
        keep_alive: float | datetime.timedelta | None = None,
        adapter: Adapter | None = None,
        release: Callable[[T], object] | None = None,
        size: Callable[[T], int | None] | None = None,
        inference_mode: bool = True,
        cleanup: CleanupPolicy | None = None,
        strict: bool = False,
        free_survivors: bool = True,
        owns: bool = True,
        driver_wait: float = 5.0,
        offload_dir: str | os.PathLike[str] | None = None,
        size_hint: int | str | None = None,
        config: Mapping[str, Any] | None = None,
        isolate: bool | Isolation = False,
    ) -> None:
        if isolate is not False:
            # The loader, the adapter and the cleanup policy go to the worker;
            # here the loaded object is a proxy, handled by the worker adapter.
            # Checked here first: in the worker a bad option would fail only at load.
            _check_options(cleanup, config, offload_dir)
            worker_options = {
                "inference_mode": inference_mode,
                "owns": owns,  # the loader's contract holds where the loader runs
                **{
                    key: value
                    for key, value in (
                        ("adapter", adapter),
                        ("release", release),
                        ("size", size),
                        ("cleanup", cleanup),
                        ("offload_dir", offload_dir),
                    )
                    if value is not None
                },
            }
            loader = self._isolated(loader, name, device, isolate, worker_options)
            adapter = release = size = cleanup = None
        if not callable(loader):
            raise InvalidArgumentError(
                f"loader must be a zero-argument callable that returns the model; got {loader!r}"
            )
        if name is None:
            name = callable_name(loader)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"name must be a non-empty string; got {name!r}")
        if adapter is not None and (release is not None or size is not None):
            raise InvalidArgumentError("pass either adapter= or release=/size=, not both")
        if release is not None or size is not None:
            adapter = GenericAdapter(release=release, size=size, name=name)
        if adapter is not None and not isinstance(adapter, Adapter):
            raise InvalidArgumentError(
                f"adapter must implement vramkit.adapters.Adapter; got {adapter!r}"
            )
        _check_options(cleanup, config, offload_dir)
        self._loader = loader
        self._name = name
        self._device = resolve_device(device)
        self._keep_alive = keep_alive_seconds(keep_alive)
        self._adapter_override = adapter
        self._adapter: Adapter | None = None
        self._inference_mode = check_flag(inference_mode, "inference_mode")
        self._strict = check_flag(strict, "strict")
        self._free_survivors = check_flag(free_survivors, "free_survivors")
        self._owns = check_flag(owns, "owns")
        self._last: weakref.ref[Any] | None = None  # the object of the last load, if alive
        self._driver_wait = check_seconds(driver_wait, "driver_wait")
        self._config = MappingProxyType(dict(config or {}))
        self._policy = cleanup
        self._tracker: CleanupTracker | None = None

        # Fast paths (lease, return) take the plain lock; waits go through the condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = ModelState.UNLOADED
        self._obj: T | None = None
        # token -> (thread id, since, the asyncio task holding it or None for a sync lease)
        self._leases: dict[int, tuple[int, float, object]] = {}
        self._last_used: float | None = None
        self._waiting = 0  # threads blocked in _wait(), so returns can skip notify_all
        # Threads on their way to a lease through a load or wake: between the load's end
        # and their lease the model is READY with no lease, and a pool must not evict it
        # there (the lease would load it again, racing the very load that evicted it).
        self._acquiring = 0
        self._busy_thread: int | None = None  # thread running a load / unload / offload
        self._stamp = 0  # bumped at every lease and load: a keep-alive expiry must match it
        self._closed = False
        self._stats = ModelStats()
        self._scheduler: KeepAliveScheduler | None = None
        self._owner: Any = None  # the ModelPool this model belongs to, if any
        # TODO(one owner of the tier state): _tier repeats _offloaded.tier, but _claim
        # takes _offloaded out while the pool still reads .tier mid-unload (its
        # _resident); one "parked" record that stays on the model through a claim
        # would end the duplicate.
        self._tier: str | None = None
        self._offloaded: Any = None  # tier-specific state while OFFLOADED
        self._disk_cache: Any = None  # the file a disk wake came from, reusable if unchanged
        self._offload_dir = Path(offload_dir).expanduser() if offload_dir is not None else None
        self._size_hint = None if size_hint is None else parse_bytes(size_hint, what="size_hint")
        self._created = next(_lease_ids)
        with _instances_lock:
            _instances.add(self)

    def _isolated(
        self,
        loader: object,
        name: str | None,
        device: DeviceLike | None,
        isolate: bool | Isolation,
        worker_options: Mapping[str, Any],
    ) -> Callable[[], Any]:
        """The loader of an isolated model: start a worker that runs ``loader``."""
        options = isolation_options(isolate)
        assert options is not None
        if not (callable(loader) or isinstance(loader, str)):
            raise InvalidArgumentError(
                "loader must be a zero-argument callable or an import path "
                f"'package.module:function'; got {loader!r}"
            )
        lost = weakref.WeakMethod(self._object_lost)

        def crashed(proxy: object, error: BaseException) -> None:
            model = lost()
            if model is not None:
                model(proxy, error)

        return IsolatedLoader(
            ManagedModel,  # what the worker builds its own (in-process) model with
            loader,
            name=name,
            device=str(resolve_device(device)),
            options=options,
            worker_options=worker_options,
            on_crash=crashed,
        )

    def _object_lost(self, obj: object, error: BaseException) -> None:
        """The loaded object died on its own (its worker process crashed): now UNLOADED.

        Leases still out keep their (dead) object and fail when they use it;
        the next lease loads afresh.
        """
        with self._cond:
            before = self._state
            if self._obj is not obj or before not in (ModelState.READY, ModelState.OFFLOADED):
                return  # already replaced, or a transition in progress handles it
            self._obj = self._offloaded = None
            self._tier = None
            self._settle(ModelState.UNLOADED)
        if self._owner is not None:
            self._owner._freed(self)
        self._emit(
            "crash",
            before.value,
            "UNLOADED",
            bytes=self._stats.size_bytes,
            detail={"error": str(error).partition("\n")[0]},
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_torch(
        cls,
        factory: Callable[[], torch.nn.Module],
        *,
        device: DeviceLike | None = None,
        dtype: torch.dtype | None = None,
        eval: bool = True,
        name: str | None = None,
        **options: Any,
    ) -> ManagedModel[torch.nn.Module]:
        """Manage a torch module built by ``factory``, moved to ``device`` (and ``dtype``).

        Args:
            factory: A zero-argument callable returning an ``nn.Module``; it is
                called again on every reload. (Not the module itself: vramkit
                must be able to rebuild what it unloads.)
            device: Where the module goes (default: the best available device).
            dtype: Optional dtype to cast floating-point weights to.
            eval: Put the module in eval mode (dropout off, BatchNorm frozen).
            name: Name for reports (default: the factory's name).
            **options: Passed to :class:`ManagedModel`.

        Returns:
            A ``ManagedModel`` whose loaded object is the module.
        """
        check_torch_factory(factory, dtype)
        check_flag(eval, "eval")
        target = resolve_device(device)
        loader, config = torch_loader(factory, device=str(target), dtype=dtype, eval=eval)
        return ManagedModel[torch.nn.Module](
            loader,
            name=name or callable_name(factory),
            device=target,
            config=config,
            **options,
        )

    @classmethod
    def from_funasr(
        cls,
        model: str | os.PathLike[str],
        *,
        device: DeviceLike | None = None,
        name: str | None = None,
        disable_update: bool = True,
        manager_options: Mapping[str, Any] | None = None,
        isolate: bool | Isolation = False,
        **automodel_kwargs: Any,
    ) -> ManagedModel[Any]:
        """Manage a FunASR ``AutoModel`` built from a local directory or a hub name.

        Everything in ``automodel_kwargs`` (``vad_model``, ``punc_model``,
        ``hotword``, ``language``, ``batch_size_s``, ...) is kept and passed
        again on every reload, so settings survive unloading.

        FunASR's global side effects are undone after each load: it sets
        torch's thread count (and resets it at every ``generate()`` to
        ``ncpu``, which vramkit therefore defaults to the current count), seeds
        the global random generators, and configures the root logger.

        Args:
            model: A model directory (``config.yaml`` + ``model.pt``), a
                ModelScope id such as ``"iic/SenseVoiceSmall"`` (found in the
                local ModelScope cache, ``$MODELSCOPE_CACHE`` or
                ``~/.cache/modelscope/hub``; vramkit never downloads), or a
                FunASR alias such as ``"fsmn-vad"`` (left to FunASR).
            device: Where the networks go (default: the best available device).
            name: Name for reports (default: the directory's name).
            disable_update: Skip FunASR's version check against PyPI.
            manager_options: Options for :class:`ManagedModel` itself
                (``keep_alive``, ``strict``...), kept apart from FunASR's own.
            isolate: Run the pipeline in a worker process (see :class:`ManagedModel`).
            **automodel_kwargs: Passed to ``funasr.AutoModel``.

        Raises:
            InvalidArgumentError: A path (for ``model``, ``vad_model``,
                ``punc_model``, ``spk_model``) that does not exist or is not a
                FunASR model directory.
            MissingModelError: A ModelScope id that is not in the local cache.
            MissingDependencyError: funasr is not installed.
        """
        check_flag(disable_update, "disable_update")
        options = _manager_options(manager_options)
        directory, kwargs = check_funasr(model, automodel_kwargs)
        target = resolve_device(device)
        loader, config = funasr_loader(
            directory,
            device=str(target),
            disable_update=disable_update,
            automodel_kwargs=kwargs,
        )
        return cls(
            loader,
            name=name or Path(os.fspath(model)).name or "funasr",
            device=target,
            config=config,
            isolate=isolate,
            **options,
        )

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike[str],
        *,
        providers: list[Any] | None = None,
        sess_options: Any = None,
        provider_options: list[dict[str, Any]] | None = None,
        device: DeviceLike | None = None,
        arena: bool = True,
        name: str | None = None,
        **options: Any,
    ) -> ManagedModel[Any]:
        """Manage an ONNX Runtime ``InferenceSession`` of the model at ``path``.

        Args:
            path: An ``.onnx`` (or ``.ort``) file.
            providers: Execution providers (default: CUDA on ``cuda:N`` devices,
                with ``device_id`` set, then CPU).
            sess_options: An ``onnxruntime.SessionOptions``, reused at every reload.
            provider_options: Per-provider options, as ONNX Runtime takes them.
            device: Where the session runs (default: inferred from
                ``providers``, else ``cpu``).
            arena: Keep ONNX Runtime's CPU memory arena. ``False`` lowers the
                steady-state host memory at some speed cost.
            name: Name for reports (default: the file's stem).
            **options: Passed to :class:`ManagedModel`.

        Raises:
            InvalidArgumentError: ``path`` is not an existing file.
            MissingDependencyError: onnxruntime is not installed.
        """
        check_flag(arena, "arena")
        file = check_onnx_path(path)
        check_providers(providers)
        check_provider_options(provider_options, providers)
        target = resolve_device(device_from_providers(providers) if device is None else device)
        if providers is None:
            providers = default_providers(target.kind, target.index)
        loader, config = onnx_loader(
            file,
            providers=providers,
            sess_options=sess_options,
            provider_options=provider_options,
            arena=arena,
        )
        return cls(loader, name=name or file.stem, device=target, config=config, **options)

    # ------------------------------------------------------------------ read-only view

    @property
    def name(self) -> str:
        """The model's name."""
        return self._name

    @property
    def device(self) -> Device:
        """The device the model lives on."""
        return self._device

    @property
    def state(self) -> ModelState:
        """The current :class:`ModelState`."""
        return self._state

    @property
    def tier(self) -> str | None:
        """The offload tier (``"cpu"``, ``"disk"``) while ``OFFLOADED``, else ``None``."""
        return self._tier

    @property
    def leases(self) -> int:
        """How many leases are out right now."""
        return len(self._leases)

    @property
    def is_loaded(self) -> bool:
        """Whether the object is resident and ready (``READY``)."""
        return self._state is ModelState.READY

    @property
    def keep_alive(self) -> float | None:
        """Idle seconds before expiry (``None``: never)."""
        return self._keep_alive

    @property
    def config(self) -> Mapping[str, Any]:
        """The configuration the loader closes over (read-only)."""
        return self._config

    @property
    def adapter(self) -> Adapter | None:
        """The adapter in use (known once the model has loaded, or when given)."""
        return self._adapter_override or self._adapter

    @property
    def stats(self) -> ModelStats:
        """Counters and measured costs (load seconds, size, wake seconds per tier...)."""
        return replace(self._stats, last_used=self._last_used)

    @property
    def size_bytes(self) -> int | None:
        """Bytes the model held at its last load (``None`` before the first)."""
        return self._stats.size_bytes

    @property
    def expected_bytes(self) -> int | None:
        """Bytes the model will need when loaded: measured at its last load, else estimated.

        The estimate is the size of its checkpoint files (``model.pt``,
        ``*.safetensors``, ``*.onnx``... under the paths in ``config``) or the
        ``size_hint`` it was given; ``None`` when nothing is known.
        """
        if self._stats.size_bytes is not None:
            return self._stats.size_bytes
        if self._size_hint is not None:
            return self._size_hint
        return checkpoint_bytes(self._config)

    @property
    def idle_seconds(self) -> float | None:
        """Seconds since the last lease ended, while loaded and idle; else ``None``."""
        last = self._last_used
        if self._leases or last is None or self._state is ModelState.UNLOADED:
            return None
        return time.monotonic() - last

    @property
    def pool(self) -> Any:
        """The :class:`~vramkit.ModelPool` this model belongs to, or ``None``.

        Typed loosely: pools sit a layer above models, which never import them.
        """
        return self._owner

    @property
    def device_bytes(self) -> int:
        """Bytes the model holds on its device now: what leaving the device would free.

        Transitional states count what is really there: a model unloading (or
        switching tiers) from an offloaded state holds nothing on the device
        any more; one waking holds nothing yet. On ``cpu`` the cpu tier keeps
        the weights where they were, so a model offloaded there still counts.
        An isolated model offloaded inside its worker counts what the worker
        still holds (its interpreter, imports and CUDA context).
        """
        state = self._state
        size = self._stats.size_bytes or 0
        in_place = self._tier == "cpu" and self._device.kind == "cpu"
        # What an offload leaves behind: an isolated model's worker process.
        residue = self._stats.offload_residue_bytes.get(self._tier or "", 0)
        if state is ModelState.READY:
            return size
        if state in (ModelState.UNLOADING, ModelState.OFFLOADING):
            return size if self._tier is None or in_place else residue
        if state in (ModelState.OFFLOADED, ModelState.WAKING):
            return size if in_place else residue
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The model's line as JSON-ready data (what status pages and ``vramkit ps`` show).

        Returns:
            ``name``, ``device``, ``state``, ``tier``, ``device_bytes``,
            ``size_bytes`` (the expected size), ``leases``, ``idle_seconds``,
            ``keep_alive`` (seconds or ``None``), ``pool`` (its pool's name or
            ``None``), ``loads``, ``wakes``, ``offloads``, ``unloads``,
            ``isolated`` and ``worker_pid`` (the process an isolated model
            runs in while loaded, else ``None``).
        """
        stats = self._stats
        pool = self._owner
        obj = self._obj
        return {
            "name": self._name,
            "device": str(self._device),
            "state": self._state.value,
            "tier": self._tier,
            "device_bytes": self.device_bytes,
            "size_bytes": self.expected_bytes,
            "leases": len(self._leases),
            "idle_seconds": self.idle_seconds,
            "keep_alive": self._keep_alive,
            "pool": None if pool is None else pool.name,
            "loads": stats.loads,
            "wakes": stats.wakes,
            "offloads": stats.offloads,
            "unloads": stats.unloads,
            "isolated": isinstance(self._loader, IsolatedLoader),
            "worker_pid": worker_pid(obj) if isinstance(obj, WorkerProxy) else None,
        }

    def __repr__(self) -> str:
        size = format_bytes(self._stats.size_bytes) if self._stats.size_bytes is not None else "?"
        tier = f" ({self._tier})" if self._tier else ""
        return (
            f"<ManagedModel {self._name!r} {self._state}{tier} on {self._device}, "
            f"{size}, {len(self._leases)} leases>"
        )

    # ------------------------------------------------------------------ leases

    def use(self) -> Lease[T]:
        """Borrow the model: ``with mm.use() as model:`` (or ``async with``).

        Loads (or wakes) the model if needed and holds a lease for the block,
        during which the model cannot be unloaded or offloaded. The block runs
        under ``torch.inference_mode()`` unless the model was made with
        ``inference_mode=False``.
        """
        return Lease(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the loaded object under a lease: ``mm(x)`` is ``with mm.use() as m: m(x)``."""
        with self.use() as obj:
            if not callable(obj):
                raise ModelStateError(
                    f"{self._name}: the loaded {type(obj).__name__} is not callable; "
                    "use `with mm.use() as model:`"
                )
            result = obj(*args, **kwargs)
        self._after_call()
        return result

    @overload
    def inference(self, fn: Callable[..., R], /) -> Callable[..., R]: ...
    @overload
    def inference(
        self,
        fn: None = None,
        /,
        *,
        inference_mode: bool | None = None,
        cleanup: CleanupPolicy | None = None,
    ) -> Callable[[Callable[..., R]], Callable[..., R]]: ...
    def inference(
        self,
        fn: Callable[..., R] | None = None,
        /,
        *,
        inference_mode: bool | None = None,
        cleanup: CleanupPolicy | None = None,
    ) -> Callable[..., R] | Callable[[Callable[..., R]], Callable[..., R]]:
        """Decorate a function whose first parameter receives the live model.

        ``@mm.inference`` (bare) or ``@mm.inference(inference_mode=False,
        cleanup=CleanupPolicy.per_call())``. Each call takes one lease; the
        caller omits the model argument. On a method, the model is the first
        parameter after ``self``. Coroutine functions get an async wrapper.

        Example:
            >>> import torch
            >>> mm = ManagedModel.from_torch(lambda: torch.nn.Linear(4, 2), device="cpu")
            >>> @mm.inference
            ... def predict(model, x):
            ...     return model(x)
            >>> predict(torch.ones(1, 4)).shape
            torch.Size([1, 2])
        """
        if inference_mode is not None:
            check_flag(inference_mode, "inference_mode")
        _check_options(cleanup, None, None)

        def decorate(function: Callable[..., R]) -> Callable[..., R]:
            if not callable(function):
                raise InvalidArgumentError(f"@inference decorates a function; got {function!r}")
            return cast(
                "Callable[..., R]",
                InferenceFunction(self, function, inference_mode, cleanup),
            )

        return decorate(fn) if fn is not None else decorate

    def _acquire(self, pool: object = None) -> tuple[T, int]:
        """Take a lease, loading or waking first if needed. Returns the object and a token.

        Args:
            pool: The pool the lease is taken through: refused if the model
                left it meanwhile.
        """
        with self._lock:
            if self._state is ModelState.READY and (pool is None or self._owner is pool):
                token = next(_lease_ids)
                self._leases[token] = (_get_ident(), _monotonic(), None)
                self._stamp += 1
                return self._obj, token  # type: ignore[return-value]
        return self._acquire_slow(pool)

    def _grant(self, task: object = None) -> tuple[T, int]:
        # Caller holds the lock and has checked the state is READY.
        token = next(_lease_ids)
        self._leases[token] = (_get_ident(), _monotonic(), task)
        self._stamp += 1
        return cast("T", self._obj), token

    def _acquire_slow(self, pool: object) -> tuple[T, int]:
        with self._lock:
            self._acquiring += 1
        try:
            while True:
                with self._cond:
                    state = self._claim_to_load(_LEASE_REENTERED, pool)
                    if state is ModelState.READY:
                        return self._grant()
                self._load_claimed(state)
        finally:
            with self._lock:
                self._acquiring -= 1

    @property
    def _lease_coming(self) -> bool:
        """Whether a thread is taking a lease through a load or wake (not to be evicted)."""
        return self._acquiring > 0

    def _try_acquire(self, task: object, pool: object) -> tuple[T, int] | None:
        """A lease for ``task`` if the model is ready now, without waiting; else ``None``.

        Async leases take their lease here, in the event loop's thread, owned by
        the task; the loading happens in a worker thread (:meth:`_ensure_ready`)
        that takes no lease, so a cancelled task leaves none behind.
        """
        with self._lock:
            self._check_open()
            if pool is not None and self._owner is not pool:
                raise self._removed(pool)
            if self._state is ModelState.READY:
                return self._grant(task)
        return None

    def _ensure_ready(self, pool: object = None) -> None:
        """Load or wake the model (or wait for another thread to) without taking a lease."""
        while True:
            with self._cond:
                state = self._claim_to_load(_LEASE_REENTERED, pool)
            if state is ModelState.READY:
                return
            self._load_claimed(state)

    def _load_claimed(self, state: ModelState) -> None:
        """Run the load (from ``UNLOADED``) or wake (from ``OFFLOADED``) this thread claimed."""
        if state is ModelState.UNLOADED:
            self._do_load()
        else:
            self._do_wake()

    def _removed(self, pool: object) -> ModelStateError:
        return ModelStateError(
            f"{self._name} was removed from pool {getattr(pool, 'name', pool)!r}"
        )

    def _claim_to_load(self, reentered: str, pool: object = None) -> ModelState:
        """Wait for ``READY`` or a settled state, and claim a settled one (caller holds the lock).

        A claimed model is ``LOADING`` (from ``UNLOADED``) or ``WAKING`` (from
        ``OFFLOADED``) with this thread busy on it; the caller then runs
        :meth:`_do_load` or :meth:`_do_wake` outside the lock.

        Args:
            reentered: The error when this thread is the one loading or waking
                the model; ``{name}`` and ``{doing}`` are filled in.
            pool: The pool the caller goes through: a model that left it is
                not loaded on its behalf.

        Returns:
            ``READY`` (nothing claimed), or the state the claim started from.
        """
        me = threading.get_ident()
        while True:
            self._check_open()
            if pool is not None and self._owner is not pool:
                raise self._removed(pool)
            state = self._state
            if state is ModelState.READY:
                return state
            if self._busy_thread == me:
                raise ModelStateError(reentered.format(name=self._name, doing=state.value.lower()))
            if state in _SETTLED:
                self._busy_thread = me
                self._state = (
                    ModelState.LOADING if state is ModelState.UNLOADED else ModelState.WAKING
                )
                return state
            self._wait()

    def _settle(self, state: ModelState, **counters: Any) -> int:
        """End a transition in ``state`` (caller holds the lock) and wake whoever waits.

        Frees the busy slot, bumps the stamp that keep-alive expiries must
        match, and updates the stats with ``counters``.

        Returns:
            The new stamp.
        """
        self._state = state
        self._busy_thread = None
        self._stamp += 1
        if counters:
            self._stats = replace(self._stats, **counters)
        self._cond.notify_all()
        return self._stamp

    def _wait(self, timeout: float | None = None) -> None:
        """Wait on the condition (caller holds the lock), counted for :meth:`_return`."""
        self._waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiting -= 1

    def _return(self, token: int) -> None:
        with self._lock:
            leases = self._leases
            leases.pop(token, None)
            self._last_used = _monotonic()
            self._stamp += 1
            stamp = self._stamp
            idle = not leases
            if idle and self._waiting:  # notify_all costs microseconds; skip it when alone
                self._cond.notify_all()
        if idle:
            if self._owner is not None:
                self._owner._freed(self)
            if self._keep_alive is not None:
                self._schedule_expiry(stamp)

    def _after_call(self) -> None:
        tracker = self._cleanup_tracker()
        if tracker is not None:
            tracker.after_call()

    def _cleanup_tracker(self) -> CleanupTracker | None:
        if self._tracker is None and self._policy is not None:
            self._tracker = self._policy.tracker(self._device)
        return self._tracker

    # ------------------------------------------------------------------ load

    def load(self) -> LoadReport | None:
        """Load now (or wake, if offloaded) instead of at first use.

        Returns:
            The :class:`LoadReport` of the load this call performed, or ``None``
            when the model was already ready (or another thread loaded it).
        """
        with self._cond:
            state = self._claim_to_load("{name}: load() called from inside its own loader")
        if state is ModelState.READY:
            return None
        if state is ModelState.UNLOADED:
            return self._do_load()
        self._do_wake()
        return None

    def _do_load(self) -> LoadReport:
        """Run the loader. Caller has set state LOADING and ``_busy_thread``."""
        backend = get_backend(self._device.kind)
        index = self._device.index or 0
        started = time.perf_counter()
        owner = self._owner
        obj: Any = None
        try:
            if owner is not None:
                owner._before_load(self)
            before = backend.read(index)
            threads = torch.get_num_threads()
            obj = self._loader()
            if torch.get_num_threads() != threads:  # loaders like FunASR's change it globally
                torch.set_num_threads(threads)
            adapter = self._adapter_override or adapter_for(obj)
            after = backend.read(index)
            size = adapter.size_bytes(obj)
            check_loaded(self._name, self._loader, obj, adapter, size, self._last, self._owns)
            if size is None:
                size = _grew_by(before, after)
        except BaseException as exc:
            # The failed load's frames hold whatever it built: clear them so a
            # half-built model does not stay alive through the traceback.
            obj = None
            clear_frames(exc.__traceback__)
            with self._cond:
                self._state = ModelState.UNLOADED
                self._busy_thread = None
                self._cond.notify_all()
            if owner is not None:
                owner._after_load(self, ok=False)
            cleanup(self._device)
            self._emit(
                "load_failed",
                "LOADING",
                "UNLOADED",
                seconds=time.perf_counter() - started,
                detail={"error": f"{type(exc).__name__}: {exc}"},
            )
            raise
        seconds = time.perf_counter() - started
        self._last = remember(obj)
        with self._cond:
            self._obj = obj
            self._adapter = adapter
            self._last_used = time.monotonic()
            stamp = self._settle(
                ModelState.READY,
                loads=self._stats.loads + 1,
                load_seconds=seconds,
                size_bytes=size,
            )
        obj = None  # the model holds it now; a pool refusing it must be able to free it
        if owner is not None:
            owner._after_load(self, ok=True)
        report = LoadReport(self._name, str(self._device), seconds, size, before, after)
        self._emit(
            "load",
            "UNLOADED",
            "READY",
            seconds=seconds,
            memory_before=before,
            memory_after=after,
            bytes=size,
            detail={"adapter": adapter.name},
        )
        if self._keep_alive is not None:
            self._schedule_expiry(stamp)
        return report

    def _do_wake(self) -> WakeReport:
        """Bring an offloaded model back. Caller has set state WAKING and ``_busy_thread``."""
        state = self._offloaded
        tier = self._tier or "cpu"
        owner = self._owner
        started = time.perf_counter()
        if state is None or state.method == "rebuild":
            return self._wake_by_loading(tier, None, started)
        if owner is not None:
            try:
                owner._before_load(self)  # the pool's admission: may wait, may refuse
            except BaseException as exc:
                return self._wake_failed(exc)
        try:
            report, file = tiers.wake_object(self._name, self._device, state)
        except BaseException as exc:
            if owner is not None:
                owner._after_load(self, ok=False)
            if isinstance(exc, Exception) and state.method == "file" and not _is_oom(exc):
                # A cache file deleted, changed or replaced behind our back: the
                # loader still knows how to build the model. Say so, loudly.
                events.logger.warning(
                    "%s: the disk tier could not be read or trusted (%s: %s); "
                    "reloading with the loader",
                    self._name,
                    type(exc).__name__,
                    exc,
                )
                return self._wake_by_loading(tier, f"{type(exc).__name__}: {exc}", started)
            return self._wake_failed(exc)  # out of memory, interrupted: stay offloaded
        if file is not None:
            self._disk_cache = file  # kept for a cheap re-offload while unchanged
        with self._cond:
            self._offloaded = None
            self._tier = None
            self._last_used = time.monotonic()
            stamp = self._settle(
                ModelState.READY,
                wakes=self._stats.wakes + 1,
                wake_seconds={**self._stats.wake_seconds, tier: report.seconds},
            )
        if owner is not None:
            owner._after_load(self, ok=True)
        self._emit(
            "wake",
            "OFFLOADED",
            "READY",
            seconds=report.seconds,
            bytes=report.weight_bytes,
            detail={"tier": tier, "method": report.method},
        )
        if self._keep_alive is not None:
            self._schedule_expiry(stamp)
        return report

    def _wake_failed(self, exc: BaseException) -> WakeReport:
        """A wake that ran out of memory (or was interrupted): stay OFFLOADED, re-raise.

        A wake whose object died (its worker crashed) leaves the model UNLOADED.
        """
        with self._cond:
            if isinstance(exc, WorkerCrashedError):
                self._obj = self._offloaded = None
                self._tier = None
                self._state = ModelState.UNLOADED
            else:
                self._state = ModelState.OFFLOADED
            self._busy_thread = None
            self._cond.notify_all()
        cleanup(self._device)
        raise exc

    def _wake_by_loading(self, tier: str, fallback: str | None, started: float) -> WakeReport:
        """Wake by running the loader: the tier cannot restore (rebuild, or a broken file)."""
        with self._cond:
            box = [self._obj, self._offloaded]
            self._obj = self._offloaded = None
            self._tier = None
            self._state = ModelState.LOADING
        tiers.discard(box[1], self._disk_cache)
        self._disk_cache = None
        box.clear()
        gc.collect()
        load = self._do_load()
        report = tiers.WakeReport(
            self._name,
            tiers.check_tier(tier),
            "rebuild" if fallback is None else "file",
            time.perf_counter() - started,
            load.size_bytes or 0,
            fallback=fallback,
        )
        with self._cond:
            stats = self._stats
            self._stats = replace(
                stats,
                wakes=stats.wakes + 1,
                wake_seconds={**stats.wake_seconds, tier: report.seconds},
            )
        return report

    # ------------------------------------------------------------------ offload tiers

    def offload(
        self,
        tier: str = "cpu",
        *,
        wait: bool = False,
        timeout: float | None = None,
        rewrite: bool = False,
    ) -> OffloadReport:
        """Move the weights off the device, keeping what is needed to wake fast.

        Args:
            tier: ``"cpu"`` (host RAM, pinned from CUDA when RAM allows) or
                ``"disk"`` (a safetensors file; the module becomes a ``meta``
                skeleton). Objects without torch modules (ONNX Runtime
                sessions) are dropped and rebuilt on wake; the report says so.
            wait: With leases out, wait for them instead of raising.
            timeout: Wait at most this long (implies ``wait``); infinity waits
                without limit.
            rewrite: Write the disk tier's file even if the one the model woke
                from looks unchanged (see "the disk tier writes once" in the docs).

        Returns:
            An :class:`~vramkit.model.tiers.OffloadReport`.

        Raises:
            ModelBusyError: Leases are out (and not waiting).
            ModelStateError: The model is not loaded.
            OffloadError: The tier could not be written (disk full, unwritable
                directory); the model is still ``READY`` and nothing was lost.
        """
        chosen = tiers.check_tier(tier)
        waits = check_flag(wait, "wait") or timeout is not None
        limit = parse_timeout(timeout)
        check_flag(rewrite, "rewrite")
        with self._cond:
            if self._state is ModelState.OFFLOADED and self._tier == chosen:
                return tiers.OffloadReport(
                    self._name,
                    chosen,
                    self._offloaded.method,
                    0.0,
                    0,
                    note=f"already offloaded to {chosen}",
                )
        state_before, box = self._claim(wait=waits, timeout=limit, action="offload")
        if state_before is ModelState.UNLOADED:
            raise ModelStateError(f"{self._name} is not loaded: nothing to offload")
        previous = box[1] if state_before is ModelState.OFFLOADED else None
        if previous is not None and not (previous.method == "move" and chosen == "disk"):
            # disk -> cpu, or a dropped object: wake first, then offload where asked.
            with self._cond:
                self._obj, self._offloaded = box
                self._state = ModelState.WAKING
            self._do_wake()
            return self.offload(chosen, wait=wait, timeout=timeout, rewrite=rewrite)
        obj = box[0]
        box.clear()
        directory = self._offload_dir or tiers.default_offload_dir()
        owner = tiers.Owner(self._name, self._device, self.adapter, self.size_bytes)
        try:
            # From the cpu tier the weights are already in host RAM: they go to
            # disk from there, without a round trip through the device.
            state, report, self._disk_cache = tiers.offload_object(
                owner,
                obj,
                chosen,
                directory,
                message=(
                    f"{self._name} is offloaded to {chosen} by vramkit: this reference "
                    f"cannot run it until it wakes; {self._advice()}"
                ),
                rewrite=rewrite,
                previous=previous,
                file=self._disk_cache,
            )
        except BaseException as exc:
            with self._cond:  # nothing changed: the model is as it was
                self._obj = obj
                self._offloaded = previous
                self._state = ModelState.READY if previous is None else ModelState.OFFLOADED
                if isinstance(exc, WorkerCrashedError):  # ...unless its worker died
                    self._obj = self._offloaded = None
                    self._state = ModelState.UNLOADED
                self._busy_thread = None
                self._cond.notify_all()
            raise
        dropped = None
        if state.method == "rebuild":
            dropped = remember(obj)
            obj = None  # dropped: the loader rebuilds it (the cleanup below collects)
        if previous is not None:
            tiers.release_host_copies(previous)
            previous = None
        residue = self._stats.offload_residue_bytes
        if state.method == "delegated" and self.adapter is not None:
            # The object offloaded itself and stays: measure what it still holds.
            residue = {**residue, chosen: self.adapter.size_bytes(obj) or 0}
        with self._cond:
            self._obj = obj
            self._offloaded = state
            self._tier = chosen
            stamp = self._settle(
                ModelState.OFFLOADED,
                offloads=self._stats.offloads + 1,
                offloaded_bytes={**self._stats.offloaded_bytes, chosen: report.weight_bytes},
                offload_seconds={**self._stats.offload_seconds, chosen: report.seconds},
                offload_residue_bytes=residue,
            )
        obj = None
        cleaned = cleanup(self._device, gc_collect=state.method == "rebuild")
        if dropped is not None and dropped() is not None:
            self._neutralise_dropped(dropped(), chosen)
            cleaned = cleanup(self._device, gc_collect=False)
        report = replace(report, memory_after=cleaned.after.readings[0])
        if self._owner is not None:
            self._owner._freed(self)
        self._emit(
            "offload",
            state_before.value,
            "OFFLOADED",
            seconds=report.seconds,
            memory_before=report.memory_before,
            memory_after=report.memory_after,
            bytes=report.weight_bytes,
            detail={"tier": chosen, "method": report.method},
        )
        if self._keep_alive is not None:
            self._schedule_expiry(stamp)
        return report

    def _neutralise_dropped(self, survivor: object, tier: str) -> None:
        """A dropped (rebuild-tier) object that something still holds: free it, make it loud.

        A wake builds a new object, so the old one is never coming back.
        """
        adapter = self.adapter
        if adapter is None or not self._owns or not self._free_survivors:
            return
        message = (
            f"{self._name} was offloaded to {tier} by vramkit (dropped, to be rebuilt at the "
            f"next lease) but this reference outlived it; {self._advice()}"
        )
        adapter.neutralise([survivor], message)

    def wake(self) -> WakeReport | None:
        """Bring an offloaded model back now (a lease would do it too).

        Returns:
            The :class:`~vramkit.model.tiers.WakeReport`, or ``None`` if the model
            was not offloaded (already ready, or it loads on first use).
        """
        me = threading.get_ident()
        with self._cond:
            self._check_open()
            while self._state not in _SETTLED:
                if self._busy_thread == me:
                    raise ModelStateError(f"{self._name}: wake() called from inside its own load")
                self._wait()
            if self._state is not ModelState.OFFLOADED:
                return None
            self._busy_thread = me
            self._state = ModelState.WAKING
        return self._do_wake()

    def tier_costs(self) -> dict[str, TierCost]:
        """What each way of freeing the device would cost, from this model's measurements.

        Returns:
            ``{"cpu": ..., "disk": ..., "unload": ...}`` :class:`~vramkit.model.tiers.TierCost`
            entries; wake times are measured where this model has woken from
            that tier before, else estimated from its size.
        """
        return tiers.tier_costs(
            self._stats, on_host=self._device.kind == "cpu", file=self._disk_cache
        )

    def choose_tier(self, *, host_free_bytes: int | None = None) -> str:
        """The cheapest way to free this model's device memory: cpu, disk, or unload.

        The ``cpu`` tier wins when host RAM can hold the weights (pinned copies
        wake fastest); then ``disk`` when waking from it beats a reload; else
        ``unload``. On a ``cpu`` device only ``disk`` or ``unload`` free anything.

        Wake times decide, not offload plus wake: the file is written once and
        reused by every later eviction while the weights are unchanged, and a
        model that is evicted is usually wanted again. (Counting the first
        write made the choice flip with the page cache: a loader that happened
        to read warm files beat write-plus-wake once, and every later
        eviction then paid a full reload.) :meth:`tier_costs` still reports
        the write as ``offload_seconds``.

        Args:
            host_free_bytes: Host RAM available for the cpu tier (default: read now).
        """
        if host_free_bytes is None:
            host_free_bytes = get_backend("cpu").read(0).free_bytes or 0
        return tiers.choose_tier(self.tier_costs(), self._stats.size_bytes or 0, host_free_bytes)

    # ------------------------------------------------------------------ unload

    def unload(
        self,
        *,
        wait: bool = False,
        timeout: float | None = None,
        strict: bool | None = None,
    ) -> UnloadReport:
        """Release the model, prove it died, free what survived, clean up.

        Args:
            wait: With leases out, wait for the last one to be returned instead
                of raising :class:`ModelBusyError`.
            timeout: Wait at most this many seconds (implies ``wait``), then
                raise :class:`ModelBusyError`; infinity waits without limit.
            strict: Raise :class:`VramLeakError` when something else still held
                the model (default: the model's ``strict`` setting).

        Returns:
            An :class:`UnloadReport`; when the model was not loaded, a report
            saying so (nothing happens).

        Raises:
            ModelBusyError: Leases are out (and not waiting, or the timeout
                passed), another thread is loading or waking the model (and
                not waiting), or this thread itself holds a lease.
            VramLeakError: ``strict`` and the model survived (the memory was
                still freed; the report is on ``error.report``).
            ModelStateError: The adapter's release failed (the model is
                ``UNLOADED`` anyway; the report is on ``error.report``).
        """
        waits = check_flag(wait, "wait") or timeout is not None
        limit = parse_timeout(timeout)
        strict = self._strict if strict is None else check_flag(strict, "strict")
        started = time.perf_counter()
        # The object travels in a one-item list that _release_and_prove empties:
        # a local variable here would keep it alive through the proof of death.
        state_before, box = self._claim(wait=waits, timeout=limit, action="unload")
        waited = time.perf_counter() - started
        if state_before is ModelState.UNLOADED:
            return UnloadReport(
                self._name,
                str(self._device),
                ModelState.UNLOADED,
                ModelState.UNLOADED,
                died=True,
                verified=True,
                waited_seconds=waited,
            )
        try:
            report = self._release_and_prove(box, state_before, started, waited)
        finally:
            box.clear()
            with self._cond:
                self._state = ModelState.UNLOADED
                self._tier = None
                self._busy_thread = None
                self._cond.notify_all()
            if self._owner is not None:
                self._owner._freed(self)
        self._emit(
            "unload",
            state_before.value,
            "UNLOADED",
            seconds=report.seconds,
            memory_before=report.memory_before,
            memory_after=report.memory_after,
            bytes=report.seen_bytes,
            # The chains themselves, not just a count: a subscriber that only sees events
            # (a serving framework's log) must be able to say who kept the model alive.
            detail={
                "died": report.died,
                "holders": len(report.holders),
                "held_by": tuple(str(chain) for chain in report.holders),
                "neutralised_bytes": report.neutralised_bytes,
            },
        )
        if report.error is not None:
            error = ModelStateError(
                f"{self._name}: releasing the model failed ({report.error}); it is UNLOADED "
                "and vramkit dropped its reference anyway"
            )
            error.report = report  # type: ignore[attr-defined]
            raise error
        if strict and not report.died:
            leak = VramLeakError(f"{self._name} survived unloading:\n{report}")
            leak.report = report  # type: ignore[attr-defined]
            raise leak
        return report

    def _claim(
        self, *, wait: bool, timeout: float | None, action: str
    ) -> tuple[ModelState, list[Any]]:
        """Wait for leases and transitions, then take the object out for ``action``.

        Returns:
            The state before, and ``[obj, offloaded_state]`` (empty if unloaded).
            The state is then ``UNLOADING`` / ``OFFLOADING`` with this thread busy
            (left ``UNLOADED`` when there was nothing to take).
        """
        me = threading.get_ident()
        task = _current_task()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                here = [owner for ident, _, owner in self._leases.values() if ident == me]
                mine = sum(1 for owner in here if owner is None or owner is task)
                if mine:
                    raise ModelBusyError(
                        f"{self._name}: cannot {action} from inside its own lease "
                        f"(this {'task' if task is not None else 'thread'} holds {mine}); "
                        f"{action} after the `with` block ends"
                    )
                if here and wait:
                    # Other tasks of this thread's event loop hold leases: they can
                    # only return them if this thread does not block.
                    raise ModelBusyError(
                        f"{self._name}: {len(here)} leases are held by other tasks of the "
                        f"event loop running in this thread, which waiting here would "
                        f"block; use `await asyncio.to_thread(mm.{action}, wait=True)`"
                    )
                if self._busy_thread == me:
                    raise ModelStateError(
                        f"{self._name}: {action}() called from inside its own load"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._state in _SETTLED and not self._leases:
                    break
                # Leases, and another thread's load or wake (which can take as long
                # as a load takes), are waited for only if asked; another thread's
                # unload or offload is short and always waited for.
                if not wait and (self._state in _SETTLED or self._state in _LOADING):
                    raise ModelBusyError(self._busy_message())
                if remaining is not None and remaining <= 0:
                    raise ModelBusyError(self._busy_message() + f" (waited {timeout} s)")
                self._wait(remaining)
            state = self._state
            if state is ModelState.UNLOADED:
                return state, []
            box = [self._obj, self._offloaded]
            self._obj = self._offloaded = None
            self._state = ModelState.UNLOADING if action == "unload" else ModelState.OFFLOADING
            self._busy_thread = me
            self._stamp += 1
            return state, box

    def _advice(self) -> str:
        """What a stale reference's error tells its user to do instead."""
        if self._owner is not None:
            way = f"`pool.use({self._name!r})` (pool {self._owner.name!r})"
        else:
            way = f"`{self._name}.use()`"
        return f"borrow it with {way} instead of keeping a reference"

    def _busy_message(self) -> str:
        if not self._leases:
            doing = self._state.value.lower()
            where = (
                ""
                if self._busy_thread is None
                else f" in thread {_thread_name(self._busy_thread)!r}"
            )
            return f"{self._name} is {doing}{where}; unload(wait=True) waits for it"
        now = time.monotonic()
        ident, since, _ = min(self._leases.values(), key=lambda lease: lease[1])
        count = len(self._leases)
        return (
            f"{self._name} has {count} lease{'s' if count != 1 else ''} out "
            f"(oldest held for {now - since:.1f} s by thread {_thread_name(ident)!r}); "
            "unload(wait=True) or unload(timeout=...) waits for them"
        )

    def _release_and_prove(
        self,
        box: list[Any],
        state_before: ModelState,
        started: float,
        waited: float,
    ) -> UnloadReport:
        backend = get_backend(self._device.kind)
        index = self._device.index or 0
        before = backend.read(index)
        adapter = self._adapter_override or self._adapter or adapter_for(box[0])
        tiers.discard(box.pop(), self._disk_cache)  # host copies, pinned memory, cache files
        self._disk_cache = None
        expected = self._stats.size_bytes
        if state_before is ModelState.OFFLOADED and (
            self._tier == "disk" or self._device.kind != "cpu"
        ):
            expected = 0  # the weights already left the device when it was offloaded
        report = release_and_prove(
            box,
            adapter,
            Unload(
                name=self._name,
                device=self._device,
                backend=backend,
                before=before,
                expected=expected,
                free_survivors=self._free_survivors,
                owns=self._owns,
                advice=self._advice(),
                driver_wait=self._driver_wait,
                state_before=state_before,
                started=started,
                waited=waited,
            ),
        )
        with self._cond:
            self._stats = replace(self._stats, unloads=self._stats.unloads + 1)
        return report

    # ------------------------------------------------------------------ keep-alive

    def _schedule_expiry(self, stamp: int) -> None:
        delay = self._keep_alive
        if delay is None or self._closed:
            return
        scheduler = self._scheduler or default_scheduler()
        scheduler.schedule(self, delay, stamp)

    def _expire(self, stamp: int) -> None:
        """Unload if nothing happened since ``stamp`` (called by the keep-alive scheduler)."""
        with self._cond:
            current = self._stamp == stamp and not self._leases
            settled = self._state in (ModelState.READY, ModelState.OFFLOADED)
        if not (current and settled):
            return
        try:
            report = self.unload()
        except ModelBusyError:
            return  # a lease arrived in between: its end re-schedules the expiry
        self._emit(
            "expire",
            report.state_before.value,
            "UNLOADED",
            seconds=report.seconds,
            bytes=report.seen_bytes,
            detail={"reason": f"idle for {self._keep_alive} s"},
        )

    def _emit(self, kind: str, before: str, after: str, **fields: Any) -> None:
        """Log the transition and hand it to subscribers (see :mod:`vramkit.events`)."""
        events.emit(events.Event(kind, self._name, str(self._device), before, after, **fields))

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unload (waiting for leases) and refuse further use."""
        if self._closed:
            return
        self.unload(wait=True)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ModelStateError(f"{self._name} is closed")

    def __enter__(self) -> ManagedModel[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _check_options(cleanup: object, config: object, offload_dir: object) -> None:
    """Refuse, at construction, options that would otherwise fail later (after a forward)."""
    from vramkit.policy import CleanupPolicy

    if cleanup is not None and not isinstance(cleanup, CleanupPolicy):
        raise InvalidArgumentError(
            f"cleanup must be a CleanupPolicy (vramkit.CleanupPolicy(...)) or None; got {cleanup!r}"
        )
    if config is not None and not isinstance(config, Mapping):
        raise InvalidArgumentError(f"config must be a mapping (a dict) or None; got {config!r}")
    if offload_dir is not None and (
        not isinstance(offload_dir, str | os.PathLike) or not os.fspath(offload_dir)
    ):
        raise InvalidArgumentError(
            "offload_dir must be a directory path (a non-empty str or os.PathLike) or None; "
            f"got {offload_dir!r}"
        )


def _current_task() -> object:
    """The asyncio task running in this thread, or ``None`` outside an event loop."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None


def _is_oom(exc: BaseException) -> bool:
    from vramkit.oom import is_oom_error

    return is_oom_error(exc)


def _grew_by(before: DeviceMemory, after: DeviceMemory) -> int | None:
    """What a load added: allocator bytes on accelerators, else this process's bytes."""
    for layer in ("allocated_bytes", "process_used_bytes", "used_bytes"):
        a, b = getattr(after, layer), getattr(before, layer)
        if a is not None and b is not None and (layer != "allocated_bytes" or a != b):
            return max(int(a) - int(b), 0)
    return None


def _published_state() -> dict[str, Any]:
    """What this process publishes for ``vramkit ps``: its models, and their pools' accounting."""
    models = [m for m in live_models() if not m.closed]
    pools = {id(m.pool): m.pool for m in models if m.pool is not None}
    return {
        "models": [m.to_dict() for m in models],
        "pools": [_pool_line(pool.status().to_dict()) for pool in pools.values()],
    }


def _pool_line(status: dict[str, Any]) -> dict[str, Any]:
    status.pop("models", None)  # each model has its own line, naming its pool
    return status


_runtime.install(_published_state)
