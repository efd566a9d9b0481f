"""What the pytest plugin adds to each test, on a process with a realistic heap.

Imports funasr and loads the tiny offline VAD + ASR + punctuation pipeline
when funasr is installed (the heap a transcription test suite has: the leak
check's census and gc scale with it), writes a test file with as many
unmarked, ``@no_vram_leak`` and ``@vram_limit`` tests, and runs it in this
process with ``pytest.main``. A timing plugin records each test's wall time
around ``pytest_runtest_protocol`` (setup, call, teardown and reporting); the
table gives, per kind of test, the lowest median of four runs in rotating order.
The unmarked tests run with vramkit's plugin blocked (``-p no:vramkit``) and
installed: the difference is what a test that does not ask for a check pays.
The ``@no_vram_leak`` tests run twice: as they are, and with
``--vram-freeze-heap`` (the heap frozen when the first checked test starts).
Run: ``python benchmarks/bench_plugin.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import statistics
import tempfile
import textwrap
import time
from collections.abc import Generator
from pathlib import Path

import pytest
from _common import fmt_seconds, load_heap, load_line, median_per_call, versions

from vramkit.devices import default_device

TESTS = 30  # of each kind
ROUNDS = 4  # each runs every configuration, in a rotated order
TARGET_GUARDED_SECONDS = 20e-3  # added by @no_vram_leak, on a FunASR-sized heap

TEST_FILE = """
import pytest
import torch


def work():
    return float(torch.ones(256, 256).sum())

{tests}
"""

KINDS = {
    "plain": "",
    "guarded": "@pytest.mark.no_vram_leak\n",
    "limited": '@pytest.mark.vram_limit("1GiB")\n',
}


class Timer:
    """A pytest plugin recording each test's wall time, setup to last report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self.hooks_seconds: float | None = None

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        started = time.perf_counter()
        try:
            return (yield)
        finally:
            self.seconds[item.name] = time.perf_counter() - started
            if self.hooks_seconds is None and item.name.startswith("test_plain"):
                self.hooks_seconds = time_hooks(item)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.failed:
            self.outcomes[report.nodeid.split("::")[-1]] = report.outcome

    def median(self, kind: str) -> float:
        return statistics.median(s for name, s in self.seconds.items() if name.startswith(kind))


def time_hooks(item: pytest.Item) -> float | None:
    """Seconds the plugin's per-test hooks take on ``item`` (a test that asked for nothing)."""
    manager = item.config.pluginmanager.get_plugin("vramkit_manager")
    if manager is None:
        return None
    report = pytest.TestReport(item.nodeid, item.location, {}, "passed", None, "call", [])

    def hooks() -> None:
        manager.pytest_runtest_protocol(item, None)
        call = manager.pytest_runtest_call(item)
        next(call)
        with contextlib.suppress(StopIteration):
            call.send(None)
        manager.pytest_report_teststatus(report, item.config)

    return median_per_call(hooks, calls=20000)


def run(path: Path, *args: str) -> Timer:
    timer = Timer()
    options = ["-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args, str(path)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exit_code = pytest.main(options, plugins=[timer])
    failed = {name: o for name, o in timer.outcomes.items() if o != "passed"}
    if exit_code != pytest.ExitCode.OK or failed:
        raise SystemExit(f"pytest {' '.join(options)} did not pass: {exit_code!r}, {failed}")
    return timer


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        heap, model = load_heap(workdir)
        device = default_device()
        tests = "\n".join(
            f"\n{marker}def test_{kind}_{i:02d}():\n    work()\n"
            for i in range(TESTS)
            for kind, marker in KINDS.items()
        )
        path = Path(workdir) / "test_bench.py"
        path.write_text(textwrap.dedent(TEST_FILE).format(tests=tests), encoding="utf-8")
        print(versions(with_pytest=True))
        print(f"device: {device} · {heap} · {len(gc.get_objects()):,} gc-tracked objects")
        print(load_line())
        print(
            f"method: pytest.main in this process, {TESTS} tests of each kind per run; wall time "
            "of each test's pytest_runtest_protocol (setup, call, teardown, reports); the "
            f"median per run, the lowest of {ROUNDS} runs in rotating order"
        )
        configurations = [
            ("blocked", ("-p", "no:vramkit", "-k", "plain"), "test_plain"),
            ("installed", ("-k", "plain"), "test_plain"),
            ("limited", ("-k", "limited"), "test_limited"),
            ("guarded", ("-k", "guarded"), "test_guarded"),
            ("frozen", ("-k", "guarded", "--vram-freeze-heap"), "test_guarded"),
        ]
        # Each run leaves a little on the heap, so the order rotates between rounds;
        # each configuration's best median is kept: other work on the machine only
        # ever adds time.
        medians: dict[str, list[float]] = {label: [] for label, _, _ in configurations}
        hooks_seconds: float | None = None
        for round_ in range(ROUNDS):
            for label, args, kind in configurations[round_:] + configurations[:round_]:
                gc.collect()
                timer = run(path, *args)
                medians[label].append(timer.median(kind))
                if label == "installed" and timer.hooks_seconds is not None:
                    hooks_seconds = min(hooks_seconds or timer.hooks_seconds, timer.hooks_seconds)
        baseline = min(medians["blocked"])
        rows = [
            ("unmarked test, plugin blocked (-p no:vramkit)", "blocked"),
            ("unmarked test, plugin installed", "installed"),
            ('@pytest.mark.vram_limit("1GiB")', "limited"),
            ("@pytest.mark.no_vram_leak", "guarded"),
            ("@pytest.mark.no_vram_leak, --vram-freeze-heap", "frozen"),
        ]
        print()
        print(f"{'per test':<48} {'median':>10} {'added':>10} {'ratio':>7}   medians of the runs")
        for name, label in rows:
            cost = min(medians[label])
            added = cost - baseline
            sign = "+" if added >= 0 else "-"
            spread = ", ".join(fmt_seconds(m) for m in medians[label])
            print(
                f"{name:<48} {fmt_seconds(cost):>10} {sign + fmt_seconds(abs(added)):>10} "
                f"{cost / baseline:>6.1f}x   {spread}"
            )
        if hooks_seconds is not None:
            print(
                f"\nthe plugin's hooks on a test that asks for nothing, timed directly "
                f"(protocol, call wrapper, test status): {fmt_seconds(hooks_seconds)} per test"
            )
        print()
        for label, how in (("guarded", ""), ("frozen", " with --vram-freeze-heap")):
            added = min(medians[label]) - baseline
            verdict = "meets" if added <= TARGET_GUARDED_SECONDS else "MISSES"
            print(
                f"target: @no_vram_leak{how} adds {fmt_seconds(added)} per test on "
                f"{len(gc.get_objects()):,} objects (target <= "
                f"{fmt_seconds(TARGET_GUARDED_SECONDS)}): {verdict}"
            )
        print(load_line())
        del model


if __name__ == "__main__":
    main()
