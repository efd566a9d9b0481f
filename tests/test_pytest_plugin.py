"""The pytest plugin, tested the way its users meet it: pytest runs on small test projects.

Most runs are in-process (``pytester.runpytest``): a planted leak is a new
storage, found by the census whatever else the heap holds. Two runs are
subprocesses (each imports torch, one funasr too): xdist's, and FunASR's.
"""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import entry_points

import pytest
import torch

from vramkit.model import ModelState
from vramkit.pytest_plugin import ModelFactory, VramSnapshots

pytest_plugins = ["pytester"]

# Every project pins the checked device to the host, so that these tests mean
# the same on a GPU runner; retries are off because the planted leaks are real.
# Hypothesis's plugin imports all of hypothesis at the end of a run: not needed here.
PLUGINS = "addopts = -p no:hypothesispytest\n"
INI = f"""
[pytest]
{PLUGINS}vram_device = cpu
vram_retries = 0
"""

LEAKY = """
import pytest
import torch

cache = []


@pytest.mark.no_vram_leak
def test_leaks():
    cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))


@pytest.mark.no_vram_leak
def test_clean():
    scratch = torch.ones(1024, 1024)
    assert float(scratch.sum()) == 1024 * 1024
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    return pytester


def call_reports(result: pytest.RunResult) -> dict[str, pytest.TestReport]:
    """The call-phase reports of an in-process run, by test name."""
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    return {r.nodeid.split("::")[-1]: r for r in reports if r.when == "call"}


def peak_can_be_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- registration


def test_the_entry_point_loads_the_plugin_which_registers_its_markers(
    project: pytest.Pytester,
) -> None:
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "vramkit"]
    assert entry.value == "vramkit.pytest_plugin"
    result = project.runpytest("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.no_vram_leak(tolerance=None, *, device=None, process_tolerance=None): *",
            "@pytest.mark.vram_limit(limit, *, device=None): *",
        ]
    )
    blocked = project.runpytest("-p", "no:vramkit", "--markers")
    assert "no_vram_leak" not in blocked.stdout.str()
    options = project.runpytest("--help")
    options.stdout.fnmatch_lines(
        [
            "*--vram-leak-check*",
            "*--vram-tolerance=SIZE*",
            "*--vram-process-tolerance=SIZE*",
            "*--vram-device=DEVICE*",
            "*--vram-retries=N*",
            "*vram_leak_check (bool):*",
            "*vram_tolerance (string):*",
            "*vram_process_tolerance (string):*",
            "*vram_device (string):*",
            "*vram_retries (string):*",
        ]
    )


# --------------------------------------------------------------------------- verdicts


def test_a_leaking_test_fails_naming_the_tensor_and_its_holder(project: pytest.Pytester) -> None:
    project.makepyfile(test_leak=LEAKY)
    result = project.runpytest("--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "test_leak.py L. *",
            "leaked 32.0 MiB on cpu (live tensors +32.0 MiB, process *, peak *); "
            "tolerance 16.0 MiB",
            "*- vramkit leak -*",
            "measured 2 time(s) after the test and its function-scoped fixtures ended *",
            "tensors on cpu that appeared during the test and are still alive, largest first:",
            "  Tensor[33554432] uint8 on cpu, 32.0 MiB",
            "    held by test_leak.cache[0]",
            "managed models alive*",
            "VRAM LEAK test_leak.py::test_leaks - leaked 32.0 MiB on cpu *",
        ]
    )
    calls = call_reports(result)
    assert calls["test_leaks"].failed
    assert [title for title, _ in calls["test_leaks"].sections] == ["vramkit leak"]
    assert calls["test_clean"].passed
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    assert all(r.passed for r in reports if r.when == "teardown")  # a failure, not an error


def test_the_tolerance_is_respected(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_tolerance="""
        import pytest
        import torch

        cache = []


        @pytest.mark.no_vram_leak
        def test_under_the_default():
            cache.append(torch.zeros(8 * 2**20, dtype=torch.uint8))


        @pytest.mark.no_vram_leak("4MiB")
        def test_over_a_positional_tolerance():
            cache.append(torch.zeros(8 * 2**20, dtype=torch.uint8))


        @pytest.mark.no_vram_leak(tolerance="0B")
        def test_over_zero():
            cache.append(torch.zeros(1024, dtype=torch.uint8))


        @pytest.mark.no_vram_leak(tolerance="64MiB")
        def test_under_a_generous_tolerance():
            cache.append(torch.zeros(32 * 2**20, dtype=torch.uint8))
        """
    )
    result = project.runpytest()
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {
        "test_under_the_default": "passed",
        "test_over_a_positional_tolerance": "failed",
        "test_over_zero": "failed",
        "test_under_a_generous_tolerance": "passed",
    }
    result.stdout.fnmatch_lines(
        [
            "leaked 8.0 MiB on cpu (live tensors +8.0 MiB, *); tolerance 4.0 MiB",
            "leaked 1.0 KiB on cpu (live tensors +1.0 KiB, *); tolerance 0 B",
        ]
    )


def test_the_window_spans_function_scoped_fixtures_and_no_wider_one(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_window="""
        import pytest
        import torch

        kept = []
        runs = []


        @pytest.fixture(scope="module")
        def shared():
            return torch.ones(8 * 2**20)  # set up inside the first test's setup: not its leak


        @pytest.fixture
        def returned():
            return torch.ones(8 * 2**20)  # pytest holds it until after teardown: not a leak


        @pytest.fixture
        def freed():
            buffers = [torch.ones(8 * 2**20)]
            yield buffers
            buffers.clear()


        @pytest.fixture
        def keeps():
            kept.append(torch.ones(8 * 2**20))  # set up before the guard in argument order


        def test_fixtures_that_give_back(vram_guard, shared, returned, freed):
            runs.append(vram_guard)
            assert not vram_guard.done


        def test_a_fixture_that_keeps(keeps, vram_guard):
            pass


        def test_the_report_is_read_after_the_test():
            (run,) = runs
            assert run.done
            assert run.report.verdict == "clean"
            assert run.report.name.endswith("test_fixtures_that_give_back")
        """
    )
    result = project.runpytest("--setup-show")
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {
        "test_fixtures_that_give_back": "passed",
        "test_a_fixture_that_keeps": "failed",
        "test_the_report_is_read_after_the_test": "passed",
    }
    result.stdout.fnmatch_lines(
        [
            "*SETUP    M shared",
            "*SETUP    F vram_guard",
            "*SETUP    F returned",
            "*SETUP    F freed",
            "*TEARDOWN F freed",
            "*TEARDOWN F returned",
            "*TEARDOWN F vram_guard*",
            "*SETUP    F vram_guard",
            "*SETUP    F keeps",
            "*TEARDOWN F keeps",
            "*TEARDOWN F vram_guard*",
            "*leaked 32.0 MiB on cpu (live tensors +32.0 MiB, *",
            "    held by test_window.kept[0]",
        ]
    )


def test_a_test_that_fails_or_skips_on_its_own_is_not_judged(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_own="""
        import pytest
        import torch

        cache = []


        @pytest.mark.no_vram_leak
        def test_fails():
            cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))
            assert False, "its own failure"


        @pytest.mark.no_vram_leak
        def test_skips():
            cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))
            pytest.skip("not today")
        """
    )
    result = project.runpytest()
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["test_own.py Fs *", "*AssertionError: its own failure"])
    assert "vramkit leak" not in result.stdout.str()
    assert "VRAM LEAK" not in result.stdout.str()


@pytest.mark.skipif(not peak_can_be_reset(), reason="this system cannot reset the peak RSS")
def test_vram_limit_fails_a_test_whose_peak_exceeds_it(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_limit="""
        import pytest
        import torch


        @pytest.mark.vram_limit("32MiB")
        def test_over():
            scratch = torch.ones(16 * 2**20)  # 64 MiB, written, so resident
            del scratch


        @pytest.mark.vram_limit("32MiB")
        def test_under():
            scratch = torch.ones(2**18)
            del scratch
        """
    )
    result = project.runpytest()
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {"test_over": "failed", "test_under": "passed"}
    result.stdout.fnmatch_lines(
        [
            "test_limit.py M. *",
            "peak 6?.? MiB above the start on cpu exceeds vram_limit 32.0 MiB "
            "(process * at the start, * at the peak)",
            "*- vramkit peak -*",
            "peak growth = peak resident set size since the start (reset then) minus *",
            "VRAM LIMIT test_limit.py::test_over - peak *",
        ]
    )


FAKE_CONFTEST = """
import pytest

