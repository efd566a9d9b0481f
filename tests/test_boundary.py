"""The heap's boundary: a leak-checked block freezes what came before it, walks what it made.

Real CPU tensors, real collections and real ``gc.freeze()``: the frozen state is
read from the interpreter (``gc.get_freeze_count``), deaths from weak references
to storages, leaks from the session's verdict.
"""

from __future__ import annotations

import gc
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import vramkit
from vramkit.errors import VramLeakError, VramLeakWarning
from vramkit.session import GpuSession, gpu_session

MIB = 1 << 20

# Where the leaks live: module globals, made before any block, so frozen by it.
_HELD: list[Any] = []
_OLD = torch.zeros(8 * MIB, dtype=torch.uint8)  # a tensor from before every block


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """Every test starts and ends on a heap nobody froze."""
    from vramkit import _gc

    _gc.thaw()
    yield
    _HELD.clear()
    assert _gc._current is None, "a block left the boundary behind"
    _gc.thaw()


LEAKED = r"leaked 32\.0 MiB on cpu"


def _frozen() -> bool:
    return gc.get_freeze_count() > 0


def _leak() -> None:
    _HELD.append(torch.empty(32 * MIB, dtype=torch.uint8))


def test_a_leak_checked_block_freezes_the_heap_and_thaws_it_after() -> None:
    with gpu_session("cpu") as s:
        inside = _frozen()
        scratch = torch.ones(MIB)
        del scratch
    assert inside
    assert not _frozen()
    assert s.report.verdict == "clean"


def test_a_block_without_a_leak_check_leaves_the_heap_alone() -> None:
    with gpu_session("cpu", leak_check=None):
        inside = _frozen()
    assert not inside


def test_a_leak_into_an_old_holder_is_caught_and_the_holder_named() -> None:
    # The holder (_HELD) is from before the block: frozen, yet named.
    with pytest.raises(VramLeakError, match=LEAKED) as info, gpu_session("cpu", retries=0):
        _leak()
    assert re.search(r"held by (tests\.)?test_boundary\._HELD\[0\]$", str(info.value))
    assert not _frozen()


def test_a_view_of_a_storage_from_before_the_block_is_not_new_memory() -> None:
    # No tolerance: the census must tell the view apart to call the block clean.
    with gpu_session("cpu", tolerance=0, retries=0) as s:
        _HELD.append(_OLD[: 4 * MIB])  # a tensor made in the block, on an old storage
    assert s.report.verdict == "clean"
    assert s.report.new_tensors is not None and len(s.report.new_tensors) == 0


def test_a_view_and_a_leak_together_count_only_the_leak() -> None:
    def view_and_leak() -> None:
        _HELD.append(_OLD[:MIB])
        _HELD.append(torch.empty(2 * MIB, dtype=torch.uint8))

    leaked = r"leaked 2\.0 MiB on cpu"
    with pytest.raises(VramLeakError, match=leaked), gpu_session("cpu", tolerance=0, retries=0):
        view_and_leak()


def test_a_full_cleanup_in_the_block_collects_cycles_from_before_it() -> None:
    # Frozen objects are skipped by a plain collection; vramkit's cleanup
    # thaws around its own, so a model dropped in the block really goes.
    node: dict[str, Any] = {"payload": torch.empty(16 * MIB, dtype=torch.uint8)}
    node["self"] = node
    storage = StorageWeakRef(node["payload"].untyped_storage())
    with gpu_session("cpu") as s:
        del node
        gc.collect()
        survived_plain = not storage.expired()
        vramkit.cleanup("cpu")
        died_in_cleanup = storage.expired()
        still_frozen = _frozen()
    assert survived_plain  # the boundary is real: the collector skipped it
    assert died_in_cleanup
    assert still_frozen  # and it held across the cleanup
    assert s.report.verdict == "clean"


