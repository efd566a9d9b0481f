"""The plugin's manager: which tests are measured, their protocol, and their sessions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import pytest

from vramkit.pytest_plugin.marks import LeakSpec, read_markers
from vramkit.pytest_plugin.verdicts import (
    STATUS,
    Failure,
    fold,
    leak_failure,
    limit_failure,
    live_worker_pids,
    worker_failure,
)

if TYPE_CHECKING:
    from vramkit.devices import DeviceLike
    from vramkit.session import GpuSession, SessionReport, SessionRun

__all__ = ["MANAGER", "Manager", "Settings", "manager_of"]

# vramkit's own modules are imported where they are needed: this package is
# loaded by every pytest run in an environment with vramkit installed, and
# must stay cheap to load (most of them import torch).

_GUARD: Final = "vram_guard"
_FACTORY: Final = "managed_model_factory"
_RESET_SLACK_BYTES: Final = 4 << 20  # peak RSS this far above RSS right after a reset: no reset


@dataclass(frozen=True, slots=True)
class Settings:
    """The command line and ini options, checked once per run."""

    leak_check_all: bool
    tolerance_bytes: int
    process_tolerance_bytes: int | None
    device: str | None
    retries: int
    freeze_heap: bool = False


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a test asked for, decided at collection."""

    leak: LeakSpec | None
    limit_bytes: int | None
    device: DeviceLike | None
    error: str | None = None  # a marker misused after collection (added by a hook)

    @property
    def measured(self) -> bool:
        return self.leak is not None or self.limit_bytes is not None


@dataclass(slots=True)
class _ItemRun:
    """One run of one test (a rerun gets a fresh one)."""

    deferred: bool  # the plugin owns the protocol: failures go into the call report
    session: GpuSession | None = None
    run: SessionRun | None = None
    peak_unmeasured: str | None = None  # why the host peak cannot be judged here
    called: bool = False
    raised: BaseException | None = None
    failures: list[Failure] = field(default_factory=list)
    workers: frozenset[int] = frozenset()  # isolated models' worker processes at the start


MANAGER: Final = pytest.StashKey["Manager"]()
_PLAN: Final = pytest.StashKey[_Plan]()
_RUN: Final = pytest.StashKey[_ItemRun]()
_MISUSED: Final = pytest.StashKey[list[str]]()


class _NotRun(Exception):
    """Stands for a test whose setup failed, so the session records an exception, not a verdict."""


