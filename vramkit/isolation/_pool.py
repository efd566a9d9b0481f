"""Reusable shared-memory buffers for the large tensors one channel carries.

Each end of a channel keeps an :class:`Outbox`: anonymous shared-memory files
(``memfd``) it made, each mapped once here and once by the other end (its
descriptor travels with the first message that uses it). Sending a large CPU
tensor copies it into a free buffer, already mapped and faulted in on both
sides, and the message carries only the buffer's id; the receiver's
:class:`Inbox` hands out a tensor over its own mapping of that buffer, without
a copy.

A buffer is the receiver's while a tensor it handed out over it lives: the
receiver reports it free (on its next message) only once that tensor and every
view of it are gone, so a result kept past the next call is never overwritten;
the sender takes another buffer, or makes one, meanwhile. Free buffers beyond
:data:`IDLE_BUFFERS` are unmapped on both sides. Nothing has a name in
``/dev/shm``: the memory goes back to the system once the last mapping of a
buffer is gone (a crashed peer's included).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import math
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

__all__ = ["IDLE_BUFFERS", "Inbox", "Outbox", "available"]

IDLE_BUFFERS: Final = 16
"""Free buffers each end keeps mapped for reuse; older ones are unmapped."""

_ALIGN: Final = 1 << 16  # sizes round up to this, so a slightly larger tensor still fits


def available() -> bool:
    """Whether the system has anonymous shared-memory files (Linux; else torch's sharing)."""
    return hasattr(os, "memfd_create")


def _map(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` shared and, where Linux allows, fault them in now."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass(eq=False, slots=True)
class _Buffer:
    """One shared-memory file as its maker sees it."""

    id: int
    size: int
    map: mmap.mmap
    fd: int  # until the other end has it; -1 after
    busy: bool = False


class Outbox:
    """The buffers this end made for the tensors it sends."""

    def __init__(self) -> None:
        self._buffers: dict[int, _Buffer] = {}
        self._free: list[_Buffer] = []  # least recently used first
        self._next_id = 1
        self.dropped: list[int] = []
        """Buffers unmapped here, not yet told to the other end."""

    def put(self, tensor: torch.Tensor) -> tuple[int, int]:
        """Copy ``tensor`` into a free buffer (made if none fits) and mark it busy.

        Returns:
            The buffer's id and its descriptor (``-1`` once the other end has
            it: then it must not be sent again).
        """
        import torch

        nbytes = tensor.nbytes
        buffer = self._take(nbytes)
        view = memoryview(buffer.map)[:nbytes]
        try:
            target = torch.frombuffer(view, dtype=tensor.dtype, count=tensor.numel())
            target.view(tensor.shape).copy_(tensor)
            del target
        except BaseException:
            self._free.append(buffer)  # still free: nothing points at it
            raise
        finally:
            view.release()
        buffer.busy = True
        return buffer.id, buffer.fd

    def _take(self, nbytes: int) -> _Buffer:
        fits = [b for b in self._free if b.size >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.size)
            self._free.remove(best)
            return best
        size = max(-(-nbytes // _ALIGN) * _ALIGN, _ALIGN)
        fd = os.memfd_create("vramkit-tensor", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapped = _map(fd, size)
        except BaseException:
            os.close(fd)
            raise
        buffer = _Buffer(self._next_id, size, mapped, fd)
        self._next_id += 1
        self._buffers[buffer.id] = buffer
        return buffer

    def sent(self, ids: list[int]) -> None:
        """A message with these buffers went out: close their descriptors (the mappings stay)."""
        for buffer_id in ids:
            buffer = self._buffers.get(buffer_id)
            if buffer is not None and buffer.fd >= 0:
                os.close(buffer.fd)
                buffer.fd = -1

    def unsent(self, ids: list[int]) -> None:
        """A message with these buffers failed to pickle: they are free again, still unsent."""
        for buffer_id in ids:
            buffer = self._buffers.get(buffer_id)
            if buffer is not None and buffer.busy:
                buffer.busy = False
                self._free.append(buffer)

    def release(self, ids: list[int]) -> None:
        """The other end let go of these buffers: they are free again."""
        for buffer_id in ids:
            buffer = self._buffers.get(buffer_id)
            if buffer is not None and buffer.busy:
                buffer.busy = False
                self._free.append(buffer)
        while len(self._free) > IDLE_BUFFERS:
            old = self._free.pop(0)
            del self._buffers[old.id]
            self.dropped.append(old.id)
            _close_buffer(old)

    def forgotten(self) -> list[int]:
        """Buffers unmapped here since the last call, for the other end to unmap too."""
        ids, self.dropped = self.dropped, []
        return ids

    @property
    def count(self) -> int:
        """How many buffers this end made and still maps (busy or free)."""
        return len(self._buffers)

    def close(self) -> None:
        """Unmap every buffer (the other end's mappings stay valid until it lets go)."""
        for buffer in self._buffers.values():
            _close_buffer(buffer)
        self._buffers.clear()
        self._free.clear()


def _close_buffer(buffer: _Buffer) -> None:
    if buffer.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(buffer.fd)
        buffer.fd = -1
    with contextlib.suppress(BufferError):
        buffer.map.close()


class Inbox:
    """The other end's buffers as mapped here, and the tensors handed out over them.

    A tensor over a buffer holds a ``ctypes`` view of the mapping (torch keeps
    the object it was built from alive): the view keeps the mapping from
    being closed under the tensor, and its death, noticed by a weak
    reference in whichever thread drops the last tensor, frees the buffer.
    """

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._lent: dict[int, weakref.ref[Any]] = {}  # by loan number (views are unhashable)
        self._loans = itertools.count()
        self.freed: collections.deque[int] = collections.deque()
        """Buffers free again since :meth:`released` last ran (filled from any thread)."""
        self._expected: list[int] = []

    def map(self, buffer_id: int, fd: int) -> None:
        """Map a new buffer of the other end's, whole; ``fd`` is closed."""
        try:
            self._maps[buffer_id] = _map(fd, 0)
        finally:
            os.close(fd)

    def expect(self, ids: list[int]) -> None:
        """The buffers the message being unpickled fills (see :meth:`settle`)."""
        self._expected = list(ids)

    def settle(self) -> None:
        """Free the expected buffers no tensor was made over (the message failed half-way)."""
        self.freed.extend(self._expected)
        self._expected = []

    def open(self, buffer_id: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over buffer ``buffer_id``, which is the tensor's until it dies."""
        import torch

        with contextlib.suppress(ValueError):
            self._expected.remove(buffer_id)
        mapped = self._maps.get(buffer_id)
        if mapped is None:
            raise RuntimeError(f"a message used shared buffer {buffer_id}, never received")
        numel = math.prod(shape)
        view = (ctypes.c_char * (numel * dtype.itemsize)).from_buffer(mapped)
        lent, freed, loan = self._lent, self.freed, next(self._loans)

        def dropped(_: weakref.ref[Any]) -> None:
            lent.pop(loan, None)
            freed.append(buffer_id)

        lent[loan] = weakref.ref(view, dropped)
        return torch.frombuffer(view, dtype=dtype, count=numel).view(shape)

    def released(self) -> list[int]:
        """Buffers whose tensors are all gone since the last call: the sender may reuse them."""
        freed = self.freed
        ids: list[int] = []
        while freed:
            ids.append(freed.popleft())
        return ids

    def forget(self, ids: list[int]) -> None:
        """The sender unmapped these buffers: unmap them here too."""
        for buffer_id in ids:
            mapped = self._maps.pop(buffer_id, None)
            if mapped is not None:
                with contextlib.suppress(BufferError):
                    mapped.close()

    @property
    def count(self) -> int:
        """How many of the other end's buffers are mapped here."""
        return len(self._maps)

    def close(self) -> None:
        """Unmap every buffer no tensor uses; the others unmap when their last tensor dies."""
        for mapped in self._maps.values():
            with contextlib.suppress(BufferError):
                mapped.close()
        self._maps.clear()
        self.freed.clear()
