"""The Gradio memory panel, without a browser: what its pages show and what its buttons do.

The browser tests (tests/test_webui.py) press the same buttons in Chromium;
these check the pieces on real pools of real torch models, in seconds.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch

import vramkit
from vramkit import Controls, ModelState
from vramkit.controls import OperationLog, live_watches, memory_line
from vramkit.testing.models import TinyMLP

gr = pytest.importorskip("gradio")
panel_module = pytest.importorskip("vramkit.integrations.gradio")
memory_panel = panel_module.memory_panel
Panel = panel_module._Panel


T = TypeVar("T")


def _in_a_running_loop(build: Callable[[], T]) -> T:
    """Build Gradio objects where an event loop runs.

    Outside one, each Blocks makes new event loops for its locks and never
    closes them; their ResourceWarnings would surface in whichever later test
    collects garbage.
    """

    async def run() -> T:
        return build()

    return asyncio.run(run())


@pytest.fixture
def pool() -> Iterator[vramkit.ModelPool]:
    pool = vramkit.ModelPool("cpu", budget="64MiB", headroom=0, name="panel-test")
    pool.register("asr", lambda: TinyMLP(512), size_hint="4MiB")
    pool.register("llm", lambda: TinyMLP(256), size_hint="1MiB")
    yield pool
    pool.close()


@pytest.fixture
def panel(pool: vramkit.ModelPool) -> Panel:
    return Panel(Controls(pool), log_rows=5)


def _rows(table: str) -> dict[str, dict[str, str]]:
    """``{model: {"state": ..., "leases": ...}}`` from the model table's data attributes."""
    found = re.findall(r'<tr data-model="([^"]+)" data-state="([^"]+)" data-leases="(\d+)"', table)
    return {name: {"state": state, "leases": leases} for name, state, leases in found}


def _charged(memory: str, pool: str) -> int:
    match = re.search(rf'data-pool="{pool}" data-charged-bytes="(\d+)"', memory)
    assert match, memory
    return int(match.group(1))


class _Held:
    """A lease on a pool's model, held by a named thread until released."""

    def __init__(self, pool: vramkit.ModelPool, name: str) -> None:
        self._entered, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(
            target=self._hold, args=(pool, name), name="transcription-7", daemon=True
        )

    def _hold(self, pool: vramkit.ModelPool, name: str) -> None:
        with pool.use(name):
            self._entered.set()
            self._release.wait(60)

    def __enter__(self) -> _Held:
        self._thread.start()
        assert self._entered.wait(60), "the holder never got its lease"
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(60)


# ---------------------------------------------------------------------- building


def test_the_panel_drops_into_a_tab_of_an_existing_app(pool: vramkit.ModelPool) -> None:
    def build() -> tuple[Any, Any]:
        with gr.Blocks() as demo:
            with gr.Tab("Transcribe"):
                gr.Textbox(label="Transcript")
            with gr.Tab("Memory"):
                panel = memory_panel(pool, refresh=1.0)
        return demo, panel

    demo, panel = _in_a_running_loop(build)
    assert isinstance(panel, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"vramkit-memory", "vramkit-models", "vramkit-result", "vramkit-log"} <= ids
    assert any(isinstance(block, gr.Timer) for block in demo.blocks.values())


