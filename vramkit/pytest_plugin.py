"""The pytest plugin: fail a test that leaks accelerator (or host) memory.

Installed with vramkit and registered through the ``pytest11`` entry point. A
test that does not ask gets nothing: no snapshot, no census, no extra fixture.
A test asks with the ``vram_guard`` fixture or a marker::

    @pytest.mark.no_vram_leak(tolerance="0B", device=None)
    @pytest.mark.vram_limit("2GiB", device=None)

and ``--vram-leak-check`` (ini ``vram_leak_check = true``) asks for every test.

**The judgement** is :func:`vramkit.gpu_session`'s, unchanged: the plugin
enters a :class:`~vramkit.session.GpuSession` and leaves it, and the session
warms the CUDA context, compares the allocator with the driver and re-checks
after cleanups before it calls anything a leak. On a machine without an
accelerator the default device is ``cpu``, where the session judges live CPU
tensors (and, with a process tolerance, the resident set size), so the same
leak fails the same test on a laptop and on a GPU runner.

**The window** a guarded test is measured over opens just before its first
function-scoped fixture is set up (the guard is moved there, after every
session-, module- and class-scoped fixture, so those never count) and closes
when the guard itself is torn down: after every other function-scoped
fixture, before any wider one, so a module's teardown cannot hide its last
test's leak. The values of the finished fixtures, which pytest keeps until
after teardown, are dropped first: memory a fixture gives back (or only
returned) is not a leak, and memory a fixture keeps is one.

**The verdict** is only known after teardown, but it belongs to the test: for
guarded tests the plugin runs pytest's protocol with logging deferred, then
turns the passed ``call`` report into a failure (a ``VRAM LEAK`` or
``VRAM LIMIT`` status, still counted as failed) before any report is logged.
Where another plugin owns the protocol, the failure is raised at teardown
instead (an error, never lost). Tests that fail, skip or error on their own
are not judged: their tracebacks hold their frames, and with them the tensors.

**The peak** of ``vram_limit`` is the growth above the start of the window:
on an accelerator the allocator's ``peak_allocated_bytes`` minus
``allocated_bytes`` at the start; on the host the peak resident set size
(reset at the start) minus the resident set size at the start. Pages of a
CPU tensor that were never written do not show in the resident set.

pytest-xdist runs the plugin in each worker, on that worker's own tests.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pytest

if TYPE_CHECKING:
    import os

    import torch

    from vramkit.devices import DeviceLike
    from vramkit.memory import MemoryDelta, MemorySnapshot
    from vramkit.model import ManagedModel, UnloadReport
    from vramkit.session import GpuSession, SessionReport, SessionRun

__all__ = [
    "Manager",
    "ModelFactory",
    "VramSnapshots",
    "managed_model_factory",
    "vram_guard",
    "vram_snapshot",
]

T = TypeVar("T")

# vramkit's own modules are imported where they are needed: this module is
# loaded by every pytest run in an environment with vramkit installed, and
# must stay cheap to load (most of them import torch).

_GUARD: Final = "vram_guard"
_FACTORY: Final = "managed_model_factory"
_SECTION_LEAK: Final = "vramkit leak"
_SECTION_PEAK: Final = "vramkit peak"
_SECTION_MODELS: Final = "vramkit models"
_STATUS: Final = {
    _SECTION_LEAK: ("L", "VRAM LEAK"),
    _SECTION_MODELS: ("L", "VRAM LEAK"),
    _SECTION_PEAK: ("M", "VRAM LIMIT"),
}
_RESET_SLACK_BYTES: Final = 4 << 20  # peak RSS this far above RSS right after a reset: no reset
_UNLOAD_TIMEOUT_SECONDS: Final = 10.0  # for leases another thread still holds at teardown


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class _Settings:
    """The command line and ini options, checked once per run."""

    leak_check_all: bool
    tolerance_bytes: int
    process_tolerance_bytes: int | None
    device: str | None
    retries: int


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--vram-*`` options and their ini keys."""
    group = parser.getgroup("vramkit", "vramkit: memory leak checks")
    group.addoption(
        "--vram-leak-check",
        action="store_true",
        default=False,
        help="check every test for leaked accelerator (or host) memory (ini: vram_leak_check)",
    )
    group.addoption(
        "--vram-tolerance",
        metavar="SIZE",
        default=None,
        help='allocator growth a checked test may leave behind, such as "16MiB" '
        "(default 16MiB; ini: vram_tolerance)",
    )
    group.addoption(
        "--vram-process-tolerance",
        metavar="SIZE",
        default=None,
        help="also fail when the process as the driver (or the OS, as RSS) sees it grew "
        "beyond this (default: ignore such growth; ini: vram_process_tolerance)",
    )
    group.addoption(
        "--vram-device",
        metavar="DEVICE",
        default=None,
        help="device to check: cuda, cuda:1, mps, xpu, cpu "
        "(default: the first accelerator, else cpu; ini: vram_device)",
    )
    group.addoption(
        "--vram-retries",
        metavar="N",
        default=None,
        help="re-checks (gc and a short pause each) before growth counts as a leak "
        "(default 3; ini: vram_retries)",
    )
    parser.addini(
        "vram_leak_check",
        "check every test for leaked accelerator (or host) memory",
        type="bool",
        default=False,
    )
    parser.addini("vram_tolerance", "allocator growth a checked test may leave", default="16MiB")
    parser.addini(
        "vram_process_tolerance",
        "also fail on process growth (driver view, or RSS) beyond this",
        default="",
    )
    parser.addini(
        "vram_device", "device to check (default: first accelerator, else cpu)", default=""
    )
    parser.addini("vram_retries", "re-checks before growth counts as a leak", default="3")


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and the plugin's manager."""
    for rule in MARKERS.values():
        config.addinivalue_line("markers", rule.line)
    # VramLeakWarning is a ResourceWarning, which Python ignores by default: an
    # "unverified" verdict would pass unseen. Shown as the first (weakest)
    # filter, so the run's own filters (say "error") still decide.
    filters = config.getini("filterwarnings")
    if isinstance(filters, list):
        filters.insert(0, "always::vramkit.errors.VramLeakWarning")
    manager = Manager(config, _read_settings(config))
    config.stash[_MANAGER] = manager
    config.pluginmanager.register(manager, "vramkit_manager")