def test_a_leak_made_before_a_cleanup_in_the_block_is_still_caught() -> None:
    # The cleanup freezes the block's objects with the rest when it is done;
    # the boundary remembers them, so the census at the end still sees them.
    def leak_then_clean() -> None:
        _leak()
        vramkit.cleanup("cpu")

    with pytest.raises(VramLeakError, match=LEAKED) as info, gpu_session("cpu", retries=0):
        leak_then_clean()
    assert re.search(r"held by (tests\.)?test_boundary\._HELD\[0\]$", str(info.value))


def test_a_leak_made_before_a_holder_search_in_the_block_is_still_caught() -> None:
    # A holder search thaws and freezes again: the same memory of the block's objects.
    from vramkit.referrers import find_holders

    searched: list[bool] = []

    def leak_then_search() -> None:
        _leak()
        searched.append(bool(find_holders([_HELD[0]])) and _frozen())

    with pytest.raises(VramLeakError, match=LEAKED), gpu_session("cpu", retries=0):
        leak_then_search()
    assert searched == [True]  # the old holder found, the boundary kept


def _linear_in_a_cycle() -> torch.nn.Module:
    module = torch.nn.Linear(512, 512)
    module.me = [module]  # only a collection frees it
    return module


def test_unloading_a_model_from_before_the_block_frees_it_inside() -> None:
    model = vramkit.ManagedModel.from_torch(_linear_in_a_cycle, device="cpu", name="old")
    with model.use() as module:
        storage = StorageWeakRef(module.weight.untyped_storage())
    del module
    with gpu_session("cpu") as s:
        report = model.unload()
        died = storage.expired()
    assert report.ok and report.died
    assert died
    assert s.report.verdict == "clean"


def test_gc_freeze_inside_the_block_makes_the_check_say_it_could_not_tell() -> None:
    def leak_then_freeze() -> None:
        _leak()
        gc.freeze()

    unsure = "frozen or thawed while the block ran"
    with pytest.warns(VramLeakWarning, match=unsure), gpu_session("cpu") as s:
        leak_then_freeze()
    assert s.report.verdict == "unverified"
    assert s.report.new_tensors is None
    assert s.report.note is not None and "gc.freeze()" in s.report.note
    assert s.report.to_dict()["note"] == s.report.note
    assert _frozen()  # whoever froze owns the freeze now


def test_gc_unfreeze_inside_the_block_makes_the_check_say_it_could_not_tell() -> None:
    unsure = "could not check cpu for leaks"
    with pytest.warns(VramLeakWarning, match=unsure), gpu_session("cpu") as s:
        gc.unfreeze()
    assert s.report.verdict == "unverified"
    assert not _frozen()


def test_freeze_heap_inside_the_block_stays_frozen_and_the_check_still_works() -> None:
    def leak_then_freeze_heap() -> None:
        _leak()
        vramkit.freeze_heap()

    with pytest.raises(VramLeakError, match=LEAKED), gpu_session("cpu", retries=0):
        leak_then_freeze_heap()
    assert _frozen()


def test_a_heap_frozen_before_the_block_is_left_frozen_and_still_checked() -> None:
    vramkit.freeze_heap()
    frozen_before = gc.get_freeze_count()
    with pytest.raises(VramLeakError, match=LEAKED), gpu_session("cpu", retries=0):
        _leak()
    assert gc.get_freeze_count() >= frozen_before


