"""Whole messages out of a channel's socket, however its reads split them.

A read takes whatever the socket holds, up to the end of a buffer of the
reader's: a small message costs one system call, and the bytes of the
messages behind it wait there for the next read. Descriptors ride on a
message's header (and, past the first chunk, on one marker byte each after
it), so every read asks for them, and those that came early wait, in order,
for the message whose header counts them.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from typing import Final

__all__ = [
    "FDS_PER_MESSAGE",
    "HEADER",
    "RECV_BYTES",
    "ChannelClosedError",
    "FrameReader",
    "close_quietly",
]

HEADER: Final = struct.Struct("<QIHHH")
"""Body length, descriptor count, then the pool's notes.

How many buffer ids of the receiver's are free again, how many of the
sender's it may unmap, and how many buffers this message fills (id and
descriptor slot, -1 for a buffer the receiver maps already). The notes lead
the body as int64s, read before the pickle: a message that fails to unpickle
still gives its buffers back.
"""
_HEADER_SIZE: Final = HEADER.size
FDS_PER_MESSAGE: Final = 250  # under the kernel's SCM_MAX_FD (253)
_FD_SIZE: Final = array.array("i").itemsize
_ANCILLARY: Final = socket.CMSG_SPACE(FDS_PER_MESSAGE * _FD_SIZE)
RECV_BYTES: Final = 256 * 1024
"""A message up to this size is read into the reader's buffer; a larger one into its own."""
_CTRUNC: Final = int(socket.MSG_CTRUNC)  # a plain int: the flag enum's `&` costs a call


class ChannelClosedError(EOFError):
    """The other end of the channel is gone (its process exited or closed it)."""


class FrameReader:
    """Reads one channel's socket: whole messages, each with its descriptors.

    Args:
        sock: The channel's socket (the channel owns and closes it).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # What was read and not yet taken runs from `_start` to `_end`.
        self._bytes = bytearray(RECV_BYTES)
        self._view = memoryview(self._bytes)
        self._start = 0
        self._end = 0
        self._fds: list[int] = []

    def pending(self) -> bool:
        """Whether bytes were read already that no message has taken yet."""
        return self._end > self._start

    def read(self) -> tuple[memoryview, list[int], int, int, int]:
        """The next message's body, its descriptors and its header's pool counts.

        A body that fits the buffer is a view of it: valid until the next read.
        """
        if self._end - self._start < _HEADER_SIZE:
            self._fill(_HEADER_SIZE)
        size, count, released, forgotten, used = HEADER.unpack_from(self._view, self._start)
        self._start += _HEADER_SIZE
        fds = self._claim_fds(count) if count else []
        try:
            if size > RECV_BYTES:
                body = self._read_large(size)
            else:
                if self._end - self._start < size:
                    self._fill(size)
                start = self._start
                self._start = start + size
                body = self._view[start : start + size]
        except BaseException:
            for fd in fds:
                close_quietly(fd)
            raise
        return body, fds, released, forgotten, used

    def _claim_fds(self, count: int) -> list[int]:
        """The ``count`` descriptors of the message whose header was just read.

        They ride on the header's bytes and, past the first chunk, on one
        marker byte each after it: once those are read, every one has come.
        """
        markers = (count - 1) // FDS_PER_MESSAGE
        if markers:
            if self._end - self._start < markers:
                self._fill(markers)
            self._start += markers
        queue = self._fds
        if len(queue) < count:
            for fd in queue:
                close_quietly(fd)
            queue.clear()
            raise ChannelClosedError("descriptors promised by a message did not arrive")
        fds = queue[:count]
        del queue[:count]
        return fds

    def _fill(self, least: int) -> None:
        """Read until ``least`` bytes (at most the buffer's size) wait from ``_start`` on.

        Each read takes all the socket has, up to the buffer's end: a small
        message costs one system call, and the bytes after it stay for the
        next receive. Every read asks for descriptors, since any byte read
        may be a later header's, which carries them.
        """
        start, end = self._start, self._end
        if start == end:
            start = end = 0
        elif RECV_BYTES - start < least:
            kept = end - start  # too little room behind the kept bytes: move them to the top
            self._bytes[:kept] = self._bytes[start:end]
            start, end = 0, kept
        self._start, self._end = start, end
        view = self._view
        while end - start < least:
            end += self._recv_some(view[end:])
            self._end = end

    def _recv_some(self, view: memoryview) -> int:
        got, ancillary, flags, _ = self._sock.recvmsg_into([view], _ANCILLARY)
        if ancillary:
            fds = self._fds
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    passed = array.array("i")
                    passed.frombytes(data[: len(data) - len(data) % _FD_SIZE])
                    fds.extend(passed)
        if flags & _CTRUNC:
            for fd in self._fds:
                close_quietly(fd)
            self._fds.clear()
            raise OSError(
                "shared-memory descriptors were dropped in transit: the process is out "
                "of file descriptors (raise `ulimit -n`)"
            )
        if got == 0:
            raise ChannelClosedError("the other end of the channel is gone")
        return int(got)

    def _read_large(self, size: int) -> memoryview:
        """A body larger than the buffer, in memory of its own: what is buffered, then the rest.

        The rest is read to the byte: no descriptor rides on a body, and
        the bytes after it are the next message's.
        """
        body = memoryview(bytearray(size))
        kept = self._end - self._start  # less than the body: the buffer is smaller
        body[:kept] = self._view[self._start : self._end]
        self._start = self._end = 0
        self._recv_exact(body[kept:])
        return body

    def _recv_exact(self, view: memoryview) -> None:
        while len(view):
            got = self._sock.recv_into(view)
            if got == 0:
                raise ChannelClosedError("the other end of the channel is gone")
            view = view[got:]

    def close(self) -> None:
        """Close the descriptors that arrived ahead of a message that never will."""
        for fd in self._fds:
            close_quietly(fd)
        self._fds.clear()


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring that it may be closed already."""
    with contextlib.suppress(OSError):
        os.close(fd)
