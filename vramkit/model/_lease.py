"""The state a managed model is in, the leases on it, and the ways to borrow it.

:class:`StateMachine` is the state machine of one model: its state, the object,
the leases out, and who is busy moving it, under one lock (a lease on a
``READY`` model excepted: it takes none, see :class:`StateMachine`). A lease is what
``mm.use()`` returns; an :class:`InferenceFunction` is what ``@mm.inference``
returns. Both borrow through :class:`Borrowable`, the part of a
``ManagedModel`` that counts leases and loads (or wakes) the model first.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from vramkit._units import check_flag
from vramkit.errors import InvalidArgumentError, ModelBusyError, ModelStateError
from vramkit.model.reports import ModelState

if TYPE_CHECKING:
    from vramkit.cleaning import CleanupPolicy, CleanupTracker
    from vramkit.devices import Device

__all__ = [
    "SETTLED",
    "Borrowable",
    "InferenceFunction",
    "Lease",
    "StateMachine",
    "current_task",
    "new_token",
    "inference_decorator",
    "inference_guard",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R")

SETTLED = frozenset({ModelState.UNLOADED, ModelState.READY, ModelState.OFFLOADED})
"""The states a model rests in; the others are transitions, each with a thread busy on it."""
_LOADING = frozenset({ModelState.LOADING, ModelState.WAKING})

_tokens = itertools.count(1)
new_token = _tokens.__next__  # atomic: a lease's token, unique in the process
_get_ident = threading.get_ident
_monotonic = time.monotonic
_READY = ModelState.READY  # bound once: an enum lookup per lease costs as much as the rest


class StateMachine(Generic[T]):
    """The state of one model, the object it holds and the leases on it, under one lock.

    A lease on a ``READY`` model takes no lock: it enters its token in
    ``leases`` (one dict store, atomic), then looks at the state again; an
    unload or offload sets its state under the lock, then looks at
    ``leases``. So either the lease sees the new state (and takes itself back,
    to go the locked way) or the claim sees the lease (and gives the model
    back, to wait or raise ``ModelBusyError``): never neither. A return takes
    no lock either, unless a claim waits for the last lease. Waits go through
    the condition. A transition is *claimed* (the state moves to an ``-ING``
    state with this thread busy on it), runs outside the lock, and *settles*.
    The ``stamp`` changes at every lease, return and settled transition: a
    keep-alive expiry made at one stamp is stale at any other.

    Attributes:
        name: The model's name, for messages.
        lock: The lock; ``cond`` is a condition on it.
        state: The :class:`ModelState`.
        obj: The loaded object (the only strong reference vramkit keeps).
        leases: Token of each lease out -> the thread id that took it: what
            busy errors name and what tells a lease of this thread. Read it
            through :meth:`snapshot` (lock-free leases change it at any time).
        owners: Token of each asynchronous lease -> the asyncio task holding
            it (set under the lock; a synchronous lease has no entry).
        busy_since: ``time.monotonic()`` when the leases went from none to
            some, for messages; read with ``leases`` it may be a moment off.
        acquiring: Threads on their way to a lease through a load or wake.
        last_used: ``time.monotonic()`` when the last lease ended or a load settled.
        busy: The thread running a load, wake, offload or unload, if any.
        stamp: Bumped at every change a keep-alive expiry must notice.
        closed: Set by ``close()``: nothing may start any more.
        on_idle: Called when the last lease ends (an owner waiting for room,
            a keep-alive expiry), or ``None``.
    """

    __slots__ = (
        "acquiring",
        "busy",
        "busy_since",
        "claims",
        "closed",
        "cond",
        "last_used",
        "leases",
        "lock",
        "name",
        "obj",
        "on_idle",
        "owners",
        "stamp",
        "state",
        "waiting",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.state = ModelState.UNLOADED
        self.obj: T | None = None
        # A plain int per lease: a tuple with the time cost a third of a lease.
        self.leases: dict[int, int] = {}
        self.owners: dict[int, object] = {}
        self.busy_since: float | None = None
        # Between a load's end and the lease it was for, the model is READY with no
        # lease: a pool must not evict it there (the lease would load it again,
        # racing the very load that evicted it).
        self.acquiring = 0
        self.last_used: float | None = None
        self.waiting = 0  # threads blocked in wait()
        # Threads in claim(): a return that ends the last lease wakes them, and
        # only then takes the lock.
        self.claims = 0
        self.busy: int | None = None
        self.stamp = 0
        self.closed = False
        # Who hears of the model going idle (an owner, a keep-alive expiry), set
        # by the model: called by put_back with no lock held.
        self.on_idle: Callable[[], None] | None = None

    # -- leases ------------------------------------------------------------------

    def take(self, token: int) -> T | None:
        """A lease on a ``READY`` model without the lock: the object, or ``None``.

        ``None``: the model is not ``READY`` (or is being claimed): nothing is
        held, take the locked way (:meth:`claim_to_load`, then :meth:`grant`).
        """
        leases = self.leases
        if not leases:
            self.busy_since = _monotonic()
        leases[token] = _get_ident()
        # Read after the insert: a claim that set its state before the insert
        # shows here; one that set it after sees the lease (see the class).
        obj = self.obj
        if self.state is _READY and obj is not None:
            return obj
        self.put_back(token)
        return None

    def grant(self, task: object = None) -> tuple[T, int]:
        """Count a lease on a ``READY`` model (caller holds the lock): the object and a token.

        ``task``: the asyncio task that owns an async lease (``None``: this thread).
        """
        token = new_token()
        if task is not None:
            self.owners[token] = task  # before the lease: a reader never sees it unowned
        leases = self.leases
        if not leases:
            self.busy_since = _monotonic()
        leases[token] = _get_ident()
        self.stamp += 1
        return cast("T", self.obj), token

    def put_back(self, token: int) -> None:
        """End the lease ``token``, from any thread, without the lock unless a claim waits.

        The last lease out tells ``on_idle``, if set.
        """
        leases = self.leases
        try:
            del leases[token]  # a third cheaper than pop(token, None)
        except KeyError:  # returned twice: nothing more to do
            return
        owners = self.owners
        if owners:
            owners.pop(token, None)
        if leases:
            return
        self.last_used = _monotonic()
        if self.claims:  # an unload or offload waits for the last lease
            with self.lock:
                self.cond.notify_all()
        on_idle = self.on_idle
        if on_idle is not None:
            on_idle()

    def went_idle(self) -> int | None:
        """After :meth:`put_back` ended the last lease: a new stamp, or ``None`` if a lease came."""
        with self.lock:
            if self.leases:
                return None
            self.stamp += 1
            return self.stamp

    def snapshot(self) -> tuple[tuple[int, object], ...]:
        """The leases out now, oldest first: (thread id, task or ``None``), copied at once."""
        taken = tuple(self.leases.items())  # one C call: lock-free leases cannot change it midway
        owners = self.owners
        # Tokens count up: the lowest is the oldest lease.
        return tuple((ident, owners.get(token)) for token, ident in sorted(taken))

    def count(self) -> int:
        """How many leases are out now."""
        return len(self.leases)

    # -- transitions ---------------------------------------------------------------

    def claim_to_load(
        self,
        reentered: str,
        *,
        load: bool = True,
        check: Callable[[], None] | None = None,
    ) -> ModelState:
        """Wait for ``READY`` or a settled state, and claim a settled one (caller holds the lock).

        A claimed model is ``LOADING`` (from ``UNLOADED``) or ``WAKING`` (from
        ``OFFLOADED``) with this thread busy on it.

        Args:
            reentered: The error when this thread is the one loading or waking
                the model; ``{name}`` and ``{doing}`` are filled in.
            load: Claim an ``UNLOADED`` model too; ``False`` claims only a wake.
            check: Raises when the caller may no longer load the model (it
                left the pool the caller goes through); run at every wake-up.

        Returns:
            ``READY`` or ``UNLOADED`` with ``load`` false (nothing claimed), or
            the state the claim started from.
        """
        me = _get_ident()
        while True:
            self.check_open()
            if check is not None:
                check()
            state = self.state
            if state is ModelState.READY or (state is ModelState.UNLOADED and not load):
                return state
            if self.busy == me:
                raise ModelStateError(reentered.format(name=self.name, doing=state.value.lower()))
            if state in SETTLED:
                self.busy = me
                self.state = (
                    ModelState.LOADING if state is ModelState.UNLOADED else ModelState.WAKING
                )
                return state
            self.wait()

    def claim(self, *, wait: bool, timeout: float | None, action: str) -> ModelState:
        """Wait for leases and transitions, then take the model for ``action`` (caller unlocked).

        Returns:
            The state before. The model is then ``UNLOADING`` or ``OFFLOADING``
            with this thread busy on it, unless it was ``UNLOADED`` (left as is).

        Raises:
            ModelBusyError: Leases are out and ``wait`` is false, or ``timeout``
                passed, or this thread holds a lease itself.
            ModelStateError: This thread is loading the model.
        """
        me = _get_ident()
        task = current_task()
        deadline = None if timeout is None else _monotonic() + timeout
        with self.cond:
            self.claims += 1  # before leases are looked at: a return that ends them wakes us
            try:
                return self._claim(me, task, wait, deadline, timeout, action)
            finally:
                self.claims -= 1

    def _claim(
        self,
        me: int,
        task: object,
        wait: bool,
        deadline: float | None,
        timeout: float | None,
        action: str,
    ) -> ModelState:
        """:meth:`claim`'s loop (caller holds the lock and is counted in ``claims``)."""
        while True:
            leases = self.snapshot()
            here = [owner for ident, owner in leases if ident == me]
            mine = sum(1 for owner in here if owner is None or owner is task)
            if mine:
                raise ModelBusyError(
                    f"{self.name}: cannot {action} from inside its own lease "
                    f"(this {'task' if task is not None else 'thread'} holds {mine}); "
                    f"{action} after the `with` block ends"
                )
            if here and wait:
                # Other tasks of this thread's event loop hold leases: they can
                # only return them if this thread does not block.
                raise ModelBusyError(
                    f"{self.name}: {len(here)} leases are held by other tasks of the "
                    f"event loop running in this thread, which waiting here would "
                    f"block; use `await asyncio.to_thread(mm.{action}, wait=True)`"
                )
            if self.busy == me:
                raise ModelStateError(f"{self.name}: {action}() called from inside its own load")
            if self.state in SETTLED and not leases:
                state = self.state
                if state is ModelState.UNLOADED:
                    return state
                self.state = ModelState.UNLOADING if action == "unload" else ModelState.OFFLOADING
                self.busy = me
                if not self.leases:  # read after the state changed: see the class
                    self.stamp += 1
                    return state
                # A lease taken without the lock just before the state changed:
                # it stands, and is waited for (or refused) like any other.
                self.state, self.busy = state, None
                self.cond.notify_all()  # leases that saw the claim may go on
                continue
            # Leases, and another thread's load or wake (which can take as long
            # as a load takes), are waited for only if asked; another thread's
            # unload or offload is short and always waited for.
            if not wait and (self.state in SETTLED or self.state in _LOADING):
                raise ModelBusyError(self.busy_message())
            remaining = None if deadline is None else deadline - _monotonic()
            if remaining is not None and remaining <= 0:
                raise ModelBusyError(self.busy_message() + f" (waited {timeout} s)")
            self.wait(remaining)

    def settle(self, state: ModelState) -> int:
        """End a transition in ``state`` (caller holds the lock): a change expiries must notice.

        Returns:
            The new stamp.
        """
        self.stamp += 1
        self.revert(state)
        return self.stamp

    def revert(self, state: ModelState) -> None:
        """End a transition that failed, back in the settled ``state`` (caller holds the lock)."""
        self.state = state
        self.busy = None
        self.cond.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Wait on the condition (caller holds the lock), counted for :meth:`give_back`."""
        self.waiting += 1
        try:
            self.cond.wait(timeout)
        finally:
            self.waiting -= 1

    def busy_message(self) -> str:
        """Why the model cannot be unloaded now: its leases (the oldest, by whom), or its work."""
        leases = self.snapshot()
        if not leases:
            doing = self.state.value.lower()
            where = "" if self.busy is None else f" in thread {_thread_name(self.busy)!r}"
            return f"{self.name} is {doing}{where}; unload(wait=True) waits for it"
        ident = leases[0][0]
        count = len(leases)
        since = self.busy_since
        held = "" if since is None else f"in use for {_monotonic() - since:.1f} s, "
        return (
            f"{self.name} has {count} lease{'s' if count != 1 else ''} out "
            f"({held}the oldest taken by thread {_thread_name(ident)!r}); "
            "unload(wait=True) or unload(timeout=...) waits for them"
        )

    def check_open(self) -> None:
        """Refuse anything new once the model is closed."""
        if self.closed:
            raise ModelStateError(f"{self.name} is closed")


def current_task() -> object:
    """The asyncio task running in this thread, or ``None`` outside an event loop."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None