def test_nested_blocks_share_the_boundary_and_the_outer_one_thaws() -> None:
    outer = gpu_session("cpu", leak_check="warn", retries=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with outer as o:
            with pytest.raises(VramLeakError, match=LEAKED), gpu_session("cpu", retries=0):
                _leak()
            between = _frozen()
    assert between
    assert not _frozen()
    assert o.report.verdict == "leak" and o.report.leaked_bytes == 32 * MIB
    assert any(issubclass(w.category, VramLeakWarning) for w in seen)


def test_threads_in_blocks_at_once_each_get_their_own_verdict() -> None:
    barrier = threading.Barrier(2)
    verdicts: dict[str, str] = {}
    errors: list[BaseException] = []

    def clean() -> None:
        barrier.wait()
        scratch = torch.ones(MIB)
        del scratch
        barrier.wait()

    def leaky() -> None:
        barrier.wait()
        _leak()
        barrier.wait()

    runs = [
        _judged("clean", gpu_session("cpu", leak_check="warn"), clean, verdicts, errors),
        _judged("leaky", gpu_session("cpu", leak_check="warn", retries=0), leaky, verdicts, errors),
    ]
    threads = [threading.Thread(target=run) for run in runs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VramLeakWarning)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    # The clean block ran while the other leaked: it sees the other's tensor
    # too, as a census of the whole heap would. The leaky one is a leak.
    assert verdicts["leaky"] == "leak"
    assert set(verdicts) == {"clean", "leaky"}
    assert not _frozen()


def test_a_block_that_raises_still_thaws() -> None:
    with pytest.raises(RuntimeError, match="boom"), gpu_session("cpu"):
        raise RuntimeError("boom")
    assert not _frozen()


def test_a_clean_block_walks_only_what_it_made() -> None:
    # The point of the boundary: each walk is of the block's objects. Counted
    # as the objects the census's walks see, not as time.
    seen: list[int] = []
    real = gc.get_referrers

    def counting(*classes: Any) -> list[Any]:
        found = real(*classes)
        seen.append(len(gc.get_objects()))
        return found

    gc.get_referrers = counting  # type: ignore[assignment]
    try:
        with gpu_session("cpu"):
            pass
    finally:
        gc.get_referrers = real  # type: ignore[assignment]
    everything = len(gc.get_objects())
    assert len(seen) == 2  # the baseline's walk and the check's
    assert max(seen) < everything / 10


def test_a_heap_thawed_by_hand_after_freeze_heap_gets_the_boundary_back() -> None:
    vramkit.freeze_heap()
    gc.unfreeze()  # undone by hand: vramkit's record of the frozen heap is stale
    with gpu_session("cpu"):
        first = _frozen()  # not sure what is frozen: no boundary; the census notices
    with gpu_session("cpu"):
        second = _frozen()
    assert not first
    assert second


def _judged(
    name: str,
    session: GpuSession,
    body: Callable[[], object],
    verdicts: dict[str, str],
    errors: list[BaseException],
) -> Callable[[], None]:
    """A thread's target: ``body`` inside ``session``, its verdict kept under ``name``."""

    def run() -> None:
        try:
            with session as s:
                body()
            verdicts[name] = s.report.verdict
        except BaseException as exc:
            errors.append(exc)

    return run


class _WaitsWhenCollected:
    """Garbage in a cycle whose finalizer blocks until released: a collection that pauses."""

    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        self.me = self
        self.started = started
        self.release = release

    def __del__(self) -> None:
        self.started.set()
        self.release.wait(30)


def test_a_block_in_another_thread_runs_while_a_collection_has_the_heap_thawed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # vramkit's collection inside a block thaws the heap and runs finalizers
    # without holding anything other blocks wait for. Here a finalizer waits
    # for the other block to end: that block waits its bound for the heap to
    # freeze again, then walks the whole heap and judges right; nothing hangs.
    from vramkit import _gc

    monkeypatch.setattr(_gc, "THAW_WAIT_SECONDS", 0.2)
    started, release = threading.Event(), threading.Event()
    verdicts: dict[str, str] = {}
    errors: list[BaseException] = []

    def collecting() -> None:
        _WaitsWhenCollected(started, release)  # garbage only a collection frees
        vramkit.cleanup("cpu")

    session = gpu_session("cpu", leak_check="warn", retries=0)
    first = threading.Thread(
        target=_judged("collecting", gpu_session("cpu"), collecting, verdicts, errors)
    )
    first.start()
    try:
        assert started.wait(30), "the collection never reached the finalizer"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VramLeakWarning)
            second = threading.Thread(target=_judged("leaking", session, _leak, verdicts, errors))
            second.start()
            second.join(30)
            assert not second.is_alive(), "a block waited for a collection in another thread"
    finally:
        release.set()
        first.join(30)
    assert errors == []
    assert verdicts == {"leaking": "leak", "collecting": "clean"}
    assert not _frozen()
