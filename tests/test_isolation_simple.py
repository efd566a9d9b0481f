"""The isolation channel's two fast paths, in one process over a real socket pair.

The common call (``model(x)`` with small CPU tensors) and its tensor reply
travel as packed numbers and raw bytes instead of a pickle, and must arrive
exactly as the pickle would have delivered them; everything else must still
take the pickle. A receiver watches for a message a moment before it sleeps
(``Channel.spin``), only while messages come fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from vramkit.isolation import _simple, _transport
from vramkit.isolation._transport import INLINE_BYTES, SPIN_SECONDS, Channel, ChannelClosedError

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
SHAPES = [(), (0,), (5,), (2, 3, 4), (1,) * 8]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.rand(shape) > 0.5
    return (torch.randn(shape) * 50).to(dtype)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            type(b) is torch.Tensor
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_simple_call_arrives_as_the_pickle_would_deliver_it(
    channels: tuple[Channel, Channel], dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    send, receive = channels
    args = (_tensor(dtype, shape), torch.arange(6, dtype=torch.int32).reshape(2, 3))
    message = (7, "call", ((), args, {}))
    assert _simple.encode(message) is not None  # this message takes the simple form
    send.send(message)
    arrived = receive.recv()
    assert _same(arrived, message)
    _, _, (_, received, _) = arrived
    for original, copy in zip(args, received, strict=True):
        if copy.numel():  # memory of its own, writable, not the sender's
            assert copy.data_ptr() != original.data_ptr()
            copy.zero_()
    assert _same(args[1], torch.arange(6, dtype=torch.int32).reshape(2, 3))


@pytest.mark.parametrize(
    "value",
    [
        torch.ones(2, 2),
        torch.tensor(3.5, dtype=torch.bfloat16),
        (torch.ones(1), torch.zeros(2, dtype=torch.int64)),
        (torch.empty(0, 3),),
    ],
    ids=["tensor", "bfloat16 scalar", "tuple", "one empty"],
)
def test_a_tensor_reply_arrives_as_the_pickle_would_deliver_it(
    channels: tuple[Channel, Channel], value: Any
) -> None:
    send, receive = channels
    message = (2**64 - 1, True, value)
    assert _simple.encode(message) is not None
    send.send(message)
    assert _same(receive.recv(), message)


def _transposed() -> torch.Tensor:
    return torch.arange(6.0).reshape(2, 3).t()


def _neg_view() -> torch.Tensor:
    return torch.randn(3, dtype=torch.complex64).conj().imag  # a real tensor with the neg bit


OUTSIDE = {
    "keyword arguments": lambda: (1, "call", ((), (torch.ones(1),), {"k": torch.ones(1)})),
    "a submodule's method": lambda: (1, "call", ((("attr", "encoder"),), (torch.ones(1),), {})),
    "a Parameter": lambda: (1, "call", ((), (torch.nn.Parameter(torch.ones(2)),), {})),
    "requires grad": lambda: (1, "call", ((), (torch.ones(2, requires_grad=True),), {})),
    "a transposed view": lambda: (1, "call", ((), (_transposed(),), {})),
    "a conjugate view": lambda: (1, "call", ((), (torch.ones(2, dtype=torch.cfloat).conj(),), {})),
    "a negative view": lambda: (1, "call", ((), (_neg_view(),), {})),
    "a large tensor": lambda: (1, "call", ((), (torch.ones(INLINE_BYTES // 4),), {})),
    "nine dimensions": lambda: (1, "call", ((), (torch.ones((1,) * 9),), {})),
    "a number argument": lambda: (1, "call", ((), (torch.ones(1), 3), {})),
    "a numpy argument": lambda: (1, "call", ((), (np.ones(3),), {})),
    "a dtype without a number": lambda: (1, "call", ((), (torch.ones(2, dtype=torch.uint16),), {})),
    "another op": lambda: (1, "get", ((("attr", "scale"),),)),
    "an error reply": lambda: (1, False, "boom"),
    "a dict reply": lambda: (1, True, {"x": torch.ones(1)}),
    "an empty tuple reply": lambda: (1, True, ()),
    "a list reply": lambda: (1, True, [torch.ones(1)]),
    "no call id": lambda: (None, False, "boom"),
    "a call id too large": lambda: (2**64, True, torch.ones(1)),
}


@pytest.mark.parametrize("make", OUTSIDE.values(), ids=OUTSIDE.keys())
def test_anything_else_takes_the_pickle_and_arrives_intact(
    channels: tuple[Channel, Channel], make: Any
) -> None:
    send, receive = channels
    message = make()
    assert _simple.encode(message) is None
    send.send(message)
    arrived = receive.recv()
    if isinstance(message[2], tuple) and len(message[2]) == 3 and message[1] == "call":
        for original, copy in zip(message[2][1], arrived[2][1], strict=True):
            if isinstance(original, torch.Tensor):
                assert type(copy) is type(original) and original.dtype == copy.dtype
                assert original.tolist() == copy.tolist()
    else:
        assert arrived[:2] == message[:2]


@pytest.mark.parametrize(
    "body",
    [b"\x09" + bytes(9), b"\x01\x00", bytes(_simple.encode((1, True, torch.ones(3))) or b"")[:-1]],
    ids=["unknown kind", "short head", "cut short"],
)
def test_a_body_out_of_step_is_refused_not_misread(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"not a message of this channel|cut short"):
        _simple.decode(memoryview(body))


# ---------------------------------------------------------------------- spinning


def test_spin_sees_a_message_already_there_and_a_closed_end(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    assert receive.spin() is False  # nothing sent: it gives up and the caller sleeps
    send.send((1, True, torch.ones(1)))
    assert receive.spin() is True
    assert _same(receive.recv(), (1, True, torch.ones(1)))
    send.close()
    assert receive.spin() is True  # the end of the stream is something to read
    with pytest.raises(ChannelClosedError):
        receive.recv()


class _Clock:
    """``perf_counter`` that moves a microsecond per reading, and jumps when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


def test_spin_stops_after_a_slow_message_and_resumes_after_a_fast_one(
    channels: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(_transport, "_perf_counter", clock)
    send, receive = channels
    assert receive.spin() is False  # begins a wait...
    clock.now += SPIN_SECONDS * 10  # ...that lasts far longer than a spin
    send.send((1, True, torch.ones(1)))
    receive.recv()
    send.send((2, True, torch.ones(1)))
    assert receive.spin() is False  # the last message was slow: no spin, even with one waiting
    receive.recv()  # it came at once: fast again
    send.send((3, True, torch.ones(1)))
    assert receive.spin() is True
    assert receive.recv()[0] == 3


def test_no_spin_with_a_single_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(_transport, "_usable_cpus", lambda: 1)
    a, b = socket.socketpair()
    send, receive = Channel(a), Channel(b)
    try:
        send.send((1, True, torch.ones(1)))
        assert receive.spin() is False  # spinning on the only CPU would delay the sender
        assert receive.recv()[0] == 1
    finally:
        send.close()
        receive.close()
