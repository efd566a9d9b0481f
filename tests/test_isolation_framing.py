"""The isolation channel's framing: one read takes what the socket holds, messages stay whole.

A receiver reads as much as the socket holds into its buffer, so one read may
bring a message and the start (or all) of the next ones, and the descriptors
that ride on their headers. Over a real socket pair: every message arrives
whole and in order however the bytes are split across reads, descriptors
reach the message that carries them, a body larger than the buffer still
arrives, and a worker's reply that came in the same read as a stale one is
answered without waiting on the socket.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vramkit import ManagedModel
from vramkit.isolation import Isolation, _reader, _simple
from vramkit.isolation._spec import WorkerSpec
from vramkit.isolation._transport import INLINE_BYTES, Channel
from vramkit.isolation._worker import Worker

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the descriptor counts are read from /proc"
)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _messages(large: bool) -> list[Any]:
    """A mix of every way a message travels, each with its own tell-tale values."""
    messages = [
        (1, True, torch.arange(6.0).reshape(2, 3)),  # the simple reply
        (2, "call", ((), (torch.ones(1, 8), torch.arange(3)), {})),  # the simple call
        {"pickled": [1, 2, 3], "small": torch.full((4,), 7.0)},  # a pickle, inline tensor
        [torch.full((INLINE_BYTES // 4,), float(i)) for i in range(3)],  # pool buffers: fds
        torch.full((INLINE_BYTES // 4,), 5.0).share_memory_(),  # torch's sharing: an fd
        (3, True, (torch.zeros(2), torch.ones(3, dtype=torch.int64))),  # a simple tuple
    ]
    if large:  # a body larger than the buffer, between two small messages
        messages.insert(-1, b"x" * (_reader.RECV_BYTES + 5))
    return messages


def _spin_then_recv(end: Channel, spin: bool) -> Any:
    """Receive, after reading ahead while watching for the message (where ``spin``)."""
    if spin:
        end.spin()  # whatever it read, the receive takes it from there
    return end.recv()


def _send_all(end: Channel, messages: list[Any], failed: list[BaseException]) -> None:
    try:
        for message in messages:
            end.send(message)
    except BaseException as exc:
        failed.append(exc)
        raise


class _Trickle:
    """A real socket whose reads return at most ``most`` bytes: every split a kernel may make."""

    def __init__(self, sock: socket.socket, most: int) -> None:
        self._sock = sock
        self._most = most

    def recvmsg_into(self, buffers: list[memoryview], ancillary: int, flags: int = 0) -> Any:
        return self._sock.recvmsg_into([buffers[0][: self._most]], ancillary, flags)

    def recv_into(self, view: memoryview) -> int:
        return self._sock.recv_into(view[: self._most])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("most", [1, 3, 22, 4096, None])  # None: reads as large as they come
def test_every_message_arrives_whole_and_in_order_however_reads_split_the_stream(
    channels: tuple[Channel, Channel], most: int | None
) -> None:
    send, receive = channels
    if most is not None:
        receive._reader._sock = _Trickle(receive._reader._sock, most)  # type: ignore[assignment]
    messages = _messages(large=most is None or most > 3)  # byte by byte, it would take seconds
    before = set()
    for round_ in range(2):  # the first makes the pool's buffers, the second reuses them
        if round_:
            before = _fds()
        # Sent as fast as they go while they are read: reads take several at once.
        sender = threading.Thread(target=_send_all, args=(send, messages, failed := []))
        sender.start()
        arrived = [_spin_then_recv(receive, i % 2 == 0) for i in range(len(messages))]
        sender.join()
        assert not failed
        for got, message in zip(arrived, messages, strict=True):
            assert _equal(got, message)
        del arrived, got  # a received shared tensor keeps its descriptor while it lives
        assert not receive.pending()
        receive.send(None)  # the answer gives the pool's buffers back
        assert send.recv() is None
    assert _fds() <= before  # no descriptor left unclaimed


@pytest.mark.parametrize("most", [None, 7])
def test_messages_cut_at_the_buffer_end_are_joined_whole(
    monkeypatch: pytest.MonkeyPatch, most: int | None
) -> None:
    monkeypatch.setattr(_reader, "RECV_BYTES", 1000)  # a small buffer: reads fill it to its end
    a, b = socket.socketpair()
    send, receive = Channel(a), Channel(b)
    try:
        if most is not None:
            receive._reader._sock = _Trickle(receive._reader._sock, most)  # type: ignore[assignment]
        sizes = [1, 3, 40, 7, 100, 2, 60, 5, 1] * 8 + [400, 2, 3]  # 24 to 1620-byte bodies
        messages = [(i, True, torch.full((n,), float(i))) for i, n in enumerate(sizes)]
        for message in messages:  # about 12 KB: on the socket before any is read
            send.send(message)
        for message in messages:
            assert _equal(receive.recv(), message)
        assert not receive.pending()
    finally:
        send.close()
        receive.close()


def test_a_message_read_with_the_last_one_is_seen_without_the_socket(
    channels: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    send, receive = channels
    send.send((1, True, torch.ones(2)))
    send.send((2, True, torch.zeros(2)))  # on the socket once sent: one read takes both
    assert receive.recv()[0] == 1
    assert receive.pending()
    assert not select.select([receive.fileno()], [], [], 0)[0]  # the socket itself is empty
    receive._spin = 0.0  # even where spinning is off, what is read already is ready
    assert receive.spin() is True
    assert receive.recv()[0] == 2
    assert not receive.pending()
    assert receive.spin() is False


def test_descriptors_reach_the_message_that_carries_them_after_a_simple_one(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    shared = torch.full((INLINE_BYTES,), 3.0).share_memory_()
    before = _fds()
    for _ in range(2):
        send.send((1, True, torch.ones(3)))  # no descriptor
        send.send(("big", shared))  # one descriptor, on a header read with the message before
        send.send((2, "call", ((), (torch.ones(2),), {})))
        assert _equal(receive.recv(), (1, True, torch.ones(3)))
        name, arrived = receive.recv()
        assert name == "big" and arrived.is_shared() and float(arrived[-1]) == 3.0
        shared[-1] = 4.0  # the same pages on both ends: the descriptor was this message's
        assert float(arrived[-1]) == 4.0
        shared[-1] = 3.0
        del arrived
        assert receive.recv()[0] == 2
    assert _fds() <= before  # each descriptor was claimed once and closed with its tensor


def test_a_header_promising_descriptors_that_never_came_is_refused(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    header = _reader.HEADER.pack(4, 2, 0, 0, 0)  # two descriptors, none sent
    send._sock.sendall(header + b"body")
    with pytest.raises(_reader.ChannelClosedError, match="did not arrive"):
        receive.recv_frame()


def _wait_readable(end: Channel, least: int) -> None:
    """Wait until the socket holds ``least`` bytes, so that one read takes them all."""
    deadline = time.monotonic() + 30
    waiting = array.array("i", [0])
    while time.monotonic() < deadline:
        fcntl.ioctl(end.fileno(), termios.FIONREAD, waiting)
        if waiting[0] >= least:
            return
        time.sleep(0.001)
    raise AssertionError(f"the socket never held {least} bytes")


# ---------------------------------------------------------------------- with a worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    spec = WorkerSpec(ManagedModel, "vramkit.testing.workers:faulty_model", "framing", "cpu", {})
    worker = Worker(spec, Isolation(call_timeout=120))
    worker.start()
    yield worker
    worker.stop()


def test_a_reply_read_with_a_stale_one_is_answered_without_waiting_on_the_socket(
    worker: Worker,
) -> None:
    channel = worker._channel
    assert channel is not None
    x = torch.ones(1, 4)
    expected: torch.Tensor = worker.request("call", ((), (x,), {}))
    with worker._lock:  # as a call interrupted before its reply was read leaves it
        stale = next(worker._ids)
        channel.send((stale, "call", ((), (x,), {})))
        current = next(worker._ids)
        channel.send((current, "call", ((), (x * 2,), {})))
        # Both replies wait on the socket, so one read takes both.
        _wait_readable(channel, 2 * _wire_bytes((current, True, expected)))
        # A reply left in the buffer, with the socket empty, would wait out this timeout.
        reply = worker._await_reply(current, "call", time.monotonic() + 20, 20)
    assert not channel.pending()
    assert torch.equal(reply, worker.request("call", ((), (x * 2,), {})))
    assert worker.state.value == "READY"


def _wire_bytes(message: tuple[Any, ...]) -> int:
    """What a simple message takes on the socket, its header included."""
    body = _simple.encode(message)
    assert body is not None
    return _reader.HEADER.size + len(body)
