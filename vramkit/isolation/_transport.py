"""Pickled messages over a Unix socket, with shared-memory tensors passed as file descriptors.

A message is a pickle; tensors in it are not copied into the pickle. CPU
tensors (and large numpy arrays, viewed as tensors) go through torch's own
reductions (:mod:`torch.multiprocessing.reductions`): with the
``file_descriptor`` sharing strategy a storage moves into an unlinked
shared-memory file and what travels is that file's descriptor, passed beside
the pickle with ``SCM_RIGHTS``; the receiver maps the same pages. CUDA tensors
travel as CUDA IPC handles, the same way torch sends them between its own
processes, and the receiver copies them into its own memory on arrival (see
:func:`_own_copy`): neither process then depends on the other staying alive.

torch's reductions wrap each descriptor with
``multiprocessing.reduction.DupFd``, which asks the "spawning popen" of the
current thread to carry it (that is how descriptors reach a child that is
being spawned). While a message is pickled, :class:`Channel` installs itself
as that carrier, so the descriptors are collected and sent with the message
instead of through ``multiprocessing``'s resource-sharer thread (a socket
connection per descriptor).

Large CPU tensors (and numpy arrays) that are not in shared memory already
are copied into a buffer of the channel's pool (:mod:`._pool`): shared memory
mapped once on both sides and reused, so a call pays one copy per tensor and
no page faults, and the receiver's tensor is a view of that memory. The
sender's tensor stays where it was; a tensor the caller moved into shared
memory itself (``share_memory_()``) still travels by descriptor, without a
copy, and in-place writes to it are seen on both sides. Where the system has
no anonymous shared-memory files (macOS), every large tensor travels as
torch's sharing sends it.

Small CPU tensors are copied into the pickle instead: below
:data:`INLINE_BYTES` a copy is cheaper than even a pooled buffer, and it
leaves the sender's tensor where it was.

The common call, ``model(x)`` with small CPU tensors, and its tensor reply
skip the pickle (:mod:`._simple`), and a receiver watches for its next message
a moment before it sleeps on it (:meth:`Channel.spin`): together they are most
of what a small call costs beyond the socket's own round trip.

A receiver reads whatever the socket holds into a buffer of its own
(:mod:`._reader`): a small message costs one system call, and the bytes (and
descriptors) of the messages behind it wait there for the next receive.

Only the two ends of one socketpair, made by one process for its own worker,
ever read these pickles.
"""

from __future__ import annotations

import array
import copyreg
import ctypes
import io
import os
import pickle
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import context as mp_context
from multiprocessing import reduction
from typing import TYPE_CHECKING, Any, Final

from vramkit.isolation import _pool, _simple
from vramkit.isolation._reader import (
    FDS_PER_MESSAGE,
    ChannelClosedError,
    FrameReader,
)
from vramkit.isolation._reader import HEADER as _HEADER
from vramkit.isolation._reader import close_quietly as _close
from vramkit.isolation._simple import (
    INLINE_BYTES,
    as_kind,
    dtype_codes,
    rebuild_small,
    to_dtype,
)

if TYPE_CHECKING:
    import numpy
    import torch

__all__ = ["INLINE_BYTES", "Channel", "ChannelClosedError"]

_MAX_NOTES: Final = 0xFFFF  # buffer ids one header can count, each way
_NO_NOTES: Final[tuple[list[int], list[int]]] = ([], [])  # never changed: read only
SPIN_SECONDS: Final = 300e-6
"""How long :meth:`Channel.spin` watches for a message before the caller sleeps on it."""
_perf_counter = time.perf_counter
_PICKLE_START: Final = pickle.PROTO[0]  # a pickle's first byte; a simple message's is lower

_received = threading.local()  # descriptors of the message being unpickled in this thread


class _PassedFd:
    """A descriptor travelling beside a message, pickled as its position in the message."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (_ReceivedFd, (self.slot,))


class _ReceivedFd:
    """A descriptor that arrived with a message; :meth:`detach` hands it to its rebuilder."""

    __slots__ = ("fds", "slot")

    def __init__(self, slot: int) -> None:
        self.fds: list[int | None] = _received.fds
        self.slot = slot

    def detach(self) -> int:
        fd = self.fds[self.slot]
        if fd is None:
            raise RuntimeError("a passed file descriptor was used twice")
        self.fds[self.slot] = None  # its new owner closes it
        return fd


class _FdCarrier:
    """Stands in for ``multiprocessing``'s spawning popen while one message is pickled."""

    DupFd = _PassedFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        # The descriptor stays owned by the sender (a shared storage keeps it
        # open while it lives); sendmsg duplicates it into the receiver.
        self.fds.append(fd)
        return len(self.fds) - 1