def _read_settings(config: pytest.Config) -> _Settings:
    from vramkit._units import parse_bytes
    from vramkit.errors import DeviceUnavailableError, InvalidArgumentError

    # Each option's dest is its ini key: the command line wins, then the ini file.
    def value(name: str) -> str:
        given = config.getoption(name)
        return str(given if given is not None else config.getini(name)).strip()

    def fail(name: str, problem: object) -> pytest.UsageError:
        return pytest.UsageError(f"vramkit: --{name.replace('_', '-')} / {name}: {problem}")

    try:
        tolerance = parse_bytes(value("vram_tolerance"), what="tolerance")
    except InvalidArgumentError as exc:
        raise fail("vram_tolerance", exc) from None
    process_text = value("vram_process_tolerance")
    try:
        process = parse_bytes(process_text, what="process tolerance") if process_text else None
    except InvalidArgumentError as exc:
        raise fail("vram_process_tolerance", exc) from None
    device = value("vram_device") or None
    if device is not None:
        from vramkit.devices import resolve_device  # imports torch: only when asked

        try:
            resolve_device(device)
        except (InvalidArgumentError, DeviceUnavailableError) as exc:
            raise fail("vram_device", exc) from None
    retries_text = value("vram_retries")
    if not retries_text.isdigit():
        raise fail("vram_retries", f"expected a whole number, 0 or more; got {retries_text!r}")
    return _Settings(
        leak_check_all=bool(
            config.getoption("vram_leak_check") or config.getini("vram_leak_check")
        ),
        tolerance_bytes=tolerance,
        process_tolerance_bytes=process,
        device=device,
        retries=int(retries_text),
    )


# --------------------------------------------------------------------------- markers


@dataclass(frozen=True, slots=True)
class _LeakSpec:
    tolerance_bytes: int | None  # None: the configured vram_tolerance
    process_tolerance_bytes: int | None
    device: DeviceLike | None


@dataclass(frozen=True, slots=True)
class _LimitSpec:
    limit_bytes: int
    device: DeviceLike | None


def no_vram_leak_args(
    tolerance: int | float | str | None = None,
    *,
    device: DeviceLike | None = None,
    process_tolerance: int | float | str | None = None,
) -> _LeakSpec:
    """Read ``@pytest.mark.no_vram_leak(...)``'s arguments.

    Raises:
        InvalidArgumentError: A size or device that is not one.
    """
    from vramkit._units import parse_bytes

    return _LeakSpec(
        None if tolerance is None else parse_bytes(tolerance, what="tolerance"),
        None
        if process_tolerance is None
        else parse_bytes(process_tolerance, what="process_tolerance"),
        _checked_device(device),
    )