def test_a_panel_built_alone_can_be_rendered_into_an_app_later(pool: vramkit.ModelPool) -> None:
    def build() -> Any:
        panel = memory_panel(pool, refresh=None, title=None)
        with gr.Blocks() as demo, gr.Accordion("Memory"):
            panel.render()
        return demo

    demo = _in_a_running_loop(build)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "vramkit-models" in ids
    assert not any(isinstance(block, gr.Timer) for block in demo.blocks.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"refresh": 0}, "refresh must be seconds > 0"),
        ({"refresh": "2s"}, "refresh must be seconds > 0"),
        ({"log_rows": 0}, "log_rows must be a whole number"),
        ({"title": 3}, "title must be a string"),
        ({"controls": "nope"}, "controls must be a vramkit.Controls"),
    ],
)
def test_bad_arguments_fail_at_the_call(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(vramkit.InvalidArgumentError, match=message):
        memory_panel(**kwargs)


def test_controls_and_targets_are_exclusive(pool: vramkit.ModelPool) -> None:
    with pytest.raises(vramkit.InvalidArgumentError, match="either controls= or pools"):
        memory_panel(pool, controls=Controls(pool))
    with pytest.raises(vramkit.InvalidArgumentError, match="ModelPool and ManagedModel"):
        memory_panel("asr")


# ---------------------------------------------------------------------- what a page shows


def test_the_views_show_the_memory_line_the_pool_and_every_model(
    panel: Panel, pool: vramkit.ModelPool
) -> None:
    with pool.use("asr") as model:
        model(torch.ones(1, 512))
    memory, models, log, watch, shape = panel.views()
    line = memory_line(vramkit.snapshot("cpu")["cpu"])
    assert line.split(":")[0] in memory  # "RAM": the figures move between two readings
    assert re.search(r"RAM: [\d.]+ / [\d.]+ GiB \(\d+%\)", memory)
    assert _charged(memory, "panel-test") == pool.status().charged_bytes > 0
    assert _rows(models) == {
        "asr": {"state": "READY", "leases": "0"},
        "llm": {"state": "UNLOADED", "leases": "0"},
    }
    assert "no operations yet" in log
    assert "no watch running" in watch
    assert shape["models"] == [["asr", "cpu"], ["llm", "cpu"]]


def test_buttons_that_do_nothing_on_the_device_are_disabled_with_the_reason(
    panel: Panel,
) -> None:
    shape = panel.views()[4]
    reasons = shape["reasons"]["cpu"]
    assert reasons["clear_cache"] == Controls().capabilities("cpu")["clear_cache"]
    assert "host RAM" in reasons["offload_cpu"]
    assert reasons["unload"] is None
    assert reasons["offload_disk"] is None
    assert panel_module._all_devices_say(shape["reasons"], "clear_cache") == reasons["clear_cache"]
    assert panel_module._all_devices_say(shape["reasons"], "free") is None


def test_names_are_escaped_in_every_view() -> None:
    pool = vramkit.ModelPool("cpu", budget="8MiB", headroom=0, name="<b>pool</b>")
    try:
        pool.register("<script>x</script>", lambda: TinyMLP(16))
        memory, models, *_ = Panel(Controls(pool), log_rows=5).views()
    finally:
        pool.close()
    assert "<script>" not in models
    assert "&lt;script&gt;x&lt;/script&gt;" in models
    assert "<b>pool</b>" not in memory


def test_models_of_the_same_name_in_two_pools_are_keyed_by_pool() -> None:
    first = vramkit.ModelPool("cpu", budget="8MiB", headroom=0, name="one")
    second = vramkit.ModelPool("cpu", budget="8MiB", headroom=0, name="two")
    try:
        first.register("asr", lambda: TinyMLP(16))
        second.register("asr", lambda: TinyMLP(16))
        panel = Panel(Controls(first, second), log_rows=5)
        assert panel.views()[4]["models"] == [["one/asr", "cpu"], ["two/asr", "cpu"]]
        assert panel.run("wake", "two/asr", "op").outcome == "ok"
        assert second["asr"].state is ModelState.READY
        assert first["asr"].state is ModelState.UNLOADED
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------- what the buttons do


def test_unload_gives_memory_back_and_the_log_says_who_did_it(
    panel: Panel, pool: vramkit.ModelPool
) -> None:
    assert panel.run("wake", "asr", "alice").outcome == "ok"
    before = _charged(panel.views()[0], "panel-test")
    operation = panel.run("unload", "asr", "alice")
    memory, models, log, *_ = panel.views()
    assert operation.outcome == "ok"
    assert panel_module._feedback(operation).startswith("✅ unloaded asr")
    assert pool["asr"].state is ModelState.UNLOADED
    assert _rows(models)["asr"]["state"] == "UNLOADED"
    assert before > 0
    assert _charged(memory, "panel-test") == before - (pool["asr"].size_bytes or 0) == 0
    assert log.index(">unload<") < log.index(">wake<")  # newest first
    assert ">alice<" in log


def test_unload_of_a_model_in_use_names_the_holder_and_does_nothing(
    panel: Panel, pool: vramkit.ModelPool
) -> None:
    with _Held(pool, "asr"):
        operation = panel.run("unload", "asr", "bob")
        text = panel_module._feedback(operation)
        models = panel.views()[1]
        assert operation.outcome == "busy"
        assert text.startswith("⏳")
        assert "transcription-7" in text
        assert text.endswith("(nothing was done)")
        assert pool["asr"].state is ModelState.READY
        assert _rows(models)["asr"] == {"state": "READY", "leases": "1"}
    assert pool["asr"].state is ModelState.READY  # the lease ended normally


def test_every_button_runs_its_operation_through_the_controls(
    panel: Panel, pool: vramkit.ModelPool
) -> None:
    outcomes = [
        (action, panel.run(action, model, "carol").outcome)
        for action, model in [
            ("wake", "asr"),
            ("offload_disk", "asr"),
            ("wake", "asr"),
            ("offload_cpu", "asr"),
            ("free", None),
            ("clear_cache", None),
            ("unload", "nope"),
        ]
    ]
    assert outcomes == [
        ("wake", "ok"),
        ("offload_disk", "ok"),
        ("wake", "ok"),
        ("offload_cpu", "unsupported"),
        ("free", "ok"),
        ("clear_cache", "unsupported"),
        ("unload", "not_found"),
    ]
    assert [op.caller for op in panel.controls.log] == ["carol"] * len(outcomes)
    with pytest.raises(vramkit.InvalidArgumentError, match="unknown action"):
        panel.run("explode", "asr", None)


def test_the_panel_and_other_front_ends_share_one_log_in_one_format(
    pool: vramkit.ModelPool,
) -> None:
    shared = OperationLog()
    controls = Controls(pool, log=shared)
    panel = Panel(controls, log_rows=5)
    panel.run("wake", "llm", "web-user")
    controls.unload("llm", caller="10.0.0.9")  # what the HTTP API does for a request
    assert [op.caller for op in shared] == ["web-user", "10.0.0.9"]
    log = panel.views()[2]
    for record in shared.to_list():
        assert f">{record['time'].replace('T', ' ')}<" in log
        assert f">{record['caller']}<" in log


def test_the_operator_is_the_login_name_else_the_client_address() -> None:
    assert panel_module._operator(gr.Request(username="alice")) == "alice"
    request = gr.Request(client={"host": "192.0.2.7", "port": 5000})
    assert panel_module._operator(request) == "192.0.2.7"
    assert panel_module._operator(None) is None


# ---------------------------------------------------------------------- alerts and timed cleanup


def test_the_watch_controls_start_replace_and_stop_one_watch(panel: Panel) -> None:
    try:
        said = panel.start_watch(90, 5, "Free idle models")
        assert said == "✅ watching: alert over 90%; free idle models every 5 min"
        (running,) = [w for w in live_watches() if w.name == "memory panel"]
        assert running.state()["threshold"] == 0.9
        assert running.state()["every_seconds"] == 300
        assert "memory panel" in panel.views()[3]
        panel.start_watch(95, 0, "Clear cache")  # replaces the first
        assert not running.running
        (replaced,) = [w for w in live_watches() if w.name == "memory panel"]
        assert replaced.state()["every_seconds"] is None
        assert panel.stop_watch() == "✅ watch stopped"
        assert not replaced.running
        assert panel.stop_watch().startswith("💤")
        assert panel.start_watch(0, 0, "Clear cache").startswith("💤")
        assert "no watch running" in panel.views()[3]
    finally:
        panel.stop_watch()


def test_a_timed_clear_cache_on_cpu_says_why_it_does_not_run(panel: Panel) -> None:
    try:
        said = panel.start_watch(None, 1, "Clear cache")
        assert said.startswith("✅ watching: no timed cleanup: cpu has no allocator cache")
        assert "no timed cleanup" in panel.views()[3]
    finally:
        panel.stop_watch()


def test_an_alerting_device_is_marked_on_its_memory_line(panel: Panel) -> None:
    with panel.controls.watch(threshold=0.0001, every=None, device="cpu", start=False) as w:
        assert w.check() == ["cpu"]
        memory = panel.views()[0]
    assert "over the 0% threshold" in memory
