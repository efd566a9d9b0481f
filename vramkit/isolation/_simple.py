"""The common call and its reply as a few packed numbers and raw bytes, without pickle.

Most calls to an isolated model are ``model(x)`` with a few small CPU tensors
and a tensor (or a tuple of tensors) back. Pickling such a message costs
several times its socket round trip: a Python callback per tensor, the
globals it names resolved on both sides, the pickler's bookkeeping. This
module writes those two messages as a kind byte, the call's id and, per
tensor, its dtype's number, its shape and its bytes; the receiver rebuilds
exactly the tuple the pickle would have given, so the code on either end does
not know which way a message came.

A body in this form starts with a kind byte below ``0x80``; a pickle
(protocol 2 and up) always starts with ``0x80``, so :func:`decode` is asked
only about bodies that are not pickles. Anything else (keyword arguments, a
submodule's method, a large or odd tensor, a non-tensor argument or result)
is left to the pickle: :func:`encode` returns ``None`` for it.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from math import prod
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

__all__ = [
    "INLINE_BYTES",
    "as_kind",
    "decode",
    "dtype_codes",
    "dtype_list",
    "encode",
    "rebuild_small",
    "to_dtype",
]

INLINE_BYTES: Final = 64 * 1024
"""CPU tensors and numpy arrays smaller than this are copied into the message."""

_CALL: Final = 1  # (call_id, "call", ((), args, {})), every argument a small tensor
_TENSOR: Final = 2  # (call_id, True, tensor)
_TUPLE: Final = 3  # (call_id, True, (tensor, ...))

_HEAD: Final = struct.Struct("<BQB")  # kind, call id, tensor count
_HEAD_SIZE: Final = _HEAD.size
_KINDS: Final = frozenset((_CALL, _TENSOR, _TUPLE))
# Per tensor: dtype number, dimensions, then the shape; one struct per count of dimensions.
_TENSOR_HEADS: Final = [struct.Struct(f"<BB{n}q") for n in range(9)]
_MAX_ITEMS: Final = 255
_ID_LIMIT: Final = 1 << 64


def encode(message: tuple[Any, ...]) -> bytes | None:
    """``message`` in the simple form, or ``None`` where it takes a pickle.

    Args:
        message: A request ``(call_id, op, payload)`` or a reply
            ``(call_id, ok, value)``, as the channel's users send them.
    """
    if len(message) != 3:
        return None
    call_id, second, payload = message
    if type(call_id) is not int or not 0 <= call_id < _ID_LIMIT:
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if second is True:
        if type(payload) is tuple:
            if not payload or len(payload) > _MAX_ITEMS:
                return None
            return _pack(torch, _TUPLE, call_id, payload)
        return _pack(torch, _TENSOR, call_id, (payload,))
    if type(second) is str and second == "call":
        if type(payload) is not tuple or len(payload) != 3:
            return None
        path, args, kwargs = payload
        if path != () or kwargs or type(args) is not tuple or len(args) > _MAX_ITEMS:
            return None
        return _pack(torch, _CALL, call_id, args)
    return None


def _unpack(body: memoryview) -> tuple[int, int, list[Any]]:
    kind, call_id, count = _HEAD.unpack_from(body)
    if kind not in _KINDS:
        raise ValueError(f"not a message of this channel: kind {kind}")
    table = _table or _make_table()
    offset = _HEAD_SIZE
    end = len(body)
    tensors = []
    for _ in range(count):
        head = _TENSOR_HEADS[body[offset + 1]]
        code, _, *shape = head.unpack_from(body, offset)
        offset += head.size
        dtype, itemsize, twin = table[code]
        size = itemsize * prod(shape)
        if offset + size > end:
            raise ValueError(f"a message of {end} bytes cut short")
        if twin is not None and size:
            # numpy's reshape is a tenth of torch's for a tiny tensor; the
            # tensor shares the array's (own, writable) memory.
            raw = bytearray(body[offset : offset + size])
            tensors.append(_from_numpy(_frombuffer(raw, twin).reshape(shape)))
        else:
            tensors.append(rebuild_small(body[offset : offset + size], dtype, tuple(shape), 0))
        offset += size
    if offset != end:
        raise ValueError(f"a message of {end} bytes held {offset}")
    return kind, call_id, tensors


def _pack(torch: Any, kind: int, call_id: int, tensors: tuple[Any, ...]) -> bytes | None:
    codes = _codes or dtype_codes(torch)
    parts = [_HEAD.pack(kind, call_id, len(tensors))]
    tensor_type, strided, limit, string_at = torch.Tensor, torch.strided, INLINE_BYTES, _string_at
    for tensor in tensors:
        if (
            type(tensor) is not tensor_type
            or tensor.layout is not strided
            or not tensor.is_cpu
            or tensor.requires_grad
            or tensor.is_nested
        ):
            return None
        code = codes.get(tensor.dtype)
        size = tensor.nbytes
        shape = tensor.shape
        if (
            code is None
            or size >= limit
            or len(shape) >= len(_TENSOR_HEADS)
            or not tensor.is_contiguous()
            or tensor.is_conj()
            or tensor.is_neg()
        ):
            return None
        parts.append(_TENSOR_HEADS[len(shape)].pack(code, len(shape), *shape))
        if size:
            parts.append(string_at(tensor.data_ptr(), size))
    return b"".join(parts)


def decode(body: memoryview) -> tuple[Any, ...]:
    """The message :func:`encode` wrote into ``body``: the tuple a pickle would have given.

    Each tensor gets memory of its own (a copy of its bytes), as from the pickle.

    Raises:
        ValueError: ``body`` is not a message of this form (a stream out of step).
    """
    try:
        kind, call_id, tensors = _unpack(body)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"not a message of this channel ({exc})") from None
    if kind == _CALL:
        return (call_id, "call", ((), tuple(tensors), {}))
    return (call_id, True, tensors[0] if kind == _TENSOR else tuple(tensors))


# -- small tensors, either way ---------------------------------------------------

_DTYPE_NAMES: Final = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "bool", "complex64", "complex128",
)  # fmt: skip
_codes: dict[Any, int] = {}
_dtypes: list[Any] = []
_NUMPY_DTYPES: dict[Any, str] = {}  # torch dtype -> numpy's name for it
# Per dtype number: the dtype, its item size and its numpy twin (None: none, or no numpy).
_table: list[tuple[Any, int, Any]] = []
_string_at = ctypes.string_at
_from_numpy: Any = None
_frombuffer: Any = None


def _make_table() -> list[tuple[Any, int, Any]]:
    """Fill :data:`_table` once, with torch's and numpy's functions it calls."""
    global _from_numpy, _frombuffer
    import torch

    dtype_codes(torch)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        _from_numpy, _frombuffer = torch.from_numpy, numpy.frombuffer
    _table[:] = [
        (
            dtype,
            dtype.itemsize,
            numpy.dtype(_NUMPY_DTYPES[dtype])
            if numpy is not None and dtype in _NUMPY_DTYPES
            else None,
        )
        for dtype in _dtypes
    ]
    return _table


def dtype_codes(torch: Any) -> dict[Any, int]:
    """Each common dtype's number: what a message carries instead of naming it."""
    if not _codes:
        _dtypes.extend(getattr(torch, name) for name in _DTYPE_NAMES)
        _codes.update((dtype, code) for code, dtype in enumerate(_dtypes))
        if "numpy" in sys.modules:
            _NUMPY_DTYPES.update(
                (getattr(torch, name), name) for name in _DTYPE_NAMES if name != "bfloat16"
            )
    return _codes


