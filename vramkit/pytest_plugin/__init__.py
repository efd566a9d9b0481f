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

This package holds the hooks and options; :mod:`~vramkit.pytest_plugin.marks`
reads the markers, :mod:`~vramkit.pytest_plugin.manager` plans and runs the
measured tests, :mod:`~vramkit.pytest_plugin.verdicts` words their failures,
and :mod:`~vramkit.pytest_plugin.fixtures` holds the fixtures.
"""

from __future__ import annotations

import pytest

from vramkit.pytest_plugin.fixtures import (
    ModelFactory,
    VramSnapshots,
    managed_model_factory,
    vram_guard,
    vram_snapshot,
)
from vramkit.pytest_plugin.manager import MANAGER, Manager, Settings
from vramkit.pytest_plugin.marks import MARKERS
from vramkit.pytest_plugin.marks import no_vram_leak_args as no_vram_leak_args
from vramkit.pytest_plugin.marks import vram_limit_args as vram_limit_args

__all__ = [
    "Manager",
    "ModelFactory",
    "VramSnapshots",
    "managed_model_factory",
    "vram_guard",
    "vram_snapshot",
]


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
    group.addoption(
        "--vram-freeze-heap",
        action="store_true",
        default=None,
        help="freeze the heap (vramkit.freeze_heap) when the first checked test starts, so "
        "each check walks only what was made since (ini: vram_freeze_heap)",
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
    parser.addini(
        "vram_freeze_heap",
        "freeze the heap when the first checked test starts (checks walk only what is newer)",
        type="bool",
        default=False,
    )


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
    config.stash[MANAGER] = manager
    config.pluginmanager.register(manager, "vramkit_manager")


def _read_settings(config: pytest.Config) -> Settings:
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
    return Settings(
        leak_check_all=bool(
            config.getoption("vram_leak_check") or config.getini("vram_leak_check")
        ),
        tolerance_bytes=tolerance,
        process_tolerance_bytes=process,
        device=device,
        retries=int(retries_text),
        freeze_heap=bool(config.getoption("vram_freeze_heap") or config.getini("vram_freeze_heap")),
    )