from vramkit.devices import register_backend, unregister_backend
from vramkit.testing.fake import FakeDevice

FAKE = FakeDevice("pluginfake", total="8GiB")


def pytest_configure(config):
    FAKE.set_outside("100MiB")  # a context: this process, outside the allocator
    register_backend(FAKE)


def pytest_unconfigure(config):
    unregister_backend("pluginfake")


@pytest.fixture
def fake():
    return FAKE
"""


def test_on_an_accelerator_the_driver_must_confirm_the_allocator(
    project: pytest.Pytester,
) -> None:
    project.makeconftest(FAKE_CONFTEST)
    project.makepyfile(
        test_fake="""
        import pytest


        @pytest.mark.no_vram_leak(device="pluginfake:0")
        def test_leak(fake):
            fake.allocate("64MiB")


        @pytest.mark.no_vram_leak(device="pluginfake:0")
        def test_unverified(fake):
            fake.allocate("64MiB")
            fake.set_outside("36MiB")  # something else let go as much: the driver sees no growth


        @pytest.mark.no_vram_leak(device="pluginfake:0")
        def test_driver_growth_alone(fake):
            fake.set_outside("100MiB")  # an arena grew: ignored without a process tolerance


        @pytest.mark.no_vram_leak(device="pluginfake:0", process_tolerance="16MiB")
        def test_driver_growth_past_a_process_tolerance(fake):
            fake.set_outside("164MiB")


        @pytest.mark.vram_limit("1GiB", device="pluginfake:0")
        def test_over_the_limit(fake):
            fake.allocate("2GiB")
            fake.free("2GiB")


        @pytest.mark.vram_limit("1GiB", device="pluginfake:0")
        def test_under_the_limit(fake):
            fake.allocate("512MiB")
            fake.free("512MiB")
        """
    )
    result = project.runpytest()
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {
        "test_leak": "failed",
        "test_unverified": "passed",
        "test_driver_growth_alone": "passed",
        "test_driver_growth_past_a_process_tolerance": "failed",
        "test_over_the_limit": "failed",
        "test_under_the_limit": "passed",
    }
    result.stdout.fnmatch_lines(
        [
            "test_fake.py L..LM. *",
            "leaked 64.0 MiB on pluginfake:0 (allocated +64.0 MiB, reserved +64.0 MiB, "
            "process +64.0 MiB, peak 64.0 MiB); tolerance 16.0 MiB",
            "  no new live tensors on pluginfake:0: the memory is held outside *",
            "leaked 64.0 MiB on pluginfake:0 (allocated 0 B, reserved 0 B, process +64.0 MiB, "
            "peak *); tolerance 16.0 MiB, process tolerance 16.0 MiB",
            "peak 2.0 GiB above the start on pluginfake:0 exceeds vram_limit 1.0 GiB "
            "(allocated 128.0 MiB at the start, 2.1 GiB at the peak)",
            "*warnings summary*",
            "test_fake.py::test_unverified",
            "*VramLeakWarning: *64.0 MiB allocated on pluginfake:0 did not come back, "
            "but the driver does not confirm it*",
        ]
    )
    strict = project.runpytest("-W", "error::vramkit.VramLeakWarning", "-k", "unverified")
    assert call_reports(strict)["test_unverified"].failed
    strict.stdout.fnmatch_lines(
        ["test_fake.py L *", "64.0 MiB allocated on pluginfake:0 did not come back, but *"]
    )


# --------------------------------------------------------------------------- options


def test_options_and_ini_keys_turn_the_check_on_for_every_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_unmarked="""
        import torch

        cache = []


        def test_leaks():
            cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))


        def test_clean():
            assert torch.ones(4).sum() == 4
        """
    )
    pytester.makeini(f"[pytest]\n{PLUGINS}vram_device = cpu\n")
    pytester.runpytest().assert_outcomes(passed=2)  # nobody asked
    on = pytester.runpytest("--vram-leak-check")
    on.assert_outcomes(passed=1, failed=1)
    on.stdout.fnmatch_lines(
        [
            "leaked 32.0 MiB on cpu (*); tolerance 16.0 MiB",
            "measured 5 time(s) *",  # 3 retries by default, after a first check and a cleanup
            "    held by test_unmarked.cache[0]",
        ]
    )
    pytester.runpytest(
        "--vram-leak-check", "--vram-tolerance=64MiB", "--vram-retries=0"
    ).assert_outcomes(passed=2)
    pytester.makeini(
        f"[pytest]\n{PLUGINS}vram_device = cpu\nvram_leak_check = true\n"
        "vram_tolerance = 1MiB\nvram_retries = 1\n"
    )
    by_ini = pytester.runpytest()
    by_ini.assert_outcomes(passed=1, failed=1)
    by_ini.stdout.fnmatch_lines(
        ["leaked 32.0 MiB on cpu (*); tolerance 1.0 MiB", "measured 3 time(s) *"]
    )


FROZEN = """
import gc