class Manager:
    """The plugin's state for one pytest run, registered as ``vramkit_manager``.

    It decides at collection which tests are measured, owns the protocol of
    those tests, and turns verdicts into reports. Tests that asked for nothing
    pass through its hooks after one dictionary lookup each.

    Args:
        config: The run's configuration.
        settings: The checked ``--vram-*`` options and ini keys.
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self._froze = False  # by --vram-freeze-heap, thawed when the run ends

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Thaw the heap this run froze: the process may go on (``pytest.main`` in a script)."""
        if self._froze:
            from vramkit._gc import thaw

            thaw()
            self._froze = False

    # -- collection --------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_pycollect_makeitem(
        self, collector: pytest.Module | pytest.Class, name: str, obj: object
    ) -> Generator[None, object, object]:
        """Note each misused marker of the tests a module or class defines."""
        result = yield
        for item in result if isinstance(result, list) else [result]:
            if not isinstance(item, pytest.Function):
                continue
            try:
                read_markers(item)
            except ValueError as exc:
                collector.stash.setdefault(_MISUSED, []).append(str(exc))
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        """Fail the collection of a module or class with misused markers, naming every one."""
        report = yield
        misused = collector.stash.get(_MISUSED, None)
        if misused and report.passed:
            del collector.stash[_MISUSED]
            report.outcome = "failed"
            report.longrepr = "\n".join(misused)
            report.result = []
        return report

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Plan the tests that asked for a check; leave the others untouched."""
        for item in items:
            if not isinstance(item, pytest.Function):
                continue  # doctests and foreign items have no fixtures to order
            plan = self._plan(item)
            if plan is None:
                continue
            item.stash[_PLAN] = plan
            if plan.measured or plan.error is not None:
                _move_guard_first(item)  # the guard's setup reports a late misuse

    def _plan(self, item: pytest.Function) -> _Plan | None:
        names = item.fixturenames
        try:
            leak, limit = read_markers(item)
        except ValueError as exc:  # a marker added after collection, by a hook
            return _Plan(None, None, None, error=str(exc))
        if leak is None and (_GUARD in names or self.settings.leak_check_all):
            leak = LeakSpec(None, None, None)
        if leak is None and limit is None and _FACTORY not in names:
            return None  # a plan without a measurement still tracks the factory's models
        device = (leak.device if leak is not None else None) or (
            limit.device if limit is not None else None
        )
        return _Plan(
            self._settled(leak) if leak is not None else None,
            limit.limit_bytes if limit is not None else None,
            device if device is not None else self.settings.device,
        )

    def _settled(self, leak: LeakSpec) -> LeakSpec:
        """``leak`` with the configured tolerances filled in where the marker left them out."""
        return LeakSpec(
            self.settings.tolerance_bytes if leak.tolerance_bytes is None else leak.tolerance_bytes,
            self.settings.process_tolerance_bytes
            if leak.process_tolerance_bytes is None
            else leak.process_tolerance_bytes,
            leak.device,
        )

    # -- running -----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        """Run a planned test with its reports held back until its verdict is known."""
        if _PLAN not in item.stash:
            return None
        from _pytest.runner import runtestprotocol

        state = _ItemRun(deferred=True)
        item.stash[_RUN] = state
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        try:
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
        finally:
            del item.stash[_RUN]
        fold(reports, state.failures)
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        """Note whether the test body raised: a failed test is not judged."""
        if _RUN not in item.stash:
            return (yield)
        state = item.stash[_RUN]
        state.called = True
        try:
            return (yield)
        except BaseException as exc:
            state.raised = exc
            raise

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(
        self, report: pytest.CollectReport | pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, tuple[str, Mapping[str, bool]]] | None:
        """Give failures this plugin made their own letter and word (still counted as failed)."""
        if report.when != "call" or not report.failed:
            return None
        for title, _ in report.sections:
            status = STATUS.get(title)
            if status is not None:
                letter, word = status
                return "failed", letter, (word, {"red": True})
        return None

    # -- the session of one test ----------------------------------------------------

    def start(self, item: pytest.Item) -> SessionRun:
        """Enter the test's session (from the ``vram_guard`` fixture); once per test run."""
        state = item.stash.get(_RUN, None)
        if state is None:  # another plugin runs the protocol, or the guard came late
            state = item.stash[_RUN] = _ItemRun(deferred=False)
        if state.run is not None:
            return state.run
        plan = item.stash.get(_PLAN, None)
        if plan is not None and plan.error is not None:
            pytest.fail(plan.error, pytrace=False)
        if plan is None or not plan.measured:  # asked for by getfixturevalue: a leak check
            plan = _Plan(self._settled(LeakSpec(None, None, None)), None, self.settings.device)
        from vramkit.devices import resolve_device
        from vramkit.errors import DeviceUnavailableError
        from vramkit.session import GpuSession

        try:
            device = resolve_device(plan.device)
        except DeviceUnavailableError as exc:
            pytest.skip(f"vramkit: cannot check memory here: {exc}")
        leak = plan.leak
        if leak is not None and self.settings.freeze_heap and not self._froze:
            from vramkit.cleaning import freeze_heap

            freeze_heap()  # what the run imported and built so far: walked by no check after
            self._froze = True
        # Without a leak check (vram_limit alone) the tolerance is never used.
        tolerance = 0 if leak is None or leak.tolerance_bytes is None else leak.tolerance_bytes
        session = GpuSession(
            device,
            leak_check="raise" if leak is not None else None,
            tolerance=tolerance,
            # The session re-checks after a cleanup whenever it suspects a leak;
            # an unconditional cleanup on exit would only add a gc.collect().
            cleanup=False,
            retries=self.settings.retries,
            process_tolerance=leak.process_tolerance_bytes if leak is not None else None,
            name=item.nodeid,
        )
        state.workers = live_worker_pids()
        state.run = session.__enter__()
        state.session = session
        if plan.limit_bytes is not None and device.is_host:
            state.peak_unmeasured = _host_peak_problem()
        return state.run

    def finish(self, item: pytest.Item) -> None:
        """Leave the test's session and judge it (from the ``vram_guard`` fixture's teardown).

        Raises:
            VramLeakError: A failure found where another plugin owns the
                protocol, so that it becomes a teardown error instead of being lost.
        """
        __tracebackhide__ = True
        state = item.stash.get(_RUN, None)
        if state is None:
            return
        self._close(item, state)
        if state.deferred:
            return
        del item.stash[_RUN]
        if state.failures:
            from vramkit.errors import VramLeakError

            raise VramLeakError("\n\n".join(f"{f.headline}\n{f.details}" for f in state.failures))

    def _close(self, item: pytest.Item, state: _ItemRun) -> None:
        session, run = state.session, state.run
        if session is None or run is None or run.done:
            return
        _drop_function_fixture_values(item)
        exc = state.raised
        state.raised = None
        if exc is None and not state.called:
            exc = _NotRun("the test did not run to its end; no verdict")
        from vramkit.errors import VramLeakError, VramLeakWarning

        unverified = False
        try:
            session.__exit__(type(exc) if exc is not None else None, exc, None)
        except VramLeakError:
            pass  # the verdict is on the report, judged below
        except VramLeakWarning:
            # The run's warning filters made an "unverified" verdict an error:
            # a failure of the test, like the leak it may be.
            unverified = True
        finally:
            del exc  # its traceback holds the test's frames
        report = _report_of(run)
        if report is None or report.raised is not None:
            return  # not measured, or the test did not pass: no verdict
        plan = item.stash.get(_PLAN, None)
        if report.verdict == "leak" or unverified:
            state.failures.append(leak_failure(report))
        if plan is not None and plan.leak is not None:
            left = worker_failure(state.workers)
            if left is not None:
                state.failures.append(left)
        if plan is not None and plan.limit_bytes is not None:
            if state.peak_unmeasured is not None:
                warnings.warn(
                    pytest.PytestWarning(
                        f"vramkit: vram_limit not judged for {item.nodeid}: {state.peak_unmeasured}"
                    ),
                    stacklevel=1,
                )
            else:
                failure = limit_failure(report, plan.limit_bytes)
                if failure is not None:
                    state.failures.append(failure)

    def record(self, item: pytest.Item, failure: Failure) -> bool:
        """Add a failure found by a fixture to the test's verdict.

        Returns:
            ``False`` when the plugin does not own this test's protocol: the
            fixture must raise the failure itself.
        """
        state = item.stash.get(_RUN, None)
        if state is None or not state.deferred:
            return False
        state.failures.append(failure)
        return True


