"""The pool of reusable shared-memory buffers that large tensors cross a worker's channel in.

Over a socketpair in this process: buffers are reused once the receiver lets
go, a tensor kept past the next message is never overwritten, the pool grows
for bigger tensors and unmaps idle buffers on both ends. With a real worker:
unload and a crash leave no buffer mapped here but the ones under tensors the
caller still holds, and those stay right after the worker is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest
import torch

from vramkit import ManagedModel
from vramkit.errors import WorkerCrashedError
from vramkit.isolation import Isolation, WorkerProxy
from vramkit.isolation._pool import IDLE_BUFFERS
from vramkit.isolation._spec import WorkerSpec
from vramkit.isolation._transport import INLINE_BYTES, Channel
from vramkit.isolation._worker import Worker

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="anonymous shared-memory files are Linux's"
)

MiB = 1 << 20


def _pool_mappings() -> int:
    """Mappings of pool buffers in this process (``memfd:vramkit-tensor``)."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
        return sum(1 for line in fh if "memfd:vramkit-tensor" in line)


def _round_trip(send: Channel, receive: Channel, value: object) -> object:
    """Send ``value`` and answer it: the answer carries what the receiver let go of."""
    send.send(value)
    return receive.recv()


def _ack(send: Channel, receive: Channel) -> None:
    receive.send(None)
    assert send.recv() is None


def test_a_buffer_is_reused_once_the_receiver_lets_go(channels: tuple[Channel, Channel]) -> None:
    send, receive = channels
    for i in range(5):
        tensor = torch.full((MiB // 4,), float(i))
        arrived = _round_trip(send, receive, tensor)
        assert isinstance(arrived, torch.Tensor) and torch.equal(arrived, tensor)
        del arrived
        _ack(send, receive)
    assert send.pool_counts() == (1, 0)  # one buffer made, used five times
    assert receive.pool_counts() == (0, 1)  # mapped once


def test_a_kept_tensor_is_never_overwritten(channels: tuple[Channel, Channel]) -> None:
    send, receive = channels
    first = _round_trip(send, receive, torch.zeros(MiB // 4))
    assert isinstance(first, torch.Tensor)
    tail = first[-8:]  # a view keeps the buffer as much as the tensor does
    del first
    _ack(send, receive)
    second = _round_trip(send, receive, torch.ones(MiB // 4))
    assert isinstance(second, torch.Tensor) and float(second.sum()) == MiB // 4
    assert torch.equal(tail, torch.zeros(8))  # still the first message's values
    assert send.pool_counts() == (2, 0)  # the kept buffer stayed out of reuse
    del tail, second
    _ack(send, receive)
    third = _round_trip(send, receive, torch.full((MiB // 4,), 3.0))
    assert isinstance(third, torch.Tensor) and float(third[0]) == 3.0
    assert send.pool_counts() == (2, 0)  # both free again: no third buffer


def test_the_pool_grows_for_bigger_tensors_and_unmaps_idle_buffers(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    small = _round_trip(send, receive, torch.ones(MiB // 4))
    del small
    _ack(send, receive)
    big = _round_trip(send, receive, torch.ones(4 * MiB // 4))  # the free one is too small
    assert isinstance(big, torch.Tensor) and float(big.sum()) == MiB
    assert send.pool_counts() == (2, 0)
    del big
    _ack(send, receive)
    many = [torch.full((INLINE_BYTES // 4,), float(i)) for i in range(IDLE_BUFFERS + 3)]
    arrived = _round_trip(send, receive, many)
    assert isinstance(arrived, list) and [float(t[0]) for t in arrived] == list(range(len(many)))
    assert send.pool_counts()[0] == len(many)  # the two free ones, and more made
    del arrived
    _ack(send, receive)
    assert send.pool_counts()[0] == IDLE_BUFFERS  # the idle ones beyond the limit, unmapped
    assert receive.pool_counts()[1] == len(many)  # not yet told
    send.send(None)  # tells the receiver which buffers it may unmap too
    receive.recv()
    assert receive.pool_counts()[1] == IDLE_BUFFERS


def test_a_tensor_shared_by_the_caller_travels_without_a_copy(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    shared = torch.zeros(MiB // 4).share_memory_()
    arrived = _round_trip(send, receive, shared)
    assert isinstance(arrived, torch.Tensor)
    arrived.add_(1)  # the same pages: the write shows on the sending side
    assert float(shared[0]) == 1.0
    assert send.pool_counts() == (0, 0)


def test_a_message_that_fails_to_pickle_gives_its_buffers_back(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    with pytest.raises(TypeError):
        send.send((torch.zeros(MiB // 4), threading.Lock()))  # a lock cannot be pickled
    arrived = _round_trip(send, receive, torch.ones(MiB // 4))
    assert isinstance(arrived, torch.Tensor) and float(arrived.sum()) == MiB // 4
    assert send.pool_counts() == (1, 0)  # the failed message's buffer, reused


def _inspector() -> Worker:
    spec = WorkerSpec(ManagedModel, "tests.isolation_models:inspector", "pool", "cpu", {})
    worker = Worker(spec, Isolation(call_timeout=120))
    worker.start()
    return worker


@pytest.mark.parametrize("end", ["unload", "crash"])
def test_an_ended_worker_leaves_only_the_buffers_under_kept_results(end: str) -> None:
    before = _pool_mappings()
    worker = _inspector()
    proxy = WorkerProxy(worker)
    for _ in range(3):
        assert float(proxy.describe(torch.ones(MiB))[0]["sum"]) == MiB
        assert float(proxy.ramp(MiB)[-1]) == MiB - 1
    kept = proxy.ramp(2 * MiB)
    assert _pool_mappings() > before
    if end == "unload":
        assert worker.stop().gone
    else:
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            proxy.ramp(MiB)
        worker.stop()
    assert _pool_mappings() == before + 1  # the one under `kept`
    assert torch.equal(kept, torch.arange(2 * MiB, dtype=torch.float32))  # the worker is gone
    del kept
    assert _pool_mappings() == before