def dtype_list(torch: Any) -> list[Any]:
    """The dtypes by number (see :func:`dtype_codes`)."""
    dtype_codes(torch)
    return _dtypes


def to_dtype(dtype: torch.dtype | int) -> torch.dtype:
    """A dtype from what a message carries: its number in :data:`_DTYPE_NAMES`, or itself."""
    if not isinstance(dtype, int):
        return dtype
    import torch

    found: torch.dtype = dtype_list(torch)[dtype]
    return found


def rebuild_small(
    raw: bytes | memoryview, dtype: torch.dtype | int, shape: tuple[int, ...], flags: int
) -> torch.Tensor:
    """A tensor over a copy of ``raw`` (flags: 1 requires grad, 2 a ``Parameter``)."""
    import torch

    kind: torch.dtype = (_dtypes or dtype_list(torch))[dtype] if isinstance(dtype, int) else dtype
    if not raw:
        tensor = torch.empty(shape, dtype=kind)
    elif kind in _NUMPY_DTYPES:
        # numpy's reshape is a tenth of torch's for a tiny tensor; the tensor
        # shares the array's (own, writable) memory.
        numpy = sys.modules["numpy"]
        array_ = numpy.frombuffer(bytearray(raw), _NUMPY_DTYPES[kind]).reshape(shape)
        tensor = torch.from_numpy(array_)
    else:  # bfloat16, float8: no numpy twin
        tensor = torch.frombuffer(bytearray(raw), dtype=kind).reshape(shape)
    if not flags:
        return tensor
    return as_kind(tensor, bool(flags & 1), torch.nn.Parameter if flags & 2 else torch.Tensor)


def as_kind(tensor: torch.Tensor, requires_grad: bool, kind: type[torch.Tensor]) -> torch.Tensor:
    """``tensor`` as a ``Parameter`` or a plain tensor, requiring grad or not."""
    import torch

    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_() if requires_grad else tensor