def _thread_name(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return f"thread {ident} (ended)"


class Borrowable(Protocol[T_co]):
    """What a lease needs of the model it borrows: a ``ManagedModel`` answers it."""

    @property
    def name(self) -> str:
        """The model's name."""
        ...

    @property
    def device(self) -> Device:
        """Its device (for the cleanup policy of ``@inference`` functions)."""
        ...

    @property
    def inference_mode(self) -> bool:
        """Whether synchronous leases run under ``torch.inference_mode()``."""
        ...

    # What a lease reads on its way in, without a call: the state machine, and
    # the flag behind ``inference_mode``.
    @property
    def _life(self) -> StateMachine[Any]: ...

    @property
    def _inference_mode(self) -> bool: ...

    @property
    def _owner(self) -> object:
        """The pool the model belongs to, if any."""
        ...

    def _acquire(self) -> tuple[T_co, int]:
        """Take a lease, loading or waking first: the object and the lease's token."""
        ...

    def _acquire_slow(self, pool: object, held: int = 0) -> tuple[T_co, int]:
        """A lease the lock-free way could not take: load, wake or wait, under the lock.

        ``pool``: the pool the lease goes through; refused once the model left
        it. ``held``: the token of a lock-free lease to give back first (taken
        on a model no longer in ``pool``).
        """
        ...

    def _try_acquire(self, task: object, pool: object) -> tuple[T_co, int] | None:
        """A lease owned by ``task`` if the model is ready now, without waiting; else ``None``."""
        ...

    def _ensure_ready(self, pool: object = None) -> None:
        """Load or wake the model (or wait for another thread to) without taking a lease."""
        ...

    def _return(self, token: int) -> None:
        """End the lease ``token``."""
        ...

    def _cleanup_tracker(self) -> CleanupTracker | None:
        """The model's own cleanup counters, if it has a policy."""
        ...


_InferenceMode = getattr(torch._C, "_InferenceMode", None)  # looked up once, not per call


class _ExitOnDrop:  # pragma: no cover - builds without the private guard
    __slots__ = ("_mode",)

    def __init__(self, enabled: bool) -> None:
        self._mode = torch.inference_mode(enabled)
        self._mode.__enter__()

    def __del__(self) -> None:
        self._mode.__exit__(None, None, None)


inference_guard: Callable[[bool], object] = (
    _InferenceMode if _InferenceMode is not None else _ExitOnDrop
)
"""``inference_guard(True)`` enters ``torch.inference_mode()``; dropping the guard leaves it.

The C++ RAII guard costs a third of the context manager, which matters on a
path taken once per lease: leases build it directly, with no call around it.
"""


class Gate(Protocol):
    """What a lease needs of the pool it goes through."""

    _gated: bool
    """Whether leases must take the locked way (a member is being removed, the pool closed)."""


class Lease(Generic[T]):
    """One borrowing of the model; a context manager (sync and async).

    Args:
        model: The model borrowed.
        pool: The pool it is borrowed through, if any: the lease is refused
            (and nothing loads) once the model has left that pool.
    """

    __slots__ = ("_grad", "_model", "_pool", "_token")

    def __init__(self, model: Borrowable[T], pool: Gate | None = None) -> None:
        # Only what entering reads: the token and the guard are set on the way in.
        self._model = model
        self._pool = pool

    def __enter__(self) -> T:
        model = self._model
        pool = self._pool
        token = new_token()
        obj = model._life.take(token)  # a READY model: no lock (see StateMachine)
        # The owner is read after the lease is in: it changes only while the
        # model is UNLOADED (see Owned._leave), so a model taken READY through
        # its pool is still that pool's.
        if obj is None or (pool is not None and (model._owner is not pool or pool._gated)):
            obj, token = self._enter_slow(token if obj is not None else 0)
        self._token = token
        if model._inference_mode:
            self._grad = inference_guard(True)
        return obj

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._grad = None  # dropping the guard leaves inference mode
        self._model._life.put_back(self._token)
        if exc is not None:
            self._failed(exc)

    def _enter_slow(self, held: int) -> tuple[T, int]:
        """Take the lease the locked way: load, wake, wait, or refuse (not the pool's any more).

        ``held``: the token of a lock-free lease to give back first.
        """
        return self._model._acquire_slow(self._pool, held)

    def _failed(self, exc: BaseException) -> None:
        """The block raised ``exc`` (the lease has ended): a pool lease makes room on OOM."""

    async def __aenter__(self) -> T:
        # A load can take seconds: it runs off the event loop, in a worker
        # thread that takes no lease; the lease itself is taken here, in the
        # loop's thread and owned by this task. So a task cancelled while the
        # model loads leaves no lease behind (the load finishes for the next
        # user), and the lease is never mistaken for one of the worker thread's.
        # Grad mode is thread-local and would leak into other tasks across an
        # await, so async leases do not enter inference mode.
        model = self._model
        task = asyncio.current_task()
        while True:
            granted = model._try_acquire(task, self._pool)
            if granted is not None:
                obj, self._token = granted
                return obj
            await asyncio.to_thread(model._ensure_ready, self._pool)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._model._return(self._token)


class InferenceFunction(Generic[R]):
    """What ``@mm.inference`` returns: a callable (and descriptor, for methods) taking a lease."""

    def __init__(
        self,
        model: Borrowable[Any],
        function: Callable[..., R],
        inference_mode: bool | None,
        cleanup_policy: CleanupPolicy | None,
    ) -> None:
        self._model = model
        self._function = function
        self._mode = (
            model.inference_mode
            if inference_mode is None
            else check_flag(inference_mode, "inference_mode")
        )
        self._tracker = cleanup_policy.tracker(model.device) if cleanup_policy is not None else None
        self._is_async = inspect.iscoroutinefunction(function)
        functools.update_wrapper(self, function)

    @property
    def model(self) -> Borrowable[Any]:
        """The model each call borrows."""
        return self._model

    def _after(self) -> None:
        tracker = self._tracker or self._model._cleanup_tracker()
        if tracker is not None:
            tracker.after_call()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._is_async:
            return self._call_async(None, args, kwargs)
        return self._call(None, args, kwargs)

    def _call(self, instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        model = self._model
        obj, token = model._acquire()
        try:
            guard = inference_guard(True) if self._mode else None
            try:
                result = self._invoke(instance, obj, args, kwargs)
            finally:
                del guard  # leaves inference mode
        finally:
            obj = None
            model._return(token)
        self._after()
        return cast("R", result)

    async def _call_async(
        self, instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        async with Lease(self._model) as obj:
            result = await cast("Awaitable[Any]", self._invoke(instance, obj, args, kwargs))
        self._after()
        return result

    def _invoke(
        self, instance: object, obj: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if instance is None:
            return self._function(obj, *args, **kwargs)
        return self._function(instance, obj, *args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        if self._is_async:
            return functools.partial(self._call_async_bound, instance)
        return functools.partial(self._call_bound, instance)

    def _call_bound(self, instance: object, *args: Any, **kwargs: Any) -> R:
        return self._call(instance, args, kwargs)

    def _call_async_bound(self, instance: object, *args: Any, **kwargs: Any) -> Any:
        return self._call_async(instance, args, kwargs)

    def __repr__(self) -> str:
        return f"<inference function {self._function.__qualname__} on {self._model.name!r}>"


def inference_decorator(
    model: Borrowable[Any],
    fn: Callable[..., R] | None,
    inference_mode: bool | None,
    cleanup_policy: CleanupPolicy | None,
) -> Callable[..., R] | Callable[[Callable[..., R]], Callable[..., R]]:
    """What ``@mm.inference`` (bare, ``fn`` given) or ``@mm.inference(...)`` returns."""

    def decorate(function: Callable[..., R]) -> Callable[..., R]:
        if not callable(function):
            raise InvalidArgumentError(f"@inference decorates a function; got {function!r}")
        return cast(
            "Callable[..., R]", InferenceFunction(model, function, inference_mode, cleanup_policy)
        )

    return decorate(fn) if fn is not None else decorate