def _drop_function_fixture_values(item: pytest.Item) -> None:
    """Forget the values of function-scoped fixtures, which pytest keeps until after teardown.

    The guard is torn down after every other function-scoped fixture, so
    those are finished: a tensor one of them returned is not the test's leak.
    """
    funcargs = getattr(item, "funcargs", None)
    if not isinstance(funcargs, dict):
        return
    function_scoped = _function_scoped(item)
    for name in list(funcargs):
        if function_scoped is None or function_scoped(name):
            del funcargs[name]


def _function_scoped(item: pytest.Item) -> Callable[[str], bool] | None:
    """Whether a fixture of ``item`` is function-scoped (one without a definition is).

    ``None`` when pytest's fixture definitions cannot be read at all.
    """
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", None)
    if not isinstance(definitions, Mapping):
        return None
    return lambda name: not definitions.get(name) or definitions[name][-1].scope == "function"


def _report_of(run: SessionRun) -> SessionReport | None:
    return run.report if run.done else None


def manager_of(config: pytest.Config) -> Manager:
    """The run's manager, registered by ``pytest_configure``."""
    return config.stash[MANAGER]


def _move_guard_first(item: pytest.Function) -> None:
    """Put ``vram_guard`` before every function-scoped fixture and after all wider ones.

    pytest sets fixtures up in this list's order (widest scope first) and tears
    function-scoped ones down in reverse, so the guard's window spans every
    function-scoped fixture and no session-, module- or class-scoped one.
    """
    names = [name for name in item.fixturenames if name != _GUARD]
    function_scoped = _function_scoped(item)
    position = len(names)  # unknown scopes: last, so nothing wider can count
    if function_scoped is not None:
        position = next((i for i, name in enumerate(names) if function_scoped(name)), position)
    names.insert(position, _GUARD)
    # A new list: parametrized siblings share the old one, and may not ask for the guard.
    item.fixturenames = names


def _host_peak_problem() -> str | None:
    """Why the host's peak RSS since the session's reset cannot be read here, if it cannot."""
    from vramkit.devices import Device

    reading = Device("cpu").read()
    if reading.process_peak_bytes is None or reading.process_used_bytes is None:
        return "this system does not report a peak resident set size"
    if reading.process_peak_bytes - reading.process_used_bytes > _RESET_SLACK_BYTES:
        return "this system does not let the peak resident set size be reset"
    return None
