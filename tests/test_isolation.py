"""``isolate=True``: the same ManagedModel API with the model in a worker process.

Real workers on cpu: a torch model, a FunASR pipeline and an ONNX Runtime
session isolated (tensors and numpy audio through calls), keep-alive, offload
inside the worker, unload proving the worker's pid and memory gone, a native
leak returned by unload, crashes leaving the model UNLOADED (and its pool
reservation released) with the next use working, and interpreter exit ending
workers. The transport and the worker itself are tested in
tests/test_isolation_worker.py.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vramkit
from vramkit import InvalidArgumentError, ManagedModel, ModelPool, ModelState, WorkerCrashedError
from vramkit.isolation import Isolation, WorkerProxy, worker_pid
from vramkit.isolation._worker import live_workers
from vramkit.model import ModelStats, tiers
from vramkit.testing.models import build_onnx_mlp, synthetic_audio, tiny_mlp

from .test_isolation_worker import GONE_WITHIN, _alive, _rss, _wait_gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to prove processes and memory gone"
)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
FAULTY = "vramkit.testing.workers:faulty_model"


@pytest.fixture
def events() -> Iterator[list[vramkit.events.Event]]:
    seen: list[vramkit.events.Event] = []
    unsubscribe = vramkit.events.subscribe(seen.append)
    yield seen
    unsubscribe()


def _pid(mm: ManagedModel[Any]) -> int:
    with mm.use() as proxy:
        return worker_pid(proxy)


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + GONE_WITHIN
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_an_isolated_torch_model_keeps_its_api(events: list[vramkit.events.Event]) -> None:
    factory = functools.partial(tiny_mlp, 1)
    reference = factory().eval()
    mm = ManagedModel.from_torch(factory, device="cpu", name="mlp", isolate=True)
    x = torch.randn(2, reference.dim)

    @mm.inference
    def predict(model: Any, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)  # type: ignore[no-any-return]

    with torch.inference_mode():
        expected = reference(x)
    assert torch.equal(mm(x), expected)
    assert torch.equal(predict(x), expected)
    with mm.use() as model:
        assert isinstance(model, WorkerProxy)
        assert model.dim == reference.dim
        pid = worker_pid(model)
    del model
    assert pid != os.getpid() and _alive(pid)
    # The pool's figure: the whole worker as the OS sees it, not 1 MiB of weights.
    assert mm.size_bytes is not None and mm.size_bytes > 32 * MiB
    assert "mlp" in vramkit.status()

    offloaded = mm.offload("disk")  # inside the worker: the process stays
    assert offloaded.method == "delegated" and "in its worker process" in offloaded.note
    assert mm.state is ModelState.OFFLOADED and _alive(pid)
    assert torch.equal(mm(x), expected)  # woken, in the same worker
    assert _pid(mm) == pid

    report = mm.unload()
    assert report.died and report.ok, report
    assert not _alive(pid)  # the process is gone, and its memory with it
    assert report.freed_bytes["worker"] is not None
    assert report.freed_bytes["worker"] >= 32 * MiB
    assert report.seen_bytes == report.freed_bytes["worker"]
    assert "worker" in str(report)
    kinds = [e.kind for e in events if e.model == "mlp"]
    assert kinds == ["load", "offload", "wake", "unload"]

    assert torch.equal(mm(x), expected)  # the next use starts a new worker
    new_pid = _pid(mm)
    assert new_pid != pid
    mm.unload()
    assert not _alive(new_pid)


def test_controls_and_vramkit_ps_show_the_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramkit._ps import ps_data, ps_text
    from vramkit._runtime import read_records
    from vramkit.controls import Controls
    from vramkit.devices import _nvml

    monkeypatch.setenv("VRAMKIT_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("VRAMKIT_PUBLISH", raising=False)
    with ModelPool("cpu", budget="8GiB", headroom=0, name="iso") as pool:
        mm = pool.register("shown", FAULTY, isolate=True)
        mm.load()
        pid = _pid(mm)
        line = mm.to_dict()
        assert line["isolated"] is True and line["worker_pid"] == pid
        assert line["device_bytes"] == mm.size_bytes  # the worker's resident set
        # Published once, by the caller: the worker writes no record of its own.
        records = read_records()
        assert [r.pid for r in records if any(m["name"] == "shown" for m in r.models)] == [
            os.getpid()
        ]
        assert pid not in {r.pid for r in records}
        # The driver lists the worker: it is vramkit's, not a foreign GPU process.
        monkeypatch.setattr(vramkit._ps, "_nvml_absent", lambda: None)
        monkeypatch.setattr(_nvml, "device_count", lambda: 1)
        monkeypatch.setattr(_nvml, "gpu_processes", lambda i: {pid: 300 * MiB, 1: 3 * 2**30})
        assert [p["pid"] for p in ps_data()["gpu_processes"]] == [1]
        assert f"shown (worker {pid})" in ps_text()

        operation = Controls(pool).unload("shown")
        assert operation.outcome == "ok" and not _alive(pid)
        assert "its worker process ended" in operation.message
        assert operation.detail["worker_freed_bytes"] >= 32 * MiB
        assert mm.to_dict()["worker_pid"] is None


MARKED = """
import pytest
import vramkit

