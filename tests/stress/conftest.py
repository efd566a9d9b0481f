"""Reliability suite: concurrency, faults, bad input, soak and process exit.

Every test here is marked ``stress``. By default they run short (CI runs them
in a few minutes); ``VRAMKIT_STRESS=long`` runs the long versions by hand.

A test records what it did through the ``reliability`` fixture: the load it
applied, the faults it injected, the bad inputs it tried, what was lost (the
goal is nothing) and its figures. When ``VRAMKIT_RELIABILITY_OUT`` names a file,
the records are appended there as JSON lines; ``scripts/reliability_report.py``
runs the suite that way and regenerates ``docs/reliability.md`` from them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

from ..helpers import LONG, scale

__all__ = ["LONG", "Record", "scale"]


@dataclass
class Record:
    """One test's line in docs/reliability.md."""

    test: str
    area: str = ""
    load: str = ""
    faults: str = "none"
    bad_inputs: str = "none"
    lost: str = "nothing"
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # a sentence under the figures: what a surprising figure means
    seconds: float = 0.0
    mode: str = "long" if LONG else "short"
    outcome: str = "passed"


_lock = threading.Lock()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/stress" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.stress)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome


_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Record]:
    record = Record(test=request.node.name)
    started = time.perf_counter()
    yield record
    record.seconds = round(time.perf_counter() - started, 2)
    record.outcome = request.node.stash.get(_OUTCOME, "error")
    path = os.environ.get("VRAMKIT_RELIABILITY_OUT")
    if path:
        with _lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record), default=str) + "\n")
