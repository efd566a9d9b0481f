"""Out-of-memory recognition and recovery, with real allocator failures on the CPU.

A CPU allocation of 2**60 bytes (1 EiB) is larger than any 64-bit address
space, so torch's CPU allocator refuses it at once on every machine, whatever
its RAM or overcommit setting, without touching a page: the real
``DefaultCPUAllocator: can't allocate memory`` error, for free.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from vramkit.devices import get_backend
from vramkit.errors import DeviceUnavailableError, InvalidArgumentError, OutOfMemoryError
from vramkit.oom import OomRetry, adaptive_batch_size, is_oom_error, oom_retry

MIB = 1 << 20
IMPOSSIBLE = 1 << 60  # bytes: past every address space, refused without touching memory
ITEM = MIB  # bytes a batch needs per item in the functions below


def caught(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


def real_cpu_oom() -> BaseException:
    return caught(lambda: torch.empty(IMPOSSIBLE, dtype=torch.uint8))


def workspace(items: int) -> torch.Tensor:
    """What a batch of ``items`` needs: ITEM bytes each, never touched."""
    return torch.empty(items * ITEM, dtype=torch.uint8)


# --------------------------------------------------------------------------- the premise


def test_the_impossible_allocation_fails_fast_and_touches_nothing() -> None:
    cpu = get_backend("cpu")
    rss_before = cpu.read(0).process_used_bytes
    exc = real_cpu_oom()
    rss_after = cpu.read(0).process_used_bytes
    assert type(exc) is RuntimeError
    assert "DefaultCPUAllocator: can't allocate memory" in str(exc)
    assert rss_before is not None
    assert rss_after is not None
    assert rss_after - rss_before < 16 * MIB


# --------------------------------------------------------------------------- is_oom_error


def _ort_session(onnxruntime: ModuleType) -> Any:
    """A one-node ONNX model, ConstantOfShape: its output size is the input's value."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node(
        "ConstantOfShape",
        ["shape"],
        ["out"],
        value=helper.make_tensor("value", TensorProto.UINT8, [1], [0]),
    )
    graph = helper.make_graph(
        [node],
        "constant_of_shape",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # its own error log would repeat the exception on stderr
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def ort_session() -> Any:
    return _ort_session(pytest.importorskip("onnxruntime"))


def test_real_onnxruntime_allocation_failure_is_oom(ort_session: Any) -> None:
    exc = caught(lambda: ort_session.run(None, {"shape": np.array([IMPOSSIBLE], np.int64)}))
    assert type(exc).__name__ == "Fail"
    assert type(exc).__module__.startswith("onnxruntime")
    assert "Failed to allocate memory" in str(exc)
    assert is_oom_error(exc)
    # and a small run works: the session itself is fine
    assert ort_session.run(None, {"shape": np.array([4], np.int64)})[0].shape == (4,)


def test_real_onnxruntime_failures_that_are_not_oom(ort_session: Any) -> None:
    # the same exception type as the allocation failure, for a negative shape
    negative = caught(lambda: ort_session.run(None, {"shape": np.array([-1], np.int64)}))
    assert type(negative).__name__ == "Fail"
    assert not is_oom_error(negative)
    wrong_type = caught(lambda: ort_session.run(None, {"shape": np.array([4.0], np.float32)}))
    assert type(wrong_type).__module__.startswith("onnxruntime")
    assert not is_oom_error(wrong_type)


def _cudnn_during_oom() -> BaseException:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError:
        try:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.")
        except RuntimeError as exc:
            return exc
    raise AssertionError("unreachable")


def _raised_from(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError("transcription failed") from cause
    except RuntimeError as exc:
        return exc


OOM_TABLE: list[tuple[str, Callable[[], BaseException], bool]] = [
    ("cpu allocator, real", real_cpu_oom, True),
    (
        "torch.OutOfMemoryError",
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        True,
    ),
    ("torch.cuda.OutOfMemoryError", lambda: torch.cuda.OutOfMemoryError("oom"), True),
    ("MemoryError", MemoryError, True),
    ("vramkit OutOfMemoryError", lambda: OutOfMemoryError("still out"), True),
    (
        "MPS message",
        lambda: RuntimeError(
            "MPS backend out of memory (MPS allocated: 5.50 GB, other allocations: 14.76 GB, "
            "max allowed: 20.40 GB). Tried to allocate 147.24 MB on private pool."
        ),
        True,
    ),
    (
        "cuBLAS alloc failed",
        lambda: RuntimeError(
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
        ),
        True,
    ),
    (
        "cuDNN not supported alone",
        lambda: RuntimeError(
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed "
            "in a non-contiguous input."
        ),
        False,
    ),
    ("cuDNN not supported during an OOM", _cudnn_during_oom, True),
    ("raised from an OOM", lambda: _raised_from(real_cpu_oom()), True),
    ("shape mismatch, real", lambda: caught(lambda: torch.ones(2) + torch.ones(3)), False),
    ("ValueError mentioning memory", lambda: ValueError("out of memory"), False),
    ("KeyboardInterrupt", KeyboardInterrupt, False),
]


@pytest.mark.parametrize(
    ("make", "expected"), [(m, e) for _, m, e in OOM_TABLE], ids=[n for n, _, _ in OOM_TABLE]
)
def test_is_oom_error(make: Callable[[], BaseException], expected: bool) -> None:
    assert is_oom_error(make()) is expected


@pytest.mark.parametrize("bad", ["out of memory", None, RuntimeError])
def test_is_oom_error_rejects_non_exceptions(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="exception instance"):
        is_oom_error(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- oom_retry


class Pool:
    def __init__(self) -> None:
        self.evictions = 0

    def evict_idle(self) -> int:
        self.evictions += 1
        return 0


def test_oom_retry_drops_the_failed_attempt_then_succeeds() -> None:
    held: list[weakref.ref[torch.Tensor]] = []
    seen: list[tuple[bool, int, bool]] = []
    pool = Pool()

    def on_oom(exc: BaseException, attempt: int) -> None:
        # the failed attempt's 32 MiB local is already gone: its frame was cleared
        seen.append((is_oom_error(exc), attempt, held[0]() is None))

    @oom_retry(1, on_oom=on_oom, pool=pool, device="cpu")
    def run(items: int) -> int:
        activations = torch.ones(32 * MIB, dtype=torch.uint8)
        held.append(weakref.ref(activations))
        size = IMPOSSIBLE // ITEM if len(held) == 1 else items
        return workspace(size).numel()

    assert run(3) == 3 * ITEM
    assert seen == [(True, 1, True)]
    assert pool.evictions == 1
    assert len(held) == 2


def test_oom_retry_gives_up_with_out_of_memory_error_from_the_original() -> None:
    held: list[weakref.ref[torch.Tensor]] = []
    attempts: list[int] = []

    @oom_retry(1, on_oom=lambda exc, attempt: attempts.append(attempt))
    def run() -> None:
        activations = torch.ones(32 * MIB, dtype=torch.uint8)
        held.append(weakref.ref(activations))
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)

    with pytest.raises(OutOfMemoryError) as info:
        run()
    assert isinstance(info.value, MemoryError)
    cause = info.value.__cause__
    assert type(cause) is RuntimeError
    assert "DefaultCPUAllocator: can't allocate memory" in str(cause)
    assert "DefaultCPUAllocator: can't allocate memory" in str(info.value)
    assert "2 attempts" in str(info.value)
    assert attempts == [1]
    assert len(held) == 2
    # even the exception the caller holds no longer pins the attempts' tensors
    assert [ref() for ref in held] == [None, None]


def test_oom_retry_leaves_other_errors_untouched() -> None:
    calls: list[int] = []
    pool = Pool()

    @oom_retry(3, pool=pool, on_oom=lambda exc, attempt: calls.append(-1))
    def run() -> None:
        calls.append(1)
        evidence = "kept"  # noqa: F841 - must survive in the traceback
        raise ValueError("bad audio")

    with pytest.raises(ValueError, match="bad audio") as info:
        run()
    assert calls == [1]
    assert pool.evictions == 0
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    assert frames[-1].f_locals.get("evidence") == "kept"


def test_oom_retry_bare_retries_once_and_zero_only_translates() -> None:
    calls: list[int] = []

    @oom_retry
    def once() -> None:
        calls.append(1)
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)

    with pytest.raises(OutOfMemoryError, match="2 attempts"):
        once()
    assert len(calls) == 2

    @oom_retry(0)
    def never() -> None:
        calls.append(0)
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)

    with pytest.raises(OutOfMemoryError, match="1 attempt, no retry"):
        never()
    assert calls == [1, 1, 0]