import pytest
import torch

cache = []  # made at import: frozen with the heap before the first check


class Node:
    pass


@pytest.mark.no_vram_leak
def test_into_a_frozen_global():
    cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))


@pytest.mark.no_vram_leak
def test_through_a_live_cycle():
    node = Node()
    node.itself = node
    node.tensor = torch.empty(32 * 2**20, dtype=torch.uint8)
    cache.append(node)


@pytest.mark.no_vram_leak
def test_into_a_dead_cycle():
    node = Node()
    node.itself = node
    node.tensor = torch.empty(32 * 2**20, dtype=torch.uint8)


@pytest.mark.no_vram_leak
def test_frozen_by_the_test_itself():
    cache.append(torch.empty(32 * 2**20, dtype=torch.uint8))
    gc.freeze()


@pytest.mark.no_vram_leak
def test_clean():
    assert float(torch.ones(1024, 1024).sum()) == 1024 * 1024
"""


@pytest.mark.parametrize("how", ["option", "ini"])
def test_a_frozen_heap_hides_no_leak(pytester: pytest.Pytester, how: str) -> None:
    import gc

    pytester.makepyfile(test_frozen=FROZEN)
    ini = "vram_freeze_heap = true\n" if how == "ini" else ""
    pytester.makeini(f"[pytest]\n{PLUGINS}vram_device = cpu\nvram_retries = 0\n{ini}")
    gc.disable()  # the dead cycle must wait for the check's own collection
    try:
        result = pytester.runpytest(*(["--vram-freeze-heap"] if how == "option" else []))
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0  # the run thawed what it froze
    calls = call_reports(result)
    assert {name for name, report in calls.items() if report.failed} == {
        "test_into_a_frozen_global",
        "test_through_a_live_cycle",
        "test_frozen_by_the_test_itself",
    }
    result.stdout.fnmatch_lines(
        [
            "*- vramkit leak -*",
            "    held by test_frozen.cache[0]",
            "*- vramkit leak -*",
            "    held by test_frozen.cache[1] -> Node.tensor",
            "*- vramkit leak -*",
            "    held by test_frozen.cache[2]",
        ]
    )


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--vram-tolerance=ten"], "", "--vram-tolerance / vram_tolerance: tolerance must be *"),
        ([], "vram_tolerance = -1MiB", "--vram-tolerance / vram_tolerance: *(negative)"),
        (["--vram-device=tpu"], "", "--vram-device / vram_device: unknown device 'tpu'*"),
        ([], "vram_retries = many", "--vram-retries / vram_retries: expected a whole *'many'"),
        (
            ["--vram-process-tolerance=lots"],
            "",
            "--vram-process-tolerance / vram_process_tolerance: process tolerance must be *",
        ),
    ],
)
def test_a_bad_option_is_a_usage_error(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    pytester.makeini(f"[pytest]\n{PLUGINS}{ini}\n")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: vramkit: {message}"])


def test_misused_markers_are_collection_errors_naming_each_test(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_misuse="""
        import pytest


        @pytest.mark.no_vram_leak(tolerance="ten")
        def test_bad_tolerance():
            pass


        @pytest.mark.no_vram_leak(device="tpu")
        def test_bad_device():
            pass


        @pytest.mark.vram_limit()
        def test_no_limit():
            pass


        @pytest.mark.no_vram_leak(device="cpu")
        @pytest.mark.vram_limit("1GiB", device="cuda:0")
        def test_two_devices():
            pass


        def test_fine():
            pass
        """,
        test_misuse_in_class="""
        import pytest


        class TestGroup:
            @pytest.mark.no_vram_leak(tolerence="1MiB")
            def test_misspelt(self):
                pass
        """,
    )
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_misuse.py*",
            "vramkit: test_misuse.py::test_bad_tolerance: "
            "@pytest.mark.no_vram_leak(tolerance='ten'): tolerance must be *; got 'ten'",
            '  accepted forms: @pytest.mark.no_vram_leak, @pytest.mark.no_vram_leak("1MiB"), *',
            "vramkit: test_misuse.py::test_bad_device: @pytest.mark.no_vram_leak(device='tpu'): "
            "unknown device 'tpu'; known kinds: *",
            "vramkit: test_misuse.py::test_no_limit: @pytest.mark.vram_limit(): "
            "wrong arguments (missing a required argument: 'limit')",
            '  accepted forms: @pytest.mark.vram_limit("2GiB"), *',
            "vramkit: test_misuse.py::test_two_devices: no_vram_leak and vram_limit name "
            "different devices (cpu, cuda:0); a test is checked on one device",
            "*ERROR collecting test_misuse_in_class.py*",
            "vramkit: test_misuse_in_class.py::TestGroup::test_misspelt: "
            "@pytest.mark.no_vram_leak(tolerence='1MiB'): wrong arguments (*'tolerence'*)",
        ]
    )
    assert "test_fine" not in result.stdout.str()  # nothing ran


def test_a_marker_misused_by_a_hook_after_collection_errors_at_setup(
    project: pytest.Pytester,
) -> None:
    project.makeconftest(
        """
        import pytest


        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.no_vram_leak(tolerance="ten"))
        """
    )
    project.makepyfile(test_late="def test_marked_late():\n    pass\n")
    result = project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_marked_late*",
            "vramkit: test_late.py::test_marked_late: "
            "@pytest.mark.no_vram_leak(tolerance='ten'): tolerance must be *",
        ]
    )


def test_a_device_this_machine_lacks_skips_the_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_cuda="""
        import pytest


        @pytest.mark.no_vram_leak(device="cuda:7")
        def test_on_the_eighth_gpu():
            pass
        """
    )
    result = project.runpytest("-rs")
    if torch.cuda.device_count() > 7:
        result.assert_outcomes(passed=1)
        return
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *vramkit: cannot check memory here: device 'cuda:7' *"])


# --------------------------------------------------------------------------- cost


PROBE_CONFTEST = """
import json
import os
import sys