class _Pickler(pickle.Pickler):
    """``ForkingPickler``'s reductions (torch's among them), small tensors inline, numpy via torch.

    Args:
        file: Where the pickle goes.
        outbox: The channel's pool of buffers for large tensors (``None``:
            torch's sharing for every large tensor).

    Attributes:
        shared: The tensors whose storages the message shares: they must live
            until it is sent (their descriptors close with them), and some are
            temporaries made here (numpy views, detached results).
        pooled: The pool buffers this message filled, each with the slot of
            its descriptor among the message's (``-1``: the receiver has it).
    """

    def __init__(self, file: io.BytesIO, outbox: _pool.Outbox | None) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.dispatch_table = _dispatch_table()
        self.shared: list[object] = []
        self.pooled: list[tuple[int, int]] = []
        self.outbox = outbox

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            reduced = _reduce_tensor(torch, obj, self)
            if reduced is NotImplemented:
                self.shared.append(obj)
            return reduced
        numpy = sys.modules.get("numpy")
        if numpy is not None and type(obj) is numpy.ndarray:
            return _reduce_ndarray(obj)
        return NotImplemented


_dispatch: dict[Any, Any] = {}
_dispatch_sizes = (-1, -1)


def _dispatch_table() -> dict[Any, Any]:
    """The ``copyreg`` table plus ``ForkingPickler``'s registrations, rebuilt when they grow.

    ``ForkingPickler`` copies both for every instance; that copy was a fifth of
    a small call's cost.
    """
    global _dispatch, _dispatch_sizes
    extra: dict[Any, Any] = reduction.ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    if len(extra) != _dispatch_sizes[1] or len(copyreg.dispatch_table) != _dispatch_sizes[0]:
        _dispatch = {**copyreg.dispatch_table, **extra}
        _dispatch_sizes = (len(copyreg.dispatch_table), len(extra))
    return _dispatch


def _reduce_tensor(torch: Any, tensor: torch.Tensor, pickler: _Pickler) -> Any:
    if (
        type(tensor) is torch.Tensor
        and tensor.is_cpu
        and not tensor.requires_grad
        and tensor.nbytes < INLINE_BYTES
        and tensor.layout is torch.strided
        and tensor.is_contiguous()
        and not (tensor.is_conj() or tensor.is_neg() or tensor.is_quantized or tensor.is_nested)
    ):
        # The common small argument or result, with the fewest questions asked.
        raw = ctypes.string_at(tensor.data_ptr(), tensor.nbytes) if tensor.nbytes else b""
        dtype = dtype_codes(torch).get(tensor.dtype, tensor.dtype)
        return (rebuild_small, (raw, dtype, tuple(tensor.shape), 0))
    if tensor.requires_grad and not tensor.is_leaf:
        # An autograd graph cannot cross processes; its values can.
        return (_same, (tensor.detach(),))
    kind = type(tensor)
    if tensor.is_cuda and tensor.layout is torch.strided and not tensor.is_nested:
        from torch.multiprocessing.reductions import reduce_tensor

        # A CUDA IPC handle, copied into the receiver's own memory on arrival.
        return (_own_copy, reduce_tensor(tensor))  # type: ignore[no-untyped-call]
    if (
        (kind is not torch.Tensor and kind is not torch.nn.Parameter)
        or tensor.layout is not torch.strided
        or not tensor.is_cpu
        or tensor.is_quantized
        or tensor.is_nested
    ):
        return NotImplemented  # torch's reduce_tensor, from the dispatch table: shared memory
    if tensor.nbytes >= INLINE_BYTES:
        outbox = pickler.outbox
        if outbox is None or tensor.is_shared():  # type: ignore[no-untyped-call]
            return NotImplemented  # already shared (or no pool): its descriptor, no copy
        data = tensor.detach()
        buffer_id, fd = outbox.put(data)
        pickler.pooled.append((buffer_id, _carrier().duplicate_for_child(fd) if fd >= 0 else -1))
        dtype = dtype_codes(torch).get(data.dtype, data.dtype)
        flags = tensor.requires_grad | (kind is torch.nn.Parameter) << 1
        return (_rebuild_pooled, (buffer_id, dtype, tuple(data.shape), flags))
    data = tensor.detach() if tensor.requires_grad else tensor
    if not data.is_contiguous() or data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg().contiguous()
    # Raw bytes straight from the tensor's memory: a third of the cost of
    # going through numpy's pickling, and every dtype (bfloat16, float8) alike.
    raw = ctypes.string_at(data.data_ptr(), data.nbytes) if data.nbytes else b""
    # The dtype as a number and the kind as a flag: each global a pickle names
    # costs a lookup on both sides, a good part of a small call.
    dtype = dtype_codes(torch).get(data.dtype, data.dtype)
    flags = tensor.requires_grad | (kind is torch.nn.Parameter) << 1
    return (rebuild_small, (raw, dtype, tuple(data.shape), flags))