def test_oom_retry_async() -> None:
    tries: list[int] = []

    @oom_retry(2, device="cpu")
    async def run(items: int) -> int:
        tries.append(items)
        await asyncio.sleep(0)
        size = IMPOSSIBLE // ITEM if len(tries) < 3 else items
        return workspace(size).numel()

    assert asyncio.run(run(2)) == 2 * ITEM
    assert tries == [2, 2, 2]

    @oom_retry(1)
    async def hopeless() -> None:
        await asyncio.sleep(0)
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)

    with pytest.raises(OutOfMemoryError) as info:
        asyncio.run(hopeless())
    assert is_oom_error(info.value.__cause__)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"retries": -1}, InvalidArgumentError, "retries"),
        ({"retries": True}, InvalidArgumentError, "retries"),
        ({"retries": "2"}, InvalidArgumentError, "retries"),
        ({"retries": 1.5}, InvalidArgumentError, "retries"),
        ({"on_oom": 3}, InvalidArgumentError, "on_oom"),
        ({"pool": object()}, InvalidArgumentError, "evict_idle"),
        ({"device": "nonsense!"}, InvalidArgumentError, "device"),
        ({"device": "cuda:7"}, DeviceUnavailableError, "cuda:7"),
    ],
)
def test_oom_retry_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    if "cuda:7" in kwargs.values() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(error, match=match):
        oom_retry(**kwargs)