kept = []


@pytest.fixture(scope="module")
def model():
    mm = vramkit.ManagedModel("tests.isolation_models:inspector", device="cpu", isolate=True)
    mm.load()
    yield mm
    mm.unload()


@pytest.mark.no_vram_leak
def test_results_dropped(model):
    with model.use() as proxy:
        for _ in range(3):
            assert float(proxy.ramp(8 * 2**20)[-1]) == 8 * 2**20 - 1


@pytest.mark.no_vram_leak
def test_result_kept(model):
    with model.use() as proxy:
        kept.append(proxy.ramp(8 * 2**20))
"""


@pytest.mark.slow  # a worker starts inside a nested pytest run
def test_leak_markers_judge_what_calls_leave_in_the_caller(pytester: pytest.Pytester) -> None:
    # 32 MiB results arrive through shared memory: dropped, nothing of them
    # stays in the caller; kept, they are the caller's leak, named as usual.
    pytester.makeini("[pytest]\naddopts = -p no:hypothesispytest\nvram_device = cpu\n")
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["  Tensor[[]8388608[]] float32 on cpu, 32.0 MiB"])
    result.stdout.fnmatch_lines(["    held by test_marked.kept[[]0[]]"])
    assert "test_results_dropped" not in "".join(
        line for line in result.stdout.lines if "VRAM LEAK" in line
    )


LEFT_RUNNING = """
import pytest
import vramkit
from vramkit.isolation import worker_pid

kept = []


@pytest.mark.no_vram_leak
def test_unloads():
    mm = vramkit.ManagedModel("tests.isolation_models:inspector", device="cpu", isolate=True)
    mm.load()
    mm.unload()


@pytest.mark.no_vram_leak
def test_leaves_it_running():
    mm = vramkit.ManagedModel(
        "tests.isolation_models:inspector", name="forgotten", device="cpu", isolate=True
    )
    mm.load()
    kept.append(mm)
    with mm.use() as proxy:
        with open("pid.txt", "w") as fh:
            fh.write(str(worker_pid(proxy)))