def vram_limit_args(limit: int | float | str, *, device: DeviceLike | None = None) -> _LimitSpec:
    """Read ``@pytest.mark.vram_limit(...)``'s arguments.

    Raises:
        InvalidArgumentError: A size or device that is not one.
    """
    from vramkit._units import parse_bytes

    return _LimitSpec(parse_bytes(limit, what="limit"), _checked_device(device))


def _checked_device(device: DeviceLike | None) -> DeviceLike | None:
    """Reject a malformed or unknown device; a real one this machine lacks is checked at setup."""
    if device is None:
        return None
    from vramkit.devices import resolve_device
    from vramkit.errors import DeviceUnavailableError

    # A GPU test collected on a laptop is skipped at setup, not an error.
    with contextlib.suppress(DeviceUnavailableError):
        resolve_device(device)
    return device


@dataclass(frozen=True, slots=True)
class _MarkerRule:
    name: str
    read: Callable[..., _LeakSpec | _LimitSpec]
    accepted: str
    line: str


MARKERS: Final[Mapping[str, _MarkerRule]] = {
    "no_vram_leak": _MarkerRule(
        "no_vram_leak",
        no_vram_leak_args,
        '@pytest.mark.no_vram_leak, @pytest.mark.no_vram_leak("1MiB"), '
        '@pytest.mark.no_vram_leak(tolerance="0B", device="cuda:0", process_tolerance="64MiB")',
        "no_vram_leak(tolerance=None, *, device=None, process_tolerance=None): fail the test "
        "when memory it allocated on the device is still held after it and its function-scoped "
        "fixtures ended (vramkit; tolerance defaults to vram_tolerance)",
    ),
    "vram_limit": _MarkerRule(
        "vram_limit",
        vram_limit_args,
        '@pytest.mark.vram_limit("2GiB"), @pytest.mark.vram_limit("512MiB", device="cuda:0")',
        "vram_limit(limit, *, device=None): fail the test when its peak memory on the device "
        "rose more than limit above the start (vramkit; allocator peak on accelerators, "
        "peak RSS on the host)",
    ),
}
"""The markers, by name: how to read each one's arguments, and how to write it."""


def _read_marker(item: pytest.Item, name: str) -> _LeakSpec | _LimitSpec | None:
    """The closest ``name`` marker's arguments, or ``None`` without one.

    Raises:
        ValueError: A misused marker; the message names the test and the accepted forms.
    """
    from vramkit.errors import InvalidArgumentError

    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    rule = MARKERS[name]
    arguments = [repr(a) for a in marker.args] + [f"{k}={v!r}" for k, v in marker.kwargs.items()]
    written = f"@pytest.mark.{name}({', '.join(arguments)})"
    try:
        inspect.signature(rule.read).bind(*marker.args, **marker.kwargs)
        return rule.read(*marker.args, **marker.kwargs)
    except InvalidArgumentError as exc:
        problem = str(exc)
    except TypeError as exc:
        problem = f"wrong arguments ({exc})"
    raise ValueError(
        f"vramkit: {item.nodeid}: {written}: {problem}\n  accepted forms: {rule.accepted}"
    )


def _read_markers(item: pytest.Item) -> tuple[_LeakSpec | None, _LimitSpec | None]:
    """Both markers' arguments (``None`` where absent).

    Raises:
        ValueError: A misused marker, or the two naming different devices.
    """
    leak = _read_marker(item, "no_vram_leak")
    limit = _read_marker(item, "vram_limit")
    assert leak is None or isinstance(leak, _LeakSpec)
    assert limit is None or isinstance(limit, _LimitSpec)
    devices = {str(spec.device) for spec in (leak, limit) if spec is not None and spec.device}
    if len(devices) > 1:
        raise ValueError(
            f"vramkit: {item.nodeid}: no_vram_leak and vram_limit name different devices "
            f"({', '.join(sorted(devices))}); a test is checked on one device"
        )
    return leak, limit


