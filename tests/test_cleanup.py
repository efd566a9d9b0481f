from __future__ import annotations

import gc
import json

import pytest
import torch

import vramkit
from vramkit import CleanupReport, InvalidArgumentError

from .helpers import run_python


def test_cleanup_reports_steps_and_snapshots() -> None:
    report = vramkit.cleanup()
    assert isinstance(report, CleanupReport)
    assert report.steps[0] == "gc"
    assert report.seconds > 0
    assert list(report.before) == list(report.after)
    assert report.freed_bytes("cpu", "allocated") is None  # unknown on cpu
    assert isinstance(report.freed_bytes("cpu", "process"), int)
    assert report.freed_bytes("cpu") == report.freed_bytes("cpu", "process")  # the headline
    with pytest.raises(InvalidArgumentError, match="layer must be 'headline' or one of"):
        report.freed_bytes("cpu", "rss")
    json.dumps(report.to_dict())
    assert "cleanup in" in str(report)


def test_cleanup_collects_reference_cycles_holding_tensors() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self
            self.payload = torch.ones(1024, 1024)

    Node()
    report = vramkit.cleanup("cpu")
    assert report.collected >= 2


def test_cleanup_can_skip_gc_and_trim() -> None:
    report = vramkit.cleanup("cpu", gc_collect=False, trim=False)
    assert report.steps == ()
    assert report.collected == 0
    assert not report.trimmed


def test_cleanup_returns_a_freed_256_mib_tensor_to_the_os() -> None:
    # A fresh interpreter, so other tests' heap does not blur the RSS figure.
    out = run_python(
        """
        import json, torch, vramkit
        base = vramkit.snapshot("cpu")["cpu"].process_used_bytes
        block = torch.ones(256 * 1024**2, dtype=torch.uint8)
        held = vramkit.snapshot("cpu")["cpu"].process_used_bytes
        del block
        report = vramkit.cleanup("cpu")
        after = report.after["cpu"].process_used_bytes
        print(json.dumps({"base": base, "held": held, "after": after,
                          "trimmed": report.trimmed}))
        """
    )
    figures = json.loads(out)
    mib = 1024**2
    assert figures["held"] - figures["base"] >= 250 * mib
    assert figures["after"] - figures["base"] < 16 * mib, figures


def test_a_young_collection_frees_a_cycle_just_dropped_and_says_which_it_ran() -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    class Node:
        def __init__(self) -> None:
            self.me = self
            self.payload = torch.ones(256, 1024)

    gc.disable()  # no automatic collection may free it first, or promote it
    try:
        node = Node()
        storage = StorageWeakRef(node.payload.untyped_storage())
        del node
        assert not storage.expired()  # only a collection frees a cycle
        report = vramkit.cleanup("cpu", generation=1)
    finally:
        gc.enable()
    assert storage.expired()
    assert report.steps[0] == "gc young (1)"
    assert report.collected >= 2


@pytest.mark.parametrize("generation", [3, -1, 1.0, True, "2", None])
def test_a_bad_generation_is_refused_before_anything_runs(generation: object) -> None:
    with pytest.raises(InvalidArgumentError, match="generation must be 0, 1 or 2"):
        vramkit.cleanup("cpu", generation=generation)  # type: ignore[arg-type]
