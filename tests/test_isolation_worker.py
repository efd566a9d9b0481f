"""The worker process behind ``isolate=True``, driven directly.

Real spawned processes on cpu: the transport (tensors and numpy arrays through
shared memory), the proxy, exceptions with the worker's traceback, crashes
(segfault, ``os._exit``, SIGKILL, a hang), ending a worker that will not
leave, native leaks returned by ending the process, and workers never
outliving their parent.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vramkit import ManagedModel
from vramkit.errors import (
    InvalidArgumentError,
    ModelStateError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from vramkit.isolation import Isolation, WorkerProxy, call_timeout, worker_pid
from vramkit.isolation._spec import WorkerSpec, check_sendable
from vramkit.isolation._transport import INLINE_BYTES, Channel
from vramkit.isolation._worker import RemoteTraceback, Worker, WorkerState

from .isolation_models import Inspector

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to prove processes and memory gone"
)

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GONE_WITHIN = 30.0  # seconds a dead worker may take to disappear on a loaded machine


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (``None``: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_WITHIN
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _worker(loader: str, name: str = "m", **options: Any) -> Worker:
    worker = Worker(WorkerSpec(ManagedModel, loader, name, "cpu", {}), Isolation(**options))
    worker.start()
    return worker


@pytest.fixture(scope="module")
def inspector() -> Iterator[WorkerProxy]:
    worker = _worker("tests.isolation_models:inspector", "inspector", call_timeout=120)
    yield WorkerProxy(worker)
    worker.stop()


@pytest.fixture
def faulty() -> Iterator[Worker]:
    worker = _worker("vramkit.testing.workers:faulty_model", "faulty", call_timeout=120)
    yield worker
    worker.stop()


# ---------------------------------------------------------------------- transport, in-process


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64],
)
@pytest.mark.parametrize("numel", [12, INLINE_BYTES])  # copied inline / into a pool buffer
def test_tensors_cross_intact(
    channels: tuple[Channel, Channel], dtype: torch.dtype, numel: int
) -> None:
    send, receive = channels
    original = (
        (torch.randn(numel) * 10).to(dtype) if dtype is not torch.bool else torch.rand(numel) > 0.5
    )
    for tensor in (original, original[1::3], original.reshape(-1, 4).t()):  # views and strides
        send.send(tensor)
        arrived = receive.recv()
        assert arrived.dtype == dtype
        assert torch.equal(arrived, tensor)
    assert not original.is_shared()  # copied, not moved: the sender's tensor stays as it was


def test_graph_carrying_tensors_arrive_detached(channels: tuple[Channel, Channel]) -> None:
    send, receive = channels
    leaf = torch.ones(3, requires_grad=True)
    send.send({"out": leaf * 2, "leaf": leaf, "param": torch.nn.Parameter(torch.ones(2))})
    arrived = receive.recv()
    assert arrived["out"].grad_fn is None and torch.equal(arrived["out"], torch.full((3,), 2.0))
    assert arrived["leaf"].requires_grad
    assert type(arrived["param"]) is torch.nn.Parameter


def test_many_shared_tensors_in_one_message(channels: tuple[Channel, Channel]) -> None:
    send, receive = channels
    count = 260  # more descriptors than one sendmsg may carry (SCM_MAX_FD is 253)
    pooled = [torch.full((INLINE_BYTES // 4,), float(i)) for i in range(count)]
    shared = [t.clone().share_memory_() for t in pooled]  # torch's sharing: a descriptor each
    for tensors in (pooled, shared):
        send.send(tensors)
        arrived = receive.recv()
        assert [float(t[0]) for t in arrived] == [float(i) for i in range(count)]


class _Explodes:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode, ())


def _explode() -> None:
    raise ValueError("cannot rebuild")


def test_a_message_that_fails_to_unpickle_leaks_no_descriptor(
    channels: tuple[Channel, Channel],
) -> None:
    send, receive = channels
    tensors = [torch.ones(INLINE_BYTES) for _ in range(5)]
    shared = [torch.ones(INLINE_BYTES).share_memory_() for _ in range(5)]  # torch's descriptors
    for _ in range(2):  # the first time makes the pool's buffers and maps them
        before = _fds()
        send.send((torch.zeros(1), _Explodes(), *tensors, *shared))
        with pytest.raises(ValueError, match="cannot rebuild"):
            receive.recv()
        receive.send(None)  # the answer gives the unclaimed buffers back
        assert send.recv() is None
    assert _fds() <= before  # every descriptor that arrived was closed, no buffer was lost
    assert send.pool_counts() == (5, 0)


def test_numpy_arrays_cross_as_numpy(channels: tuple[Channel, Channel]) -> None:
    send, receive = channels
    audio = np.linspace(-1, 1, 16000 * 4, dtype=np.float32)
    readonly = audio.copy()
    readonly.setflags(write=False)
    send.send((audio, readonly, np.arange(5), np.array(["a", "b"], dtype=object)))
    arrived = receive.recv()
    assert all(isinstance(a, np.ndarray) for a in arrived)
    assert np.array_equal(arrived[0], audio) and np.array_equal(arrived[1], readonly)
    assert arrived[3].tolist() == ["a", "b"]


# ---------------------------------------------------------------------- sendable loaders


def test_unpicklable_loaders_are_refused_with_the_fix() -> None:
    def nested() -> None: ...

    for loader in (lambda: None, nested):
        with pytest.raises(InvalidArgumentError, match="module level") as info:
            check_sendable(loader, "loader")
        assert "import path" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="not an import path"):
        check_sendable("tests.isolation_models.inspector", "loader")
    check_sendable("tests.isolation_models:inspector", "loader")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"call_timeout": -1}, "call_timeout"),
        ({"stop_timeout": "10"}, "stop_timeout"),
        ({"log_lines": 2.5}, "log_lines"),
        ({"kill_timeout": float("nan")}, "kill_timeout"),
    ],
)
def test_bad_isolation_options_fail_at_the_call(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        Isolation(**options)


# ---------------------------------------------------------------------- a live worker


def test_calls_cross_with_tensors_and_arrays_in_shared_memory(inspector: WorkerProxy) -> None:
    x = torch.ones(3, 4)
    assert torch.equal(inspector(x), Inspector()(x).detach())
    big = torch.ones(2 * MiB // 4)
    seen = inspector.describe(big, torch.ones(2), np.ones(MiB // 4, np.float32), np.ones(3), "s")
    assert seen[0] == {
        "kind": "tensor",
        "shared": False,  # copied into a pool buffer, not moved into torch's shared memory
        "dtype": "torch.float32",
        "sum": big.numel(),
    }
    assert not big.is_shared()
    assert seen[1]["shared"] is False  # small: copied through the socket
    assert seen[2] == {"kind": "ndarray", "dtype": "float32", "sum": MiB // 4}
    assert [s["kind"] for s in seen[3:]] == ["ndarray", "str"]
    ramp = inspector.ramp(MiB)
    assert torch.equal(ramp, torch.arange(MiB, dtype=torch.float32))
    audio = inspector.audio(64000)
    assert isinstance(audio, np.ndarray)
    assert np.array_equal(audio, np.linspace(-1, 1, 64000, dtype=np.float32))
    inspector.double_inplace(big)  # a copy: the worker's write stays there
    assert float(big[0]) == 1.0
    big.share_memory_()  # shared by the caller: it travels as is, and writes go both ways
    inspector.double_inplace(big)
    assert float(big[0]) == 2.0


def test_root_calls_answer_alike_by_either_path(inspector: WorkerProxy) -> None:
    local = Inspector()
    x = torch.randn(4, 4)
    cases = {
        "simple": x,  # packed numbers and raw bytes, both ways
        "transposed view": x.t(),
        "negative view": torch.randn(4, 4, dtype=torch.complex64).conj().imag,
        "requires grad": x.clone().requires_grad_(),
    }
    for label, arg in cases.items():
        assert torch.allclose(inspector(arg), local(arg).detach()), label


def test_attributes_are_copies_and_methods_stay_remote(inspector: WorkerProxy) -> None:
    assert inspector.scale == 2.0
    settings = inspector.settings
    settings["beam"] = 1  # a copy: the worker's dict is untouched
    assert inspector.settings == {"language": "en", "beam": 4}
    inspector.scale = 3.0
    try:
        assert inspector.scale == 3.0
    finally:
        inspector.scale = 2.0
    assert isinstance(inspector.guard, WorkerProxy)  # unpicklable: it stays there
    assert isinstance(inspector.linear, WorkerProxy)  # a submodule
    assert tuple(inspector.linear(torch.ones(1, 4)).shape) == (1, 2)
    assert tuple(inspector.linear.weight.shape) == (2, 4)
    assert len(inspector.layers) == 2
    assert tuple(inspector.layers[0](torch.ones(1, 4)).shape) == (1, 4)
    assert isinstance(inspector.itself(), WorkerProxy)  # the model itself comes back as a proxy
    assert "describe" in dir(inspector)
    assert f"pid {worker_pid(inspector)}" in repr(inspector)
    assert inspector.pid() == worker_pid(inspector) != os.getpid()
    with pytest.raises(AttributeError):
        inspector.no_such_attribute  # noqa: B018
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(inspector)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.copy(inspector)


def test_worker_exceptions_reraise_with_the_worker_traceback(inspector: WorkerProxy) -> None:
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        inspector(torch.ones(1, 5))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in forward" in cause.text and "linear.py" in cause.text
    # An exception whose type cannot be rebuilt here still says what it was.
    with pytest.raises(RuntimeError, match=r"isolation_models\._Unpicklable: 1 and 2"):
        inspector.raise_unpicklable()
    assert inspector.scale == 2.0  # the worker is fine


def test_values_one_side_cannot_rebuild_fail_the_call_not_the_worker(
    inspector: WorkerProxy,
) -> None:
    module = types.ModuleType("vk_caller_only")
    exec("class Thing:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(ModuleNotFoundError, match="vk_caller_only"):
            inspector.describe(module.Thing())  # the worker cannot import its class
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ModuleNotFoundError, match="vk_worker_only"):
        inspector.only_here()  # nor can the caller import this result's class
    assert inspector.scale == 2.0  # and the worker answers on, in step


def test_loader_errors_reach_the_caller_and_end_the_worker() -> None:
    spec = WorkerSpec(ManagedModel, "tests.isolation_models:failing_loader", "m", "cpu", {})
    worker = Worker(spec, Isolation())
    with pytest.raises(FileNotFoundError, match="no weights") as info:
        worker.start()
    assert "failing_loader" in info.value.__cause__.text  # type: ignore[union-attr]
    assert worker.state is WorkerState.STOPPED and _wait_gone(worker.pid)


# ---------------------------------------------------------------------- crashes


@pytest.mark.parametrize("how", ["segfault", "exit", "sigkill"])
def test_a_crash_fails_the_call_and_leaves_the_caller_standing(faulty: Worker, how: str) -> None:
    proxy = WorkerProxy(faulty)
    noticed: list[WorkerCrashedError] = []
    faulty.on_exit(lambda worker, error: noticed.append(error))
    fds = _fds()
    if how == "sigkill":
        threading.Timer(0.5, os.kill, (faulty.pid, signal.SIGKILL)).start()
    crash = {"segfault": proxy.segfault, "exit": lambda: proxy.exit(3), "sigkill": proxy.hang}
    with pytest.raises(WorkerCrashedError) as info:
        crash[how]()
    error = info.value
    assert error.pid == faulty.pid and error.model == "faulty"
    if how == "segfault":
        assert error.signal == signal.SIGSEGV and error.exitcode is None
        assert any("Segmentation fault" in line for line in error.log_lines)
        assert "about to read address 0" in error.log_lines
        assert "SIGSEGV" in str(error)
    elif how == "exit":
        assert error.exitcode == 3 and error.signal is None
        assert error.log_lines[-1] == "exiting with status 3"
    else:
        assert error.signal == signal.SIGKILL
    assert noticed == [error]  # the owner heard once, before the call raised
    assert faulty.state is WorkerState.CRASHED and not _alive(faulty.pid)
    with pytest.raises(WorkerCrashedError):
        proxy(torch.ones(1, 4))  # stale: the same crash, not a hang
    assert faulty.stop().how == "crashed"
    assert _fds() <= fds  # socket, lifeline, log pipe and sentinel all closed


def test_a_worker_that_dies_idle_is_noticed_without_a_call(faulty: Worker) -> None:
    noticed = threading.Event()
    errors: list[WorkerCrashedError] = []
    faulty.on_exit(lambda worker, error: (errors.append(error), noticed.set()))
    os.kill(faulty.pid, signal.SIGKILL)
    assert noticed.wait(GONE_WITHIN)
    assert errors[0].signal == signal.SIGKILL and "while idle" in str(errors[0])
    assert faulty.state is WorkerState.CRASHED


def test_a_hung_call_times_out_and_the_worker_is_killed(faulty: Worker) -> None:
    proxy = call_timeout(WorkerProxy(faulty), 1.0)
    with pytest.raises(WorkerTimeoutError, match=r"within 1\.0 s") as info:
        proxy.hang(600)
    assert isinstance(info.value, TimeoutError)
    assert info.value.signal == signal.SIGKILL
    assert _wait_gone(faulty.pid)
    with pytest.raises(InvalidArgumentError, match="seconds"):
        call_timeout(proxy, -1)
    with pytest.raises(InvalidArgumentError, match="proxy"):
        call_timeout(object(), 1)  # type: ignore[arg-type]


@pytest.mark.slow
def test_stop_escalates_to_kill_for_a_worker_that_will_not_leave() -> None:
    worker = _worker(
        "vramkit.testing.workers:faulty_model", stop_timeout=0.5, terminate_timeout=0.5
    )
    proxy = WorkerProxy(worker)
    proxy.ignore_sigterm()
    outcome: list[BaseException] = []

    def busy() -> None:
        try:
            proxy.hang(600)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=busy)
    caller.start()
    time.sleep(0.2)  # let the call reach the worker (if not, stop() still ends it)
    report = worker.stop()
    caller.join(GONE_WITHIN)
    assert report.how == "killed" and report.exitcode == -signal.SIGKILL and report.gone
    assert not _alive(report.pid)
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerCrashedError | ModelStateError)


# ---------------------------------------------------------------------- memory and lifetimes


def test_native_leaks_come_back_when_the_worker_ends() -> None:
    leak = 32 * MiB
    # Started from a thread that ends at once: PR_SET_PDEATHSIG fires when the
    # *thread* that forked exits, so workers are forked by the monitor thread.
    box: list[Worker] = []
    starter = threading.Thread(target=lambda: box.append(_worker(LEAK)))
    starter.start()
    starter.join()
    worker = box[0]
    proxy = WorkerProxy(worker)
    parent_before = _rss(os.getpid())
    worker_before = _rss(worker.pid)
    for _ in range(4):
        proxy()
    assert _rss(worker.pid) - worker_before >= 4 * leak * 0.9  # resident, in the worker
    assert _rss(os.getpid()) - parent_before < leak  # none of it here
    report = worker.stop()
    assert report.how == "exited" and report.exitcode == 0 and report.gone
    assert not _alive(report.pid)  # its whole address space went with it
    with pytest.raises(ModelStateError, match="stale"):
        proxy()
    assert worker.stop() is report  # idempotent


LEAK = "vramkit.testing.workers:native_leak"


PARENT = """
import sys, time
from vramkit.isolation import Isolation, WorkerProxy
from vramkit.isolation._spec import WorkerSpec
from vramkit.isolation._worker import Worker
from vramkit.model import ManagedModel

if __name__ == "__main__":
    spec = WorkerSpec(ManagedModel, "vramkit.testing.workers:faulty_model", "m", "cpu", {})
    worker = Worker(spec, Isolation())
    worker.start()
    if sys.argv[1] == "pipe-only":
        WorkerProxy(worker).disarm_parent_death_signal()
    print(worker.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("armed", ["signal-and-pipe", "pipe-only"])
def test_no_orphan_when_the_parent_is_killed(tmp_path: Path, armed: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    parent = subprocess.Popen(
        [sys.executable, str(script), armed], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert _alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
    assert _wait_gone(pid), f"worker {pid} outlived its parent ({armed})"