# --------------------------------------------------------------------------- per-test state


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a test asked for, decided at collection."""

    leak: _LeakSpec | None
    limit_bytes: int | None
    device: DeviceLike | None
    error: str | None = None  # a marker misused after collection (added by a hook)

    @property
    def measured(self) -> bool:
        return self.leak is not None or self.limit_bytes is not None


@dataclass(frozen=True, slots=True)
class _Failure:
    section: str  # the report section's title, which also picks the status word
    headline: str
    details: str


@dataclass(slots=True)
class _ItemRun:
    """One run of one test (a rerun gets a fresh one)."""

    deferred: bool  # the plugin owns the protocol: failures go into the call report
    session: GpuSession | None = None
    run: SessionRun | None = None
    peak_unmeasured: str | None = None  # why the host peak cannot be judged here
    called: bool = False
    raised: BaseException | None = None
    failures: list[_Failure] = field(default_factory=list)


_MANAGER: Final = pytest.StashKey["Manager"]()
_PLAN: Final = pytest.StashKey[_Plan]()
_RUN: Final = pytest.StashKey[_ItemRun]()
_MISUSED: Final = pytest.StashKey[list[str]]()


class _NotRun(Exception):
    """Stands for a test whose setup failed, so the session records an exception, not a verdict."""


# --------------------------------------------------------------------------- the manager


class Manager:
    """The plugin's state for one pytest run, registered as ``vramkit_manager``.

    It decides at collection which tests are measured, owns the protocol of
    those tests, and turns verdicts into reports. Tests that asked for nothing
    pass through its hooks after one dictionary lookup each.

    Args:
        config: The run's configuration.
        settings: The checked ``--vram-*`` options and ini keys.
    """

    def __init__(self, config: pytest.Config, settings: _Settings) -> None:
        self.config = config
        self.settings = settings

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
                _read_markers(item)
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
            leak, limit = _read_markers(item)
        except ValueError as exc:  # a marker added after collection, by a hook
            return _Plan(None, None, None, error=str(exc))
        if leak is None and (_GUARD in names or self.settings.leak_check_all):
            leak = _LeakSpec(None, None, None)
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

    def _settled(self, leak: _LeakSpec) -> _LeakSpec:
        """``leak`` with the configured tolerances filled in where the marker left them out."""
        return _LeakSpec(
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
        _fold(reports, state.failures)
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
            status = _STATUS.get(title)
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
            plan = _Plan(self._settled(_LeakSpec(None, None, None)), None, self.settings.device)
        from vramkit.devices import resolve_device
        from vramkit.errors import DeviceUnavailableError
        from vramkit.session import GpuSession

        try:
            device = resolve_device(plan.device)
        except DeviceUnavailableError as exc:
            pytest.skip(f"vramkit: cannot check memory here: {exc}")
        leak = plan.leak
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
        state.run = session.__enter__()
        state.session = session
        if plan.limit_bytes is not None and device.kind == "cpu":
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

        unverified: str | None = None
        try:
            session.__exit__(type(exc) if exc is not None else None, exc, None)
        except VramLeakError:
            pass  # the verdict is on the report, judged below
        except VramLeakWarning as warning:
            # The run's warning filters made an "unverified" verdict an error:
            # a failure of the test, like the leak it may be.
            unverified = str(warning).split("\n")[0].removeprefix(f"{item.nodeid}: ")
        finally:
            del exc  # its traceback holds the test's frames
        report = _report_of(run)
        if report is None or report.raised is not None:
            return  # not measured, or the test did not pass: no verdict
        plan = item.stash.get(_PLAN, None)
        if report.verdict == "leak":
            state.failures.append(_leak_failure(report))
        elif unverified is not None:
            state.failures.append(_Failure(_SECTION_LEAK, unverified, _leak_details(report)))
        if plan is not None and plan.limit_bytes is not None:
            if state.peak_unmeasured is not None:
                warnings.warn(
                    pytest.PytestWarning(
                        f"vramkit: vram_limit not judged for {item.nodeid}: {state.peak_unmeasured}"
                    ),
                    stacklevel=1,
                )
            else:
                failure = _limit_failure(report, plan.limit_bytes)
                if failure is not None:
                    state.failures.append(failure)

    def record(self, item: pytest.Item, failure: _Failure) -> bool:
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


def _manager(config: pytest.Config) -> Manager:
    return config.stash[_MANAGER]


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
    from vramkit.memory import snapshot

    reading = snapshot("cpu")["cpu"]
    if reading.process_peak_bytes is None or reading.process_used_bytes is None:
        return "this system does not report a peak resident set size"
    if reading.process_peak_bytes - reading.process_used_bytes > _RESET_SLACK_BYTES:
        return "this system does not let the peak resident set size be reset"
    return None


def _fold(reports: list[pytest.TestReport], failures: list[_Failure]) -> None:
    """Turn a passed call report into the failure the plugin found after teardown."""
    if not failures:
        return
    call = next((r for r in reports if r.when == "call"), None)
    if call is None or not call.passed or hasattr(call, "wasxfail"):
        return
    call.outcome = "failed"
    call.longrepr = "\n".join(f.headline for f in failures)
    # Before the captured output, which can run to pages (FunASR logs every load).
    call.sections[:0] = [(f.section, f.details) for f in failures]


# --------------------------------------------------------------------------- verdicts


def _leak_failure(report: SessionReport) -> _Failure:
    from vramkit._units import format_bytes

    device = report.device
    on_host = report.before[device].allocated_bytes is None
    layers = []
    if report.allocator_growth_bytes is not None:
        label = "live tensors" if on_host else "allocated"
        layers.append(f"{label} {format_bytes(report.allocator_growth_bytes, signed=True)}")
    reserved = report.delta[device].reserved_bytes
    if reserved is not None:
        layers.append(f"reserved {format_bytes(reserved, signed=True)}")
    if report.driver_growth_bytes is not None:
        label = "RSS" if on_host else "driver"
        layers.append(f"{label} {format_bytes(report.driver_growth_bytes, signed=True)}")
    tolerances = f"tolerance {format_bytes(report.tolerance_bytes)}"
    if report.process_tolerance_bytes is not None:
        tolerances += f", process tolerance {format_bytes(report.process_tolerance_bytes)}"
    headline = (
        f"leaked {format_bytes(report.leaked_bytes)} on {device} ({', '.join(layers)}); "
        f"{tolerances}"
    )
    return _Failure(_SECTION_LEAK, headline, _leak_details(report))


def _leak_details(report: SessionReport) -> str:
    from vramkit._units import format_bytes
    from vramkit.session import HeldTensor

    lines = [
        f"measured {report.checks} time(s) after the test and its function-scoped fixtures "
        f"ended (gc, empty_cache and re-checks in between)"
    ]
    census = report.new_tensors
    if census is not None:
        if census:
            lines.append(
                f"tensors on {report.device} that appeared during the test and are still alive, "
                "largest first:"
            )
            held = {h.tensor.storage_key: h for h in report.held}
            for info in census[:10]:
                entry = held.get(info.storage_key) or HeldTensor(info, ())
                lines.extend("  " + line for line in entry.describe().split("\n"))
            if len(census) > 10:
                rest = census[10:]
                lines.append(f"  ... and {len(rest)} more, {format_bytes(rest.total_bytes)}")
        else:
            lines.append(
                f"no new live tensors on {report.device}: the memory is held outside "
                "Python-visible tensors (an extension's allocation, an autograd graph)"
            )
    lines.extend(_model_lines())
    return "\n".join(lines)


def _limit_failure(report: SessionReport, limit: int) -> _Failure | None:
    from vramkit._units import format_bytes

    device = report.device
    start = report.before[device]
    on_host = start.allocated_bytes is None
    base = start.process_used_bytes if on_host else start.allocated_bytes
    if report.peak_bytes is None or base is None:
        return None
    growth = report.peak_bytes - base
    if growth <= limit:
        return None
    layer = "RSS" if on_host else "allocated"
    headline = (
        f"peak {format_bytes(growth)} above the start on {device} exceeds vram_limit "
        f"{format_bytes(limit)} ({layer} {format_bytes(base)} at the start, "
        f"{format_bytes(report.peak_bytes)} at the peak)"
    )
    how = (
        "peak resident set size since the start (reset then) minus the resident set size then"
        if on_host
        else "allocator's peak_allocated_bytes minus allocated_bytes at the start"
    )
    lines = [f"peak growth = {how}", *_model_lines()]
    return _Failure(_SECTION_PEAK, headline, "\n".join(lines))


def _model_lines() -> list[str]:
    from vramkit._units import format_bytes
    from vramkit.model import live_models

    models = live_models()
    lines = ["managed models alive:" if models else "managed models alive: none"]
    for model in models:
        tier = f" ({model.tier})" if model.tier else ""
        lines.append(
            f"  {model.name!r} {model.state}{tier} on {model.device}, "
            f"{format_bytes(model.size_bytes)}, {model.leases} lease(s)"
        )
    return lines


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def vram_guard(request: pytest.FixtureRequest) -> Iterator[SessionRun]:
    """Check that the test leaves no memory behind on the device; yields its session run.

    The check runs after the test and its other function-scoped fixtures have
    ended, before any wider-scoped fixture is torn down; ``run.report`` (a
    :class:`~vramkit.session.SessionReport`) is filled then. Settings come from
    the test's ``no_vram_leak`` marker, else from the ``--vram-*`` options and
    ini keys.
    """
    __tracebackhide__ = True
    manager = _manager(request.config)
    yield manager.start(request.node)
    manager.finish(request.node)


class VramSnapshots:
    """What the ``vram_snapshot`` fixture gives a test: readings on demand, and the first one.

    Attributes:
        start: The snapshot taken when the fixture was set up.
    """

    def __init__(self, device: DeviceLike | None = None) -> None:
        """Take the first snapshot, of ``device`` (``None``: every available device)."""
        from vramkit.memory import snapshot

        self._device = device
        self.start: MemorySnapshot = snapshot(device)

    def __call__(self) -> MemorySnapshot:
        """A new snapshot of the same devices as :attr:`start`."""
        from vramkit.memory import snapshot

        return snapshot(self._device)

    def since_start(self) -> MemoryDelta:
        """What changed since :attr:`start`: ``self() - self.start``."""
        return self() - self.start

    def __repr__(self) -> str:
        return f"<VramSnapshots from {self.start!r}>"


@pytest.fixture
def vram_snapshot() -> VramSnapshots:
    """Memory readings for the test: ``vram_snapshot()`` reads now, ``.start`` is the first."""
    return VramSnapshots()


class ModelFactory:
    """Creates :class:`~vramkit.ManagedModel` objects for one test and unloads them after it.

    What the ``managed_model_factory`` fixture gives a test. Each model is made
    exactly as its constructor would make it; when the test ends every one is
    unloaded, and a model that something still held (or whose lease was never
    returned) fails the test.

    Attributes:
        unload_timeout: Seconds to wait at teardown for leases other threads hold.
    """

    def __init__(self, *, unload_timeout: float = _UNLOAD_TIMEOUT_SECONDS) -> None:
        """Start with no models."""
        self.unload_timeout = unload_timeout
        self._models: list[ManagedModel[Any]] = []

    @property
    def models(self) -> tuple[ManagedModel[Any], ...]:
        """The models created so far, oldest first."""
        return tuple(self._models)

    def __call__(self, loader: Callable[[], T], **options: Any) -> ManagedModel[T]:
        """``ManagedModel(loader, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel(loader, **options))

    def from_torch(
        self, factory: Callable[[], torch.nn.Module], **options: Any
    ) -> ManagedModel[torch.nn.Module]:
        """``ManagedModel.from_torch(factory, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_torch(factory, **options))

    def from_funasr(self, model: str | os.PathLike[str], **options: Any) -> ManagedModel[Any]:
        """``ManagedModel.from_funasr(model, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_funasr(model, **options))

    def from_onnx(self, path: str | os.PathLike[str], **options: Any) -> ManagedModel[Any]:
        """``ManagedModel.from_onnx(path, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_onnx(path, **options))

    def _keep(self, model: ManagedModel[T]) -> ManagedModel[T]:
        self._models.append(model)
        return model

    def close(self) -> list[str]:
        """Unload and close every model, newest first.

        Returns:
            One account per model that did not come back cleanly: held by
            something after unloading, a lease still out, or a failed release.
        """
        from vramkit.errors import ModelBusyError, ModelStateError

        problems: list[str] = []
        models, self._models = self._models, []
        for model in reversed(models):
            if model.closed:
                continue
            report: UnloadReport | None = None
            try:
                report = model.unload(timeout=self.unload_timeout, strict=False)
            except ModelBusyError as exc:
                problems.append(f"{model.name!r} could not be unloaded: {exc}")
                continue
            except ModelStateError as exc:
                problems.append(f"{model.name!r}: {exc}")
                report = getattr(exc, "report", None)
            if report is not None and not report.died:
                problems.append(str(report))
            model.close()
        return problems

    def __repr__(self) -> str:
        return f"<ModelFactory with {len(self._models)} model(s)>"


@pytest.fixture
def managed_model_factory(request: pytest.FixtureRequest) -> Iterator[ModelFactory]:
    """Create ``ManagedModel``s for the test; all are unloaded when it ends.

    A model that survives unloading (something still holds it) or whose lease
    is still out fails the test, with the holders named.
    """
    factory = ModelFactory()
    yield factory
    problems = factory.close()
    if not problems:
        return
    failure = _Failure(
        _SECTION_MODELS,
        f"{len(problems)} managed model(s) did not come back cleanly at the end of the test",
        "\n".join(problems),
    )
    if not _manager(request.config).record(request.node, failure):
        from vramkit.errors import VramLeakError

        raise VramLeakError(f"{failure.headline}\n{failure.details}")
