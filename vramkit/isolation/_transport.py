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

Small CPU tensors are copied into the pickle instead: below
:data:`INLINE_BYTES` a copy is cheaper than creating, mapping and passing a
shared-memory file, and it leaves the sender's tensor where it was (sharing
moves a tensor's storage into shared memory in place).

Only the two ends of one socketpair, made by one process for its own worker,
ever read these pickles.
"""

from __future__ import annotations

import array
import contextlib
import copyreg
import ctypes
import io
import os
import pickle
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing import context as mp_context
from multiprocessing import reduction
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy
    import torch

__all__ = ["INLINE_BYTES", "Channel", "ChannelClosedError"]

INLINE_BYTES: Final = 64 * 1024
"""CPU tensors and numpy arrays smaller than this are copied into the message."""

_HEADER: Final = struct.Struct("<QI")  # body length, descriptor count
_FDS_PER_MESSAGE: Final = 250  # under the kernel's SCM_MAX_FD (253)
_FD_SIZE: Final = array.array("i").itemsize

_received = threading.local()  # descriptors of the message being unpickled in this thread


class ChannelClosedError(EOFError):
    """The other end of the channel is gone (its process exited or closed it)."""


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

    Attributes:
        shared: The tensors whose storages the message shares: they must live
            until it is sent (their descriptors close with them), and some are
            temporaries made here (numpy views, detached results).
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.dispatch_table = _dispatch_table()
        self.shared: list[object] = []

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            reduced = _reduce_tensor(torch, obj)
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
    sizes = (len(copyreg.dispatch_table), len(extra))
    if sizes != _dispatch_sizes:
        _dispatch = {**copyreg.dispatch_table, **extra}
        _dispatch_sizes = sizes
    return _dispatch


def _reduce_tensor(torch: Any, tensor: torch.Tensor) -> Any:
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
        or tensor.nbytes >= INLINE_BYTES
        or tensor.is_quantized
        or tensor.is_nested
    ):
        return NotImplemented  # torch's reduce_tensor, from the dispatch table: shared memory
    data = tensor.detach() if tensor.requires_grad else tensor
    if not data.is_contiguous() or data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg().contiguous()
    # Raw bytes straight from the tensor's memory: a third of the cost of
    # going through numpy's pickling, and every dtype (bfloat16, float8) alike.
    raw = ctypes.string_at(data.data_ptr(), data.nbytes) if data.nbytes else b""
    return (_rebuild_small, (raw, data.dtype, tuple(data.shape), tensor.requires_grad, kind))


def _rebuild_small(
    raw: bytes,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    requires_grad: bool,
    kind: type[torch.Tensor],
) -> torch.Tensor:
    import torch

    if raw:
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    else:
        tensor = torch.empty(shape, dtype=dtype)
    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_() if requires_grad else tensor


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
        self._header = bytearray(_HEADER.size)
        # One pickler for every message: building one costs as much as a small
        # message's pickling. Its memo is cleared after each send, so it keeps
        # nothing alive between messages.
        self._buffer = io.BytesIO()
        self._pickler = _Pickler(self._buffer)

    def fileno(self) -> int:
        """The socket's descriptor, for ``poll``."""
        return self._sock.fileno()

    def send(self, message: object) -> None:
        """Pickle ``message`` and send it, with the descriptors of its shared tensors.

        Raises:
            ChannelClosedError: The other end is gone.
        """
        _register_torch_reductions()
        carrier = _FdCarrier()
        buffer, pickler = self._buffer, self._pickler
        pickler.dispatch_table = _dispatch_table()
        previous = mp_context.get_spawning_popen()
        mp_context.set_spawning_popen(carrier)  # type: ignore[arg-type]
        try:
            pickler.dump(message)
            body = buffer.getbuffer()
            try:
                self._send_frame(body, carrier.fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosedError("the other end of the channel is gone") from exc
            finally:
                body.release()
        finally:
            mp_context.set_spawning_popen(previous)
            # The memo and the shared list held the message's objects (and the
            # descriptors of its shared tensors) until it was sent.
            pickler.clear_memo()
            pickler.shared.clear()
            buffer.seek(0)
            buffer.truncate()

    def _send_frame(self, body: memoryview, fds: Sequence[int]) -> None:
        header = _HEADER.pack(len(body), len(fds))
        sock = self._sock
        if not fds:
            if len(body) <= 65536:
                sock.sendall(header + body)  # one system call for the common small message
            else:
                sock.sendall(header)
                sock.sendall(body)
            return
        chunks = [fds[i : i + _FDS_PER_MESSAGE] for i in range(0, len(fds), _FDS_PER_MESSAGE)]
        # Descriptors ride on the first byte of a sendmsg: the header carries the
        # first chunk, one marker byte each of the rest.
        sent = sock.sendmsg([header], [_rights(chunks[0])])
        if sent < len(header):
            sock.sendall(header[sent:])
        for chunk in chunks[1:]:
            sock.sendmsg([b"\0"], [_rights(chunk)])
        sock.sendall(body)

    def recv(self) -> Any:
        """Receive one message and unpickle it (mapping its shared tensors).

        Raises:
            ChannelClosedError: The other end is gone.
        """
        return self.decode(self.recv_frame())

    def recv_frame(self) -> tuple[bytearray, list[int]]:
        """Read one whole message off the socket: its pickle and its descriptors.

        Once this returns the stream is at the next message, whatever
        :meth:`decode` then makes of this one.

        Raises:
            ChannelClosedError: The other end is gone.
        """
        try:
            size, fds = self._recv_header()
            try:
                body = bytearray(size)
                self._recv_exact(memoryview(body))
            except BaseException:
                for fd in fds:
                    _close(fd)
                raise
        except ConnectionResetError as exc:  # it died with our data unread
            raise ChannelClosedError("the other end of the channel is gone") from exc
        return body, fds

    def decode(self, frame: tuple[bytearray, list[int]]) -> Any:
        """Unpickle a frame from :meth:`recv_frame`; every descriptor is used or closed."""
        body, fds = frame
        slots: list[int | None] = list(fds)
        _received.fds = slots
        try:
            return pickle.loads(body)
        finally:
            _received.fds = None
            # Whatever the pickle did not claim (an error half-way) is ours to close.
            for fd in slots:
                if fd is not None:
                    _close(fd)

    def _recv_header(self) -> tuple[int, list[int]]:
        view = memoryview(self._header)
        got, fds = self._recv_with_fds(view, _FDS_PER_MESSAGE)
        if got < len(view):
            try:
                self._recv_exact(view[got:])
            except BaseException:
                for fd in fds:
                    _close(fd)
                raise
        size, count = _HEADER.unpack(self._header)
        try:
            while len(fds) < count:
                marker = bytearray(1)
                got, more = self._recv_with_fds(memoryview(marker), count - len(fds))
                fds.extend(more)
                if not more:
                    raise ChannelClosedError("descriptors promised by a message did not arrive")
        except BaseException:
            for fd in fds:
                _close(fd)
            raise
        return size, fds

    def _recv_with_fds(self, view: memoryview, most: int) -> tuple[int, list[int]]:
        got, ancillary, flags, _ = self._sock.recvmsg_into(
            [view], socket.CMSG_SPACE(min(most, _FDS_PER_MESSAGE) * _FD_SIZE)
        )
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                passed = array.array("i")
                passed.frombytes(data[: len(data) - len(data) % _FD_SIZE])
                fds.extend(passed)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close(fd)
            raise OSError(
                "shared-memory descriptors were dropped in transit: the process is out "
                "of file descriptors (raise `ulimit -n`)"
            )
        if got == 0:
            raise ChannelClosedError("the other end of the channel is gone")
        return got, fds

    def _recv_exact(self, view: memoryview) -> None:
        while len(view):
            got = self._sock.recv_into(view)
            if got == 0:
                raise ChannelClosedError("the other end of the channel is gone")
            view = view[got:]

    def close(self) -> None:
        """Close the socket (the other end then sees end-of-file)."""
        self._sock.close()


def _rights(fds: Sequence[int]) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _register_torch_reductions() -> None:
    """Make ``ForkingPickler`` share tensors, once torch is in the process at all."""
    global _torch_reductions
    if not _torch_reductions and "torch" in sys.modules:
        import torch.multiprocessing  # noqa: F401  (registers torch's reductions on import)

        _torch_reductions = True


_torch_reductions = False