def _carrier() -> _FdCarrier:
    carrier: Any = mp_context.get_spawning_popen()  # installed by Channel.send
    assert isinstance(carrier, _FdCarrier)
    return carrier


def _rebuild_pooled(
    buffer_id: int, dtype: torch.dtype | int, shape: tuple[int, ...], flags: int
) -> torch.Tensor:
    import torch

    inbox: _pool.Inbox = _received.inbox
    tensor = inbox.open(buffer_id, to_dtype(dtype), shape)
    kind = torch.nn.Parameter if flags & 2 else torch.Tensor
    return as_kind(tensor, bool(flags & 1), kind)


def _own_copy(rebuild: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
    """Open a CUDA tensor sent by IPC, copy it device to device, and let go of the mapping.

    A mapping of another process's allocation is valid only while that process
    keeps it: a result would dangle once its worker ends, and an argument
    kept by the model would pin the caller's memory (through torch's IPC
    reference count) until the worker let go. The copy decouples the two
    lifetimes, at device bandwidth.
    """
    import torch

    shared = rebuild(*args)
    try:
        copy = shared.detach().clone()
        requires_grad = shared.requires_grad
        parameter = isinstance(shared, torch.nn.Parameter)
    finally:
        del shared  # releases torch's IPC reference: the sender may free its block
    if parameter:
        return torch.nn.Parameter(copy, requires_grad=requires_grad)
    return copy.requires_grad_() if requires_grad else copy


def _reduce_ndarray(array_: numpy.ndarray[Any, Any]) -> Any:
    if array_.nbytes < INLINE_BYTES or array_.dtype.hasobject:
        return NotImplemented  # numpy's own pickling: a copy, cheap at this size
    import torch

    if not array_.flags.writeable:
        array_ = array_.copy()  # torch warns on (and must not write to) read-only memory
    try:
        tensor = torch.from_numpy(array_)
    except (TypeError, ValueError):
        return NotImplemented  # a dtype torch lacks, negative strides: numpy pickles it
    return (_as_ndarray, (tensor,))


def _as_ndarray(tensor: torch.Tensor) -> numpy.ndarray[Any, Any]:
    return tensor.numpy()


def _same(value: object) -> object:
    return value


class Channel:
    """One end of a socketpair carrying pickled messages and the descriptors they need.

    Not thread-safe: the owner serialises sends, and receives, itself.

    Args:
        sock: A connected ``AF_UNIX`` stream socket; the channel owns it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = FrameReader(sock)
        # One pickler for every message: building one costs as much as a small
        # message's pickling. Its memo is cleared after each send, so it keeps
        # nothing alive between messages.
        self._buffer = io.BytesIO()
        self._outbox = _pool.Outbox() if _pool.available() else None
        self._inbox = _pool.Inbox()
        self._pickler = _Pickler(self._buffer, self._outbox)
        self._carrier = _FdCarrier()
        self._unreported: tuple[list[int], list[int]] | None = None
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)
        self._spin = SPIN_SECONDS if _usable_cpus() > 1 else 0.0
        self._waited = 0.0  # how long the last message took to come, where measured
        self._since: float | None = None  # when the wait for the next message began

    def fileno(self) -> int:
        """The socket's descriptor, for ``poll``."""
        return self._sock.fileno()

    def spin(self) -> bool:
        """Watch for the next message a moment without sleeping: whether it is readable now.

        A process that sleeps until its message arrives costs the other a
        scheduler wakeup, each way: on a virtual machine that is most of a
        small call's round trip. With a CPU to spare, watching for up to
        :data:`SPIN_SECONDS` first lets the message land on a running
        process. It spins only while the last message came within that
        window (a slow model's reply, a caller's pause between calls: no
        spin), and it measures every wait it begins, so it spins again once
        messages come fast again. Readable includes the other end having
        closed (the receive then raises :class:`ChannelClosedError`), and a
        message read already, behind the last one (see :meth:`pending`).
        """
        now = _perf_counter()
        self._since = now
        if self._reader.pending():
            return True  # read already, behind the last message
        if not self._spin or self._waited > self._spin:
            return False
        poll = self._readable.poll
        end = now + self._spin
        while not poll(0):
            if _perf_counter() >= end:
                return False
        return True

    def send(self, message: object) -> None:
        """Pickle ``message`` and send it, with the descriptors of its shared tensors.

        Raises:
            ChannelClosedError: The other end is gone.
        """
        outbox = self._outbox
        if type(message) is tuple and not self._notes_due():
            simple = _simple.encode(message)
            if simple is not None:  # the common call or reply, no pickle: one system call
                try:
                    self._sock.sendall(_HEADER.pack(len(simple), 0, 0, 0, 0) + simple)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise ChannelClosedError("the other end of the channel is gone") from exc
                return
        if not _torch_reductions:
            _register_torch_reductions()
        buffer, pickler, carrier = self._buffer, self._pickler, self._carrier
        pickler.dispatch_table = _dispatch_table()
        released, forgotten = self._notes()
        previous = mp_context.get_spawning_popen()
        mp_context.set_spawning_popen(carrier)  # type: ignore[arg-type]
        try:
            try:
                pickler.dump(message)
            except BaseException:
                if outbox is not None:
                    outbox.unsent([buffer_id for buffer_id, _ in pickler.pooled])
                later = self._unreported or ([], [])  # for the next message, all of them
                self._unreported = (released + later[0], forgotten + later[1])
                raise
            body = buffer.getbuffer()
            try:
                if carrier.fds or released or forgotten or pickler.pooled:
                    self._send_frame(body, carrier.fds, released, forgotten, pickler.pooled)
                elif len(body) <= 65536:  # the common small message: one system call
                    self._sock.sendall(_HEADER.pack(len(body), 0, 0, 0, 0) + body)
                else:
                    self._send_frame(body, (), [], [], [])
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosedError("the other end of the channel is gone") from exc
            finally:
                body.release()
                if outbox is not None and pickler.pooled:
                    outbox.sent([buffer_id for buffer_id, _ in pickler.pooled])
        finally:
            mp_context.set_spawning_popen(previous)
            # The memo and the shared list held the message's objects (and the
            # descriptors of its shared tensors) until it was sent.
            pickler.clear_memo()
            if pickler.shared or pickler.pooled or carrier.fds:
                pickler.shared.clear()
                pickler.pooled.clear()
                carrier.fds.clear()
            buffer.seek(0)
            buffer.truncate()

    def _notes_due(self) -> bool:
        """Whether the next message has pool notes to carry (a simple message carries none)."""
        outbox = self._outbox
        return bool(
            self._inbox.freed or self._unreported is not None or (outbox and outbox.dropped)
        )

    def _notes(self) -> tuple[list[int], list[int]]:
        """The pool's notes for the next message: buffers freed here, buffers unmapped there.

        They ride on every message: buffers of the other end's that are free
        again here, and buffers of ours it may unmap.
        """
        if not self._notes_due():
            return _NO_NOTES
        outbox = self._outbox
        released = self._inbox.released()
        forgotten = outbox.forgotten() if outbox is not None else []
        if self._unreported is not None:
            released += self._unreported[0]
            forgotten += self._unreported[1]
            self._unreported = None
        if len(released) > _MAX_NOTES or len(forgotten) > _MAX_NOTES:
            # More than one header can count: the rest go with the next message.
            self._unreported = (released[_MAX_NOTES:], forgotten[_MAX_NOTES:])
            released, forgotten = released[:_MAX_NOTES], forgotten[:_MAX_NOTES]
        return released, forgotten

    def _send_frame(
        self,
        body: memoryview,
        fds: Sequence[int],
        released: list[int],
        forgotten: list[int],
        pooled: list[tuple[int, int]],
    ) -> None:
        notes = b""
        if released or forgotten or pooled:
            used = [number for pair in pooled for number in pair]
            notes = array.array("q", released + forgotten + used).tobytes()
        header = _HEADER.pack(
            len(notes) + len(body), len(fds), len(released), len(forgotten), len(pooled)
        )
        sock = self._sock
        if not fds:
            if len(body) <= 65536:
                sock.sendall(header + notes + body)  # one system call for a small message
            else:
                sock.sendall(header + notes)
                sock.sendall(body)
            return
        chunks = [fds[i : i + FDS_PER_MESSAGE] for i in range(0, len(fds), FDS_PER_MESSAGE)]
        # Descriptors ride on the first byte of a sendmsg: the header carries the
        # first chunk, one marker byte each of the rest; the notes open the body.
        sent = sock.sendmsg([header], [_rights(chunks[0])])
        if sent < len(header):
            sock.sendall(header[sent:])
        for chunk in chunks[1:]:
            sock.sendmsg([b"\0"], [_rights(chunk)])
        if notes:
            sock.sendall(notes)
        sock.sendall(body)

    def recv(self) -> Any:
        """Receive one message and unpickle it (mapping its shared tensors).

        Raises:
            ChannelClosedError: The other end is gone.
        """
        return self.decode(self.recv_frame())

    def recv_frame(self) -> tuple[memoryview, list[int | None], list[int]]:
        """Read one whole message: its pickle and its descriptors.

        Once this returns the stream is at the next message, whatever
        :meth:`decode` then makes of this one, and the pool's notes that came
        with it are applied. The body of a message that fits the channel's
        buffer is a view of it: valid until the next receive.

        Raises:
            ChannelClosedError: The other end is gone.
        """
        try:
            body, fds, released, forgotten, used = self._reader.read()
        except ConnectionResetError as exc:  # it died with our data unread
            raise ChannelClosedError("the other end of the channel is gone") from exc
        if self._since is not None:
            self._waited, self._since = _perf_counter() - self._since, None
        noted = (released + forgotten + 2 * used) * 8
        if not noted and not fds:
            return body, [], []  # the common message: nothing shared, no pool note
        slots: list[int | None] = list(fds)
        buffers: list[int] = []
        if noted:
            ids = array.array("q")
            ids.frombytes(body[:noted])
            if self._outbox is not None:
                self._outbox.release(ids[:released].tolist())
            self._inbox.forget(ids[released : released + forgotten].tolist())
            pairs = ids[released + forgotten :].tolist()
            for buffer_id, slot in zip(pairs[::2], pairs[1::2], strict=True):
                buffers.append(buffer_id)
                if slot >= 0:
                    passed, slots[slot] = slots[slot], None
                    if passed is not None:
                        self._inbox.map(buffer_id, passed)
        return body[noted:], slots, buffers

    def decode(self, frame: tuple[memoryview, list[int | None], list[int]]) -> Any:
        """Unpickle a frame from :meth:`recv_frame`; every descriptor is used or closed."""
        body, slots, buffers = frame
        if not slots and not buffers:  # nothing shared: no descriptor, no pool buffer to settle
            if body and body[0] != _PICKLE_START:
                return _simple.decode(body)
            return pickle.loads(body)
        _received.fds = slots
        _received.inbox = self._inbox
        self._inbox.expect(buffers)
        try:
            return pickle.loads(body)
        finally:
            _received.fds = None
            _received.inbox = None
            self._inbox.settle()  # buffers the message named but no tensor took
            # Whatever the pickle did not claim (an error half-way) is ours to close.
            for fd in slots:
                if fd is not None:
                    _close(fd)

    def pool_counts(self) -> tuple[int, int]:
        """Pool buffers this end made, and buffers of the other end's it maps."""
        return (self._outbox.count if self._outbox is not None else 0), self._inbox.count

    def pending(self) -> bool:
        """Whether bytes of a message were read already: ``poll`` on the socket cannot see them.

        A read takes what the socket holds, so the next message (or its
        start) may already be here, behind the one just received.
        """
        return self._reader.pending()

    def close(self) -> None:
        """Close the socket (the other end then sees end-of-file) and unmap the pool.

        A tensor still held over a pool buffer keeps that buffer's memory (and
        its mapping) until it is dropped.
        """
        self._sock.close()
        self._reader.close()
        if self._outbox is not None:
            self._outbox.close()
        self._inbox.close()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rights(fds: Sequence[int]) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _register_torch_reductions() -> None:
    """Make ``ForkingPickler`` share tensors, once torch is in the process at all."""
    global _torch_reductions
    if not _torch_reductions and "torch" in sys.modules:
        import torch.multiprocessing  # noqa: F401  (registers torch's reductions on import)

        _torch_reductions = True


_torch_reductions = False
