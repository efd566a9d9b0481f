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

import datetime
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import torch

from vramkit._keepalive import keep_alive_seconds
from vramkit._units import check_flag, check_seconds, parse_bytes, parse_timeout
from vramkit.adapters import Adapter
from vramkit.cleaning import CleanupPolicy
from vramkit.devices import DeviceLike, resolve_device
from vramkit.errors import (
    ModelStateError,
)
from vramkit.isolation import Isolation
from vramkit.model import tiers
from vramkit.model._checks import (
    adapter_given,
    check_options,
    funasr_source,
    loader_name,
    manager_options_of,
    onnx_source,
    torch_source,
)
from vramkit.model._isolated import isolated_loader
from vramkit.model._lease import Lease, inference_decorator, inference_guard, new_token
from vramkit.model._view import ModelView
from vramkit.model.reports import LoadReport, ModelState, UnloadReport

if TYPE_CHECKING:
    from vramkit.model.tiers import OffloadReport, WakeReport

__all__ = ["ManagedModel", "live_models"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

_creation = itertools.count(1)
_instances: weakref.WeakSet[ManagedModel[Any]] = weakref.WeakSet()
_instances_lock = threading.Lock()


def live_models() -> list[ManagedModel[Any]]:
    """Every ``ManagedModel`` alive in this process, oldest first (for reports and status)."""
    with _instances_lock:
        models = list(_instances)
    return sorted(models, key=lambda m: m._created)


class ManagedModel(ModelView[T]):
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
            check_options(cleanup, config, offload_dir)
            loader = isolated_loader(
                ManagedModel,  # what the worker builds its own (in-process) model with
                loader,
                name=name,
                device=device,
                isolate=isolate,
                on_lost=self._object_lost,
                inference_mode=inference_mode,
                owns=owns,  # the loader's contract holds where the loader runs
                adapter=adapter,
                release=release,
                size=size,
                cleanup=cleanup,
                offload_dir=offload_dir,
            )
            adapter = release = size = cleanup = None
        name = loader_name(loader, name)
        adapter = adapter_given(adapter, release, size, name)
        check_options(cleanup, config, offload_dir)
        self._loader = loader
        self._name = name
        self._device = resolve_device(device)
        self._keep_alive = keep_alive_seconds(keep_alive)
        self._adapter_override = adapter
        self._inference_mode = check_flag(inference_mode, "inference_mode")
        self._strict = check_flag(strict, "strict")
        self._free_survivors = check_flag(free_survivors, "free_survivors")
        self._owns = check_flag(owns, "owns")
        self._driver_wait = check_seconds(driver_wait, "driver_wait")
        self._config = MappingProxyType(dict(config or {}))
        self._policy = cleanup
        self._offload_dir = Path(offload_dir).expanduser() if offload_dir is not None else None
        self._size_hint = None if size_hint is None else parse_bytes(size_hint, what="size_hint")
        super().__init__()  # the state every step of the life works on
        self._created = next(_creation)
        with _instances_lock:
            _instances.add(self)

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
        source = torch_source(factory, device=device, dtype=dtype, eval=eval, name=name)
        return ManagedModel[torch.nn.Module](
            source.loader, name=source.name, device=source.device, config=source.config, **options
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
        options = manager_options_of(cls, manager_options)
        source = funasr_source(
            model,
            device=device,
            name=name,
            disable_update=disable_update,
            automodel_kwargs=automodel_kwargs,
        )
        return cls(
            source.loader,
            name=source.name,
            device=source.device,
            config=source.config,
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
        source = onnx_source(
            path,
            providers=providers,
            sess_options=sess_options,
            provider_options=provider_options,
            device=device,
            arena=arena,
            name=name,
        )
        return cls(
            source.loader, name=source.name, device=source.device, config=source.config, **options
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
        token = new_token()  # the lease is its token: no object per call
        obj = self._life.take(token)
        if obj is None:
            obj, token = self._acquire_slow(None)
        try:
            guard = inference_guard(True) if self._inference_mode else None
            try:
                if not callable(obj):
                    raise ModelStateError(
                        f"{self._name}: the loaded {type(obj).__name__} is not callable; "
                        "use `with mm.use() as model:`"
                    )
                result = obj(*args, **kwargs)
            finally:
                del guard  # leaves inference mode, even if a traceback keeps this frame
        finally:
            obj = None
            self._return(token)
        if self._policy is not None:
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
        check_options(cleanup, None, None)

        return inference_decorator(self, fn, inference_mode, cleanup)

    # ------------------------------------------------------------------ the steps of its life

    def load(self) -> LoadReport | None:
        """Load now (or wake, if offloaded) instead of at first use.

        Returns:
            The :class:`LoadReport` of the load this call performed, or ``None``
            when the model was already ready (or another thread loaded it).
        """
        with self._life.cond:
            state = self._life.claim_to_load("{name}: load() called from inside its own loader")
        if state is ModelState.READY:
            return None
        if state is ModelState.UNLOADED:
            return self._do_load()
        self._do_wake()
        return None

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
        return self._offload(chosen, waits, limit, rewrite)

    def wake(self) -> WakeReport | None:
        """Bring an offloaded model back now (a lease would do it too).

        Returns:
            The :class:`~vramkit.model.tiers.WakeReport`, or ``None`` if the model
            was not offloaded (already ready, or it loads on first use).
        """
        with self._life.cond:
            state = self._life.claim_to_load(
                "{name}: wake() called from inside its own load", load=False
            )
        return self._do_wake() if state is ModelState.OFFLOADED else None

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
        return self._unload(waits, limit, strict)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unload (waiting for leases) and refuse further use."""
        if self._life.closed:
            return
        self.unload(wait=True)
        with self._life.cond:
            self._life.closed = True
            self._life.cond.notify_all()

    def __enter__(self) -> ManagedModel[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