def test_oom_retry_rejects_non_functions() -> None:
    with pytest.raises(InvalidArgumentError, match="decorates a function"):
        oom_retry(1)(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adaptive_batch_size


class _Twice(OomRetry):
    """Two attempts; records whether recovery runs with no exception being handled."""

    def __init__(self) -> None:
        super().__init__("step", translate=False)
        self.outside: list[bool] = []

    def again(self, exc: BaseException, attempt: int) -> bool:
        return attempt < 2

    def recover(self, exc: BaseException, attempt: int) -> None:
        self.outside.append(sys.exc_info()[1] is None)


def test_the_retry_loop_recovers_outside_the_except_block_and_can_re_raise_as_is() -> None:
    raised: list[BaseException] = []

    def attempt(number: int) -> None:
        raised.append(real_cpu_oom())
        raise raised[-1]

    loop = _Twice()
    with pytest.raises(RuntimeError) as info:
        loop.run(attempt)
    assert info.value is raised[1]  # the last error itself: translate=False
    assert loop.outside == [True]

    async def attempt_async(number: int) -> str:
        if number == 1:
            raise real_cpu_oom()
        return "fits"

    loop = _Twice()
    assert asyncio.run(loop.run_async(attempt_async)) == "fits"
    assert loop.outside == [True]
    assert OomRetry("once").run(lambda number: number) == 1
    with pytest.raises(OutOfMemoryError, match="once ran out of memory"):
        OomRetry("once").run(lambda number: torch.empty(IMPOSSIBLE, dtype=torch.uint8))


def test_adaptive_batch_size_backs_off_to_what_fits_and_remembers_it() -> None:
    tried: list[int] = []

    # 2**40 items of 1 MiB cannot exist; 2**40 * 2**-34 = 64 items (64 MiB, untouched) can
    @adaptive_batch_size(1 << 40, backoff=2**-34, device="cpu")
    def run(batch: list[str], batch_size: int = 0) -> int:
        tried.append(batch_size)
        return workspace(batch_size).numel() // ITEM

    assert run.batch_size == 1 << 40
    assert run(["a.wav"]) == 64
    assert tried == [1 << 40, 64]
    assert run.batch_size == 64
    assert run(["b.wav"]) == 64
    assert tried == [1 << 40, 64, 64]  # the next call starts at what fitted
    run.reset()
    assert run.batch_size == 1 << 40


def test_adaptive_batch_size_halves_down_to_minimum_then_gives_up() -> None:
    tried: list[int] = []

    @adaptive_batch_size(1 << 42, minimum=1 << 40)
    def run(*, batch_size: int) -> None:
        tried.append(batch_size)
        workspace(batch_size)

    with pytest.raises(OutOfMemoryError) as info:
        run()
    assert tried == [1 << 42, 1 << 41, 1 << 40]
    assert "3 attempts" in str(info.value)
    assert f"batch_size={1 << 40}" in str(info.value)
    assert "DefaultCPUAllocator" in str(info.value.__cause__)


def test_adaptive_batch_size_small_sizes_always_shrink() -> None:
    tried: list[int] = []

    @adaptive_batch_size(3, backoff=0.9)
    def run(batch_size: int = 0) -> None:
        tried.append(batch_size)
        torch.empty(IMPOSSIBLE, dtype=torch.uint8)

    with pytest.raises(OutOfMemoryError):
        run()
    assert tried == [3, 2, 1]  # floor(3 * 0.9) == 2, floor(2 * 0.9) == 1


def test_adaptive_batch_size_explicit_and_positional_sizes() -> None:
    tried: list[int] = []

    @adaptive_batch_size(1 << 40, backoff=2**-34)
    def run(batch: str, batch_size: int, suffix: str = "") -> str:
        tried.append(batch_size)
        return f"{batch}:{workspace(batch_size).numel() // ITEM}{suffix}"

    assert run("x", 8, "!") == "x:8!"  # passed positionally: used as this call's start
    assert run("y", batch_size=5) == "y:5"
    assert tried == [8, 5]
    assert run.batch_size == 1 << 40  # nothing ran out of memory: nothing learned
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        run("z", batch_size=0)


def test_adaptive_batch_size_async() -> None:
    @adaptive_batch_size(1 << 40, backoff=2**-34, param="chunk")
    async def run(*, chunk: int) -> int:
        await asyncio.sleep(0)
        return workspace(chunk).numel() // ITEM

    assert asyncio.run(run()) == 64
    assert run.batch_size == 64


def test_adaptive_batch_size_is_shared_safely_between_threads() -> None:
    @adaptive_batch_size(1 << 40, backoff=2**-34)
    def run(batch_size: int = 0) -> int:
        return workspace(batch_size).numel() // ITEM

    barrier = threading.Barrier(4)
    results: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [64] * 4
    assert run.batch_size == 64


def test_adaptive_batch_size_bad_input() -> None:
    def ok(batch_size: int = 1) -> int:
        return batch_size

    bad: list[tuple[dict[str, Any], str]] = [
        ({"start": 0}, "start"),
        ({"start": True}, "start"),
        ({"start": "16"}, "start"),
        ({"start": 16.0}, "start"),
        ({"start": 16, "backoff": 0}, "backoff"),
        ({"start": 16, "backoff": 1}, "backoff"),
        ({"start": 16, "backoff": 1.5}, "backoff"),
        ({"start": 16, "backoff": float("nan")}, "backoff"),
        ({"start": 16, "minimum": 0}, "minimum"),
        ({"start": 16, "minimum": 32}, "minimum"),
        ({"start": 16, "param": ""}, "param"),
        ({"start": 16, "param": 3}, "param"),
        ({"start": 16, "device": "nonsense!"}, "device"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InvalidArgumentError, match=match):
            adaptive_batch_size(**kwargs)
    with pytest.raises(InvalidArgumentError, match="size to start from"):
        adaptive_batch_size(ok)  # type: ignore[arg-type]  # bare use: no start given
    with pytest.raises(InvalidArgumentError, match="no parameter 'batch_size_s'"):
        adaptive_batch_size(16, param="batch_size_s")(ok)

    def positional_only(batch_size: int, /) -> int:
        return batch_size

    with pytest.raises(InvalidArgumentError, match="positional-only"):
        adaptive_batch_size(16)(positional_only)


# --------------------------------------------------------------------------- FunASR


def test_adaptive_batch_size_with_funasr_batch_size_s(
    funasr_module: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from vramkit.testing.models import build_funasr_paraformer, synthetic_audio

    threads = torch.get_num_threads()
    try:
        model_dir = build_funasr_paraformer(tmp_path_factory.mktemp("paraformer"))
        model = funasr_module.AutoModel(
            model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True, ncpu=1
        )
        audio = synthetic_audio(1.0)
        seen: list[int] = []

        # Activation memory grows with the seconds of audio per batch: ITEM per second
        # here, so the first size asked for cannot be allocated anywhere.
        @adaptive_batch_size(1 << 40, backoff=2**-34, param="batch_size_s")
        def transcribe(audio: Any, *, batch_size_s: int) -> list[dict[str, Any]]:
            seen.append(batch_size_s)
            workspace(batch_size_s)
            result: list[dict[str, Any]] = model.generate(input=audio, batch_size_s=batch_size_s)
            return result

        result = transcribe(audio)
        assert seen == [1 << 40, 64]
        assert transcribe.batch_size == 64
        assert len(result) == 1
        assert "text" in result[0]
    finally:
        torch.set_num_threads(threads)