import pytest

import vramkit

ROOT = os.path.dirname(vramkit.__file__) + os.sep
SEEN = {}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    calls = set()

    def probe(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(ROOT):
            calls.add(os.path.relpath(name, ROOT) + ":" + frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(probe)
    try:
        return (yield)
    finally:
        sys.setprofile(previous)
        SEEN[item.name] = {"calls": sorted(calls), "fixtures": list(item.fixturenames)}


def pytest_sessionfinish(session):
    with open("seen.json", "w", encoding="utf-8") as fh:
        json.dump(SEEN, fh)
"""


def test_a_test_that_does_not_ask_costs_nothing(project: pytest.Pytester) -> None:
    project.makeconftest(PROBE_CONFTEST)
    project.makepyfile(
        test_cost="""
        import pytest
        import torch


        def test_plain():
            assert torch.ones(4).sum() == 4


        @pytest.mark.no_vram_leak
        def test_marked():
            assert torch.ones(4).sum() == 4
        """
    )
    project.runpytest().assert_outcomes(passed=2)
    seen = json.loads((project.path / "seen.json").read_text(encoding="utf-8"))
    plain, marked = seen["test_plain"], seen["test_marked"]
    # Only the plugin's hooks ran, each returning after a lookup: no snapshot, no census.
    assert plain["calls"], "the probe saw nothing: it would prove nothing either"
    assert all(
        where.startswith("pytest_plugin") and function.startswith("pytest_")
        for where, function in (call.split(":") for call in plain["calls"])
    )
    assert "vram_guard" not in plain["fixtures"]
    # The census walks what the test made, inside the heap's boundary.
    assert {"session/_session.py:_start", "memory.py:snapshot", "_gc.py:tensors_since"} <= set(
        marked["calls"]
    )
    assert "vram_guard" in marked["fixtures"]


# --------------------------------------------------------------------------- model fixtures


def test_managed_model_factory_reports_a_model_that_survives_unloading(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_models="""
        import torch

        from vramkit import ModelState

        kept = []
        made = []


        def build():
            return torch.nn.Linear(1024, 1024)


        def teardown_module():
            kept.clear()


        def test_survivor(managed_model_factory):
            model = managed_model_factory.from_torch(build, device="cpu", name="survivor")
            with model.use() as module:
                kept.append(module)  # outlives its lease


        def test_clean(managed_model_factory):
            model = managed_model_factory(build, device="cpu", name="clean")
            with model.use() as module:
                module(torch.ones(1, 1024))
            made.append(model)


        def test_the_clean_model_was_unloaded_and_closed():
            (model,) = made
            assert model.state is ModelState.UNLOADED
            assert model.closed
        """
    )
    result = project.runpytest()
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {
        "test_survivor": "failed",
        "test_clean": "passed",
        "test_the_clean_model_was_unloaded_and_closed": "passed",
    }
    result.stdout.fnmatch_lines(
        [
            "test_models.py L.. *",
            "1 managed model(s) did not come back cleanly at the end of the test",
            "*- vramkit models -*",
            "unloaded survivor from cpu in * s: HELD; expected 4.0 MiB, *",
            "  held by: test_models.kept[0]",
            "  freed anyway: 4.0 MiB (stale references now fail loudly)",
        ]
    )


def test_managed_model_factory_unloads_what_the_test_made(
    managed_model_factory: ModelFactory,
) -> None:
    model = managed_model_factory.from_torch(lambda: torch.nn.Linear(8, 8), device="cpu")
    with model.use() as module:
        assert module.weight.device.type == "cpu"
    del module  # a name left bound after the block would hold the module
    assert managed_model_factory.models == (model,)
    assert managed_model_factory.close() == []
    assert model.state is ModelState.UNLOADED
    assert model.closed
    assert managed_model_factory.models == ()


def test_vram_snapshot_reads_now_and_keeps_the_first(vram_snapshot: VramSnapshots) -> None:
    start = vram_snapshot.start
    later = vram_snapshot()
    assert "cpu" in start
    assert set(later) == set(start)
    assert later.monotonic >= start.monotonic
    delta = vram_snapshot.since_start()
    assert set(delta) == set(start)
    assert delta.seconds >= 0


def test_the_live_models_section_lists_each_model_with_its_state(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_live="""
        import pytest
        import torch

        from vramkit import ManagedModel

        resident = []


        def teardown_module():  # runs after the verdict: it cannot hide the leak
            for model in resident:
                model.close()
            resident.clear()


        @pytest.mark.no_vram_leak(tolerance="1MiB")
        def test_leaks_through_a_loaded_model():
            model = ManagedModel.from_torch(
                lambda: torch.nn.Linear(1024, 1024), device="cpu", name="resident"
            )
            model.load()
            resident.append(model)
        """
    )
    result = project.runpytest()
    assert call_reports(result)["test_leaks_through_a_loaded_model"].failed
    result.stdout.fnmatch_lines(
        [
            "leaked 4.0 MiB on cpu (*",
            "  Parameter[1024, 1024] float32 on cpu, 4.0 MiB, requires_grad",
            "managed models alive:",
            "*  'resident' READY on cpu, 4.0 MiB, 0 lease(s)",
        ]
    )


# --------------------------------------------------------------------------- robustness


OWNER_CONFTEST = """
import pytest
from _pytest.runner import runtestprotocol


class Owner:
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        runtestprotocol(item, nextitem=nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    config.pluginmanager.register(Owner(), "owner")  # after vramkit's: runs first
"""


def test_when_another_plugin_owns_the_protocol_a_leak_is_a_teardown_error(
    project: pytest.Pytester,
) -> None:
    project.makeconftest(OWNER_CONFTEST)
    project.makepyfile(test_leak=LEAKY)
    result = project.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "E   *VramLeakError: leaked 32.0 MiB on cpu (live tensors +32.0 MiB, *",
        ]
    )


@pytest.mark.slow
def test_under_xdist_each_worker_checks_its_own_tests(project: pytest.Pytester) -> None:
    project.makepyfile(test_leak_a=LEAKY, test_leak_b=LEAKY)
    result = project.runpytest_subprocess("-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.re_match_lines(
        [
            r".*- vramkit leak -.*",
            r"  Tensor\[33554432\] uint8 on cpu, 32\.0 MiB",
            r"    held by test_leak_[ab]\.cache\[0\]",
        ]
    )
    lines = result.stdout.lines
    assert sum(line.startswith("VRAM LEAK test_leak_") for line in lines) == 2


FUNASR_CONFTEST = """
import contextlib
import io

import pytest

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    import funasr

from vramkit.testing.models import build_funasr_pipeline, synthetic_audio


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    built = build_funasr_pipeline(tmp_path_factory.mktemp("funasr"))
    # FunASR builds some state at its first load and generate: once, outside any test.
    model = funasr.AutoModel(
        model=str(built.asr), device="cpu", disable_update=True, disable_pbar=True, ncpu=1
    )
    model.generate(input=synthetic_audio(1.0))
    return built
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("funasr", "kaldi_native_fbank")),
    reason='needs the "funasr" extra',  # looked up, not imported: the subprocess imports it
)
def test_a_leaked_funasr_model_fails_its_test(project: pytest.Pytester) -> None:
    project.makeconftest(FUNASR_CONFTEST)
    project.makepyfile(
        test_funasr="""
        import funasr
        import pytest

        from vramkit.testing.models import synthetic_audio

        KEPT = []


        @pytest.mark.no_vram_leak(tolerance="0B")
        def test_keeps_the_model(dirs):
            model = funasr.AutoModel(
                model=str(dirs.asr), device="cpu", disable_update=True, disable_pbar=True, ncpu=1
            )
            model.generate(input=synthetic_audio(1.0))
            KEPT.append(model)


        @pytest.mark.no_vram_leak(tolerance="0B")
        def test_a_managed_model_comes_back(dirs, managed_model_factory):
            asr = managed_model_factory.from_funasr(dirs.asr, device="cpu", disable_pbar=True)
            with asr.use() as model:
                assert isinstance(model.generate(input=synthetic_audio(1.0))[0]["text"], str)
        """
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines(
        [
            r"test_funasr\.py L\. .*",
            r"leaked [\d.]+ KiB on cpu \(live tensors \+[\d.]+ KiB, .*\); tolerance 0 B",
            r"  Parameter\[[\d, ]+\] float32 on cpu, [\d.]+ KiB, requires_grad",
            # The chain from the module global is deeper than the search goes for
            # some weights; each names the AutoModel that holds it.
            r"    held by (test_funasr\.KEPT|\.\.\. -> )\[0\] -> AutoModel\.model -> .*",
        ]
    )


# --------------------------------------------------------------------------- real GPUs


@pytest.mark.cuda
def test_a_cuda_leak_fails_the_test_and_a_clean_one_passes(pytester: pytest.Pytester) -> None:
    pytester.makeini(f"[pytest]\n{PLUGINS}vram_device = cuda:0\n")
    pytester.makepyfile(
        test_gpu="""
        import pytest
        import torch

        cache = []


        @pytest.mark.no_vram_leak
        def test_leaks():
            cache.append(torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda:0"))


        @pytest.mark.no_vram_leak
        def test_clean():
            scratch = torch.ones(1024, 1024, device="cuda:0")
            assert float(scratch.sum()) == 1024 * 1024


        @pytest.mark.vram_limit("64MiB")
        def test_over_the_limit():
            scratch = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda:0")
            del scratch
        """
    )
    result = pytester.runpytest()
    outcomes = {name: r.outcome for name, r in call_reports(result).items()}
    assert outcomes == {
        "test_leaks": "failed",
        "test_clean": "passed",
        "test_over_the_limit": "failed",
    }
    result.stdout.fnmatch_lines(
        [
            "leaked 32.0 MiB on cuda:0 (allocated +32.0 MiB, reserved +*, peak *); *",
            "  Tensor[33554432] uint8 on cuda:0, 32.0 MiB",
            "    held by test_gpu.cache[0]",
            "peak 128.0 MiB above the start on cuda:0 exceeds vram_limit 64.0 MiB *",
        ]
    )
