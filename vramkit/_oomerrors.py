"""Which errors mean "out of memory", whatever raised them, and letting go of one.

The recognition lives at the bottom of the package, beside the error tree:
a model that fails to wake asks it as much as the retry loops of
:mod:`vramkit.oom` do (which export both names).
"""

from __future__ import annotations

import functools
import traceback
from typing import Final

from vramkit.errors import InvalidArgumentError

__all__ = ["drop_frames", "is_oom_error"]

# Lower-cased fragments that mean "an allocator could not allocate", whatever raised them:
# torch CUDA/HIP/XPU/MPS ("CUDA out of memory.", "MPS backend out of memory"), the CUDA
# runtime ("cudaErrorMemoryAllocation", "CUDA failure 2: out of memory" in ONNX Runtime),
# torch's CPU allocator, and cuDNN / cuBLAS running out of workspace.
_OOM_MESSAGES: Final = (
    "out of memory",
    "defaultcpuallocator: can't allocate memory",
    "cudaerrormemoryallocation",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
)
# ONNX Runtime's arena (BFCArena) and std::bad_alloc, as its Python exceptions word them:
# "BFCArena::AllocateRawInternal ... Failed to allocate memory for requested buffer of size N",
# "Available memory of 0 is smaller than requested bytes of N", "... failed:bad allocation".
_ORT_MESSAGES: Final = (
    "failed to allocate memory",
    "available memory of",
    "bad allocation",
    "bad_alloc",
)
_ORT_TYPES: Final = frozenset({"RuntimeException", "Fail", "EPFail"})
# cuDNN answers NOT_SUPPORTED both for unsupported configurations and for inputs too
# large for its workspace; only the second is worth a smaller batch.
_CUDNN_NOT_SUPPORTED: Final = "cudnn_status_not_supported"
_CHAIN_LIMIT: Final = 8


@functools.cache
def _oom_types() -> tuple[type[BaseException], ...]:
    """The exception types that always mean out of memory (torch imported on first use)."""
    import torch

    found: list[type[BaseException]] = [MemoryError]
    for owner in (torch, getattr(torch, "cuda", None)):
        kind = getattr(owner, "OutOfMemoryError", None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind)
    return tuple(found)


def _is_ort_error(exc: BaseException) -> bool:
    kind = type(exc)
    return kind.__module__.startswith("onnxruntime") and kind.__name__ in _ORT_TYPES


def _says_oom(exc: BaseException) -> bool:
    if isinstance(exc, _oom_types()):
        return True
    from_ort = _is_ort_error(exc)
    if not (from_ort or isinstance(exc, RuntimeError)):
        return False
    text = str(exc).lower()
    fragments = _OOM_MESSAGES + _ORT_MESSAGES if from_ort else _OOM_MESSAGES
    return any(fragment in text for fragment in fragments)


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means a device (or the host) ran out of memory.

    Recognised: :class:`MemoryError` (vramkit's
    :class:`~vramkit.errors.OutOfMemoryError` included), ``torch.OutOfMemoryError``
    / ``torch.cuda.OutOfMemoryError``, a ``RuntimeError`` whose message says
    ``out of memory`` (CUDA, HIP, XPU, MPS), ``DefaultCPUAllocator: can't
    allocate memory``, cuDNN or cuBLAS ``*_ALLOC_FAILED``, and ONNX Runtime's
    ``RuntimeException`` / ``Fail`` reporting an allocation failure. cuDNN's
    ``CUDNN_STATUS_NOT_SUPPORTED`` counts only when an out-of-memory error is in
    its chain, since alone it usually means an unsupported configuration. An
    error raised ``from`` an out-of-memory error (its ``__cause__``) counts too.

    Args:
        exc: The exception to classify.

    Returns:
        ``True`` for an out-of-memory error.

    Raises:
        InvalidArgumentError: When ``exc`` is not an exception.
    """
    if not isinstance(exc, BaseException):
        raise InvalidArgumentError(f"is_oom_error needs an exception instance; got {exc!r}")
    current: BaseException | None = exc
    for _ in range(_CHAIN_LIMIT):
        if current is None:
            break
        if _says_oom(current):
            return True
        current = current.__cause__
    if _CUDNN_NOT_SUPPORTED in str(exc).lower():
        context = exc.__cause__ or exc.__context__
        for _ in range(_CHAIN_LIMIT):
            if context is None:
                break
            if _says_oom(context):
                return True
            context = context.__cause__ or context.__context__
    return False


def drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in ``exc``'s tracebacks (and its chain's).

    A traceback keeps every frame it passed through alive, and with them the
    failed call's locals: the activations that did not fit. Clearing them
    lets that memory go before a retry. Frames still running are left alone.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < _CHAIN_LIMIT:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