"""


@pytest.mark.slow  # workers start inside a nested pytest run
def test_leak_markers_name_a_worker_the_test_left_running(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:hypothesispytest\nvram_device = cpu\n")
    pytester.makepyfile(test_left=LEFT_RUNNING)
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    try:
        result.assert_outcomes(passed=1, failed=1)
        pid = int((pytester.path / "pid.txt").read_text())
        result.stdout.fnmatch_lines(
            [
                f"*worker process(es) of isolated model(s) left running by the test: "
                f"'forgotten' (pid {pid})*"
            ]
        )
        result.stdout.fnmatch_lines([f"  'forgotten': worker pid {pid}, READY, on cpu"])
        assert "test_unloads" not in "".join(
            line for line in result.stdout.lines if "VRAM LEAK" in line
        )
    finally:
        for worker in live_workers():
            if worker.name == "forgotten":
                worker.stop()  # what the nested run left: it runs in this process


def test_keep_alive_ends_an_idle_worker() -> None:
    mm = ManagedModel(FAULTY, device="cpu", keep_alive=0, isolate=True)
    assert mm.name == "faulty_model"
    pid = _pid(mm)  # the lease ends here: keep_alive=0 unloads at once
    assert _until(lambda: mm.state is ModelState.UNLOADED)
    assert _wait_gone(pid)


def test_a_native_leak_comes_back_with_the_unload() -> None:
    leak = 32 * MiB
    mm = ManagedModel("vramkit.testing.workers:native_leak", device="cpu", isolate=True)
    mm.load()
    pid = _pid(mm)
    parent = _rss(os.getpid())
    at_load = _rss(pid)
    for calls in range(1, 5):
        assert mm() == calls * leak  # leaked in the worker, where nothing can free it
    grown = _rss(pid) - at_load
    assert grown >= 4 * leak * 0.9
    assert _rss(os.getpid()) - parent < leak  # the caller holds none of it
    report = mm.unload()
    assert not _alive(pid)
    assert report.freed_bytes["worker"] is not None
    assert report.freed_bytes["worker"] >= at_load + grown * 0.9  # all of it, leak included


@pytest.mark.slow
def test_crashes_leave_the_model_unloaded_and_the_next_use_works(
    events: list[vramkit.events.Event],
) -> None:
    pool = ModelPool("cpu", budget="64GiB", headroom=0, name="iso")
    mm = pool.register("faulty", FAULTY, isolate=Isolation(call_timeout=120))
    x = torch.ones(1, 4)
    crashes: dict[str, Callable[[Any], None]] = {
        "segfault": lambda model: model.segfault(),
        "exit": lambda model: model.exit(3),
        "sigkill": lambda model: os.kill(worker_pid(model), signal.SIGKILL) or model.hang(600),
    }
    try:
        for how, crash in crashes.items():
            expected = mm(x)
            assert pool.status().charged_bytes == mm.size_bytes  # the worker, as the OS sees it
            pid = _pid(mm)
            with pytest.raises(WorkerCrashedError) as info, mm.use() as model:
                crash(model)
            assert info.value.pid == pid, how
            assert mm.state is ModelState.UNLOADED, how
            assert pool.status().charged_bytes == 0, how  # the reservation went with it
            assert not _alive(pid)
            assert torch.equal(mm(x), expected), how  # a new worker, the same model
            assert _pid(mm) != pid
        crashed = [e for e in events if e.kind == "crash"]
        assert [e.state_before for e in crashed] == ["READY"] * 3
        assert "SIGSEGV" in crashed[0].detail["error"]
    finally:
        pool.close()


@pytest.mark.slow
def test_a_pool_counts_what_an_offload_inside_a_worker_leaves_behind() -> None:
    with ModelPool("cpu", headroom=0, evict_to="disk", name="residue") as pool:
        first = pool.register("first", FAULTY, isolate=True)
        second = pool.register("second", FAULTY, isolate=True)
        first.load()
        pid = _pid(first)
        assert first.size_bytes is not None
        pool.set_budget(int(first.size_bytes * 1.5))  # room for one worker, not two
        second.load()  # evicts `first` to disk, inside its worker...
        residue = first.stats.offload_residue_bytes["disk"]
        assert residue > first.size_bytes // 2  # ...which keeps its interpreter: counted,
        assert first.state is ModelState.UNLOADED  # so the pool unloaded it after all
        assert not _alive(pid)
        status = pool.status()
        assert status.charged_bytes == second.size_bytes <= status.budget_bytes


def test_choose_tier_weighs_what_an_offload_leaves_behind() -> None:
    def choice(**residue: int) -> str:
        stats = ModelStats(size_bytes=100 * MiB, load_seconds=5.0, offload_residue_bytes=residue)
        costs = tiers.tier_costs(stats, on_host=False, file=None)
        return tiers.choose_tier(costs, 100 * MiB, host_free_bytes=1 << 40)

    assert choice() == "cpu"  # in-process: the weights are all there is
    assert choice(cpu=80 * MiB) == "disk"  # a worker's context stays: cpu frees a fifth
    assert choice(cpu=80 * MiB, disk=80 * MiB) == "unload"  # ...and so does disk


def test_loaders_that_cannot_reach_a_worker_fail_at_construction() -> None:
    with pytest.raises(InvalidArgumentError, match="import path"):
        ManagedModel(lambda: torch.nn.Linear(2, 2), isolate=True)
    with pytest.raises(InvalidArgumentError, match="module level"):
        ManagedModel.from_torch(lambda: torch.nn.Linear(2, 2), device="cpu", isolate=True)
    with pytest.raises(InvalidArgumentError, match="release"):
        ManagedModel(FAULTY, release=lambda model: None, isolate=True)
    with pytest.raises(InvalidArgumentError, match="not an import path"):
        ManagedModel("tests.isolation_models", isolate=True)
    with pytest.raises(InvalidArgumentError, match="isolate"):
        ManagedModel(FAULTY, isolate="yes")  # type: ignore[arg-type]
    # Options the worker's model takes are checked here, not at its first load.
    with pytest.raises(InvalidArgumentError, match="cleanup must be a CleanupPolicy"):
        ManagedModel(FAULTY, cleanup="x", isolate=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="offload_dir"):
        ManagedModel(FAULTY, offload_dir=5, isolate=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="manager_options must be"):
        ManagedModel.from_funasr("model-dir", manager_options={"isolate": True})
    with ModelPool("cpu", name="refuses") as pool, pytest.raises(InvalidArgumentError):
        pool.register("m", lambda: 1, isolate=True)


@pytest.mark.slow  # two workers start
def test_the_loader_contract_holds_in_the_worker() -> None:
    # The loader runs in the worker, so its owns= goes there too: a shared
    # object is refused as in-process, and accepted with owns=False.
    refused = ManagedModel("tests.isolation_models:shared", device="cpu", isolate=True)
    with pytest.raises(InvalidArgumentError, match="owns=False"):
        refused.load()
    assert refused.state is ModelState.UNLOADED
    mm = ManagedModel("tests.isolation_models:shared", device="cpu", owns=False, isolate=True)
    assert mm(torch.ones(1, 4)).shape == (1, 2)
    mm.unload()


@pytest.mark.slow
def test_an_isolated_funasr_pipeline(funasr_module: Any, funasr_pipeline: Any) -> None:
    audio = synthetic_audio(2.0)
    kwargs = {**funasr_pipeline.automodel_kwargs(), "disable_update": True, "ncpu": 1}
    local = funasr_module.AutoModel(device="cpu", disable_pbar=True, **kwargs)
    expected = local.generate(input=audio, hotword="你好")
    model = kwargs.pop("model")
    mm = ManagedModel.from_funasr(
        model, device="cpu", name="asr", isolate=True, disable_pbar=True, **kwargs
    )
    with mm.use() as asr:
        result = asr.generate(input=audio, hotword="你好")  # numpy audio, through shared memory
        pid = worker_pid(asr)
    del asr
    assert [r["text"] for r in result] == [r["text"] for r in expected]
    report = mm.unload()
    assert report.ok and not _alive(pid)


@pytest.mark.slow
def test_an_isolated_onnx_session(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = build_onnx_mlp(tmp_path / "mlp.onnx", in_features=16)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    mm = ManagedModel.from_onnx(path, device="cpu", isolate=True)
    with mm.use() as session:
        outputs = session.run(None, {"x": x})
        pid = worker_pid(session)
    del session
    assert np.allclose(outputs[0], expected[0])
    mm.unload()
    assert not _alive(pid)


EXIT_SCRIPT = """
import sys
import vramkit
from vramkit.isolation import worker_pid

mm = vramkit.ManagedModel("vramkit.testing.workers:faulty_model", device="cpu", isolate=True)
with mm.use() as model:
    print(worker_pid(model), flush=True)
"""


@pytest.mark.slow
def test_interpreter_exit_ends_workers(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert _wait_gone(int(done.stdout.split()[0]))
