"""A memory panel for Gradio apps: the memory line, the models, and buttons that free memory.

Extra ``webui`` (Gradio). :func:`memory_panel` builds a ``gr.Blocks`` to drop
into your own app, in a tab or an accordion, or to launch on its own. It shows
Fun-ASR WebUI's "system settings", made real:

- the memory line per device (``GPU 0 Memory: 5.2 / 16.0 GiB (32%)``), this
  process's share, and each pool's budget;
- a table of models: state, tier, bytes, leases, idle time, keep-alive;
- "Clear cache", "Free idle models", and per model "Unload", "Offload" and
  "Wake", each answering with what came back, in bytes. A model in use says
  who holds it and is left alone; a button that does nothing on the device is
  disabled, with the reason;
- a threshold alert and a timed cleanup (:func:`vramkit.watch`);
- the operation log: time, operator (Gradio's login name when the app has
  ``auth``, else the client's address), action, memory before and after, seconds.

Every button works through a :class:`vramkit.Controls`, so the panel and the
HTTP admin API do the same operations with the same results, into one
operation log when they share one ``Controls``. Operations run in Gradio's
worker threads, never on its event loop, and never wait for a lease: running
inference is not disturbed, and the page keeps refreshing on its timer.
"""

from __future__ import annotations

import collections
import html
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from vramkit.errors import InvalidArgumentError, MissingDependencyError

try:  # before vramkit's own imports, so a missing extra is named before torch loads
    import gradio as gr
except ImportError as exc:  # pragma: no cover - exercised where the extra is missing
    raise MissingDependencyError(
        exc.name or "gradio", "webui", "vramkit.integrations.gradio"
    ) from exc

from vramkit import DeviceMemory, ManagedModel, MemorySnapshot, ModelPool, format_bytes
from vramkit._units import format_part_of
from vramkit.controls import Controls, Operation, OperationLog, Watch

__all__ = ["memory_panel"]

Target = ModelPool | ManagedModel[Any]

# The buttons, by Controls action: (label, capability that disables it).
_MODEL_BUTTONS = (
    ("unload", "Unload", "unload"),
    ("offload_cpu", "Offload to CPU", "offload_cpu"),
    ("offload_disk", "Offload to disk", "offload_disk"),
    ("wake", "Wake", "wake"),
)
_LABELS = {"clear_cache": "Clear cache", "free": "Free idle models"} | {
    action: label for action, label, _ in _MODEL_BUTTONS
}
_MARKS = {
    "ok": "✅",
    "noop": "💤",
    "busy": "⏳",
    "not_found": "❓",
    "unsupported": "🚫",
    "no_room": "📦",
    "failed": "❌",
}
_CLEANUPS = {"Free idle models": "free", "Clear cache": "clear_cache"}
_WATCH_NAME = "memory panel"
_READING = '<p class="vramkit-empty">reading…</p>'

_CSS = """
table { border-collapse: collapse; width: 100%; font-size: var(--text-sm); }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary); }
th { font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.vramkit-line { font-size: var(--text-lg); font-weight: 600; }
.vramkit-sub { color: var(--body-text-color-subdued); }
.vramkit-alert { color: var(--color-red-500, #dc2626); font-weight: 600; }
.vramkit-busy { color: var(--color-orange-500, #ea580c); }
.vramkit-empty { color: var(--body-text-color-subdued); font-style: italic; }
"""


def memory_panel(
    *targets: Target,
    controls: Controls | None = None,
    log: OperationLog | None = None,
    refresh: float | None = 2.0,
    log_rows: int = 20,
    title: str | None = "Memory",
) -> gr.Blocks:
    """A Gradio memory panel over some pools and models, to put in a tab or an accordion.

    Called inside a ``gr.Blocks`` context, the panel is laid out where it is
    called; called outside one, it is a ``gr.Blocks`` of its own, to
    ``.launch()`` or to ``.render()`` later inside your app.

    Args:
        *targets: :class:`~vramkit.ModelPool` and :class:`~vramkit.ManagedModel`
            objects to show and control (none: every one of the process).
        controls: Use these :class:`~vramkit.Controls` instead (their pools,
            models and log; share them with the HTTP admin API). Not with
            ``targets`` or ``log``.
        log: The operation log for new controls (default: a new one).
        refresh: Seconds between refreshes of the page's figures (``None``:
            only after each button).
        log_rows: How many of the latest operations the log table shows.
        title: A heading above the panel (``None``: none).

    Returns:
        The panel, a ``gr.Blocks``.

    Raises:
        InvalidArgumentError: Bad targets, ``controls`` with targets or
            ``log``, a ``refresh`` that is not a positive number of seconds,
            or ``log_rows`` under 1.

    Example:
        >>> import gradio as gr, torch, vramkit
        >>> from vramkit.integrations.gradio import memory_panel
        >>> pool = vramkit.ModelPool("cpu", budget="64MiB", headroom=0, name="doc-panel")
        >>> _ = pool.register("small", lambda: torch.nn.Linear(64, 64))
        >>> with gr.Blocks() as demo:
        ...     with gr.Tab("Memory"):
        ...         panel = memory_panel(pool)
        >>> pool.close()
    """
    if controls is not None and (targets or log is not None):
        raise InvalidArgumentError("pass either controls= or pools/models (and log=), not both")
    if controls is not None and not isinstance(controls, Controls):
        raise InvalidArgumentError(f"controls must be a vramkit.Controls; got {controls!r}")
    if refresh is not None and (
        isinstance(refresh, bool) or not isinstance(refresh, int | float) or not refresh > 0
    ):
        raise InvalidArgumentError(f"refresh must be seconds > 0, or None; got {refresh!r}")
    if isinstance(log_rows, bool) or not isinstance(log_rows, int) or log_rows < 1:
        raise InvalidArgumentError(f"log_rows must be a whole number, 1 or more; got {log_rows!r}")
    if title is not None and not isinstance(title, str):
        raise InvalidArgumentError(f"title must be a string or None; got {title!r}")
    panel = _Panel(controls if controls is not None else Controls(*targets, log=log), log_rows)
    blocks = gr.Blocks()
    with blocks:
        panel.build(title, refresh)
    return blocks


# ---------------------------------------------------------------------- the panel


class _Panel:
    """The panel's state and handlers: one per :func:`memory_panel` call, shared by its pages."""

    def __init__(self, controls: Controls, log_rows: int) -> None:
        self.controls = controls
        self.log_rows = log_rows
        self._watch: Watch | None = None
        self._watch_lock = threading.Lock()

    # ------------------------------------------------------------------ views

    def views(self) -> tuple[str, str, str, str, dict[str, Any]]:
        """One reading of everything: memory, models, log and watch HTML, and the layout."""
        status = self.controls.status()
        return (
            _memory_html(status),
            _models_html(status),
            _log_html(self.controls.log, self.log_rows),
            _watch_html(status),
            _layout(status),
        )

    # ------------------------------------------------------------------ operations

    def run(self, action: str, model: str | None, caller: str | None) -> Operation:
        """Run one button's operation through the controls."""
        controls = self.controls
        if action == "free":
            return controls.free(caller=caller)
        if action == "clear_cache":
            return controls.clear_cache(caller=caller)
        if model is None:
            raise InvalidArgumentError(f"{action} needs a model's name")
        if action == "unload":
            return controls.unload(model, caller=caller)
        if action == "wake":
            return controls.wake(model, caller=caller)
        if action in ("offload_cpu", "offload_disk"):
            return controls.offload(model, action.removeprefix("offload_"), caller=caller)
        raise InvalidArgumentError(f"unknown action {action!r}")

    def start_watch(
        self, threshold_percent: float | None, every_minutes: float | None, cleanup: str
    ) -> str:
        """Replace the panel's watch with one of these settings; returns the feedback."""
        threshold = threshold_percent / 100 if threshold_percent else None
        every = every_minutes * 60 if every_minutes else None
        action = _CLEANUPS.get(cleanup)
        if action is None:
            return f"❓ unknown cleanup {cleanup!r}; choose one of {', '.join(_CLEANUPS)}"
        with self._watch_lock:
            self._stop_watch()
            if threshold is None and every is None:
                return "💤 no threshold and no timed cleanup: nothing to watch"
            try:
                self._watch = self.controls.watch(
                    threshold=threshold, every=every, action=action, name=_WATCH_NAME
                )
            except InvalidArgumentError as exc:
                return f"❌ {exc}"
            state = self._watch.state()
        parts = [] if threshold is None else [f"alert over {threshold:.0%}"]
        if every is not None:
            parts.append(
                f"{cleanup.lower()} every {_seconds(every)}"
                if state["action_disabled"] is None
                else f"no timed cleanup: {state['action_disabled']}"
            )
        return "✅ watching: " + "; ".join(parts)

    def stop_watch(self) -> str:
        """Stop the panel's watch; returns the feedback."""
        with self._watch_lock:
            stopped = self._stop_watch()
        return "✅ watch stopped" if stopped else "💤 no watch was running"

    def _stop_watch(self) -> bool:
        running, self._watch = self._watch, None
        if running is None or not running.running:
            return False
        running.stop()
        return True

    # ------------------------------------------------------------------ layout

    def build(self, title: str | None, refresh: float | None) -> None:
        """Lay the panel out in the current Blocks context and wire its events."""
        status = self.controls.status()  # the buttons' first layout; figures come on page load
        if title:
            gr.Markdown(f"### {title}")
        layout_state = gr.State(_layout(status))
        memory_view = _html(_READING, "vramkit-memory")
        models_view = _html(_READING, "vramkit-models")

        # Placed here, filled per page; late binding lets it name the outputs made below.
        @gr.render(inputs=[layout_state])  # type: ignore[untyped-decorator]
        def buttons(shape: dict[str, Any]) -> None:
            self._buttons(shape, [result, *outputs])

        result = gr.Textbox(
            label="Result", interactive=False, elem_id="vramkit-result", lines=2, max_lines=6
        )
        with gr.Accordion("Alerts and timed cleanup", open=False):
            watch_view = _html(_READING, "vramkit-watch")
            settings, start, stop = self._watch_settings()
        with gr.Accordion("Operation log", open=True):
            log_view = _html(_READING, "vramkit-log")
        outputs = [memory_view, models_view, log_view, watch_view, layout_state]

        def refresh_views() -> tuple[str, str, str, str, dict[str, Any]]:
            return self.views()

        def apply_watch(
            threshold_percent: float | None, every_minutes: float | None, choice: str
        ) -> tuple[Any, ...]:
            return (self.start_watch(threshold_percent, every_minutes, choice), *self.views())

        def stop_watch() -> tuple[Any, ...]:
            return (self.stop_watch(), *self.views())

        quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        gr.on(None, refresh_views, None, outputs, **quiet)  # no triggers: on each page load
        if refresh is not None:
            gr.Timer(refresh).tick(refresh_views, None, outputs, **quiet)
        start.click(apply_watch, settings, [result, *outputs], **quiet)
        stop.click(stop_watch, None, [result, *outputs], **quiet)

    @staticmethod
    def _watch_settings() -> tuple[list[Any], gr.Button, gr.Button]:
        """The threshold and timed-cleanup inputs, and the Apply and Stop buttons."""
        with gr.Row():
            threshold = gr.Slider(50, 100, value=90, step=1, label="Alert when memory is over (%)")
            every = gr.Number(
                value=5, minimum=0, label="Clean up every (minutes; 0: never)", precision=1
            )
            cleanup = gr.Radio(list(_CLEANUPS), value="Free idle models", label="Cleanup")
        with gr.Row():
            start = gr.Button("Apply", size="sm", elem_id="vramkit-watch-apply")
            stop = gr.Button("Stop", size="sm", elem_id="vramkit-watch-stop")
        return [threshold, every, cleanup], start, stop

    def _buttons(self, shape: Mapping[str, Any], outputs: list[Any]) -> None:
        """The action buttons for the devices and models in ``shape`` (see :func:`layout`)."""
        reasons = shape["reasons"]
        with gr.Row():
            clear_reason = _all_devices_say(reasons, "clear_cache")
            self._button("clear_cache", None, clear_reason, outputs, variant="secondary")
            self._button("free", None, _all_devices_say(reasons, "free"), outputs)
        notes = [
            f"{_LABELS.get(action, action)} does nothing on {device}: {reason}"
            for device, by_action in reasons.items()
            for action, reason in by_action.items()
            if reason is not None and action in _LABELS
        ]
        if notes:
            gr.HTML(
                "<br>".join(html.escape(n) for n in notes),
                elem_id="vramkit-disabled",
                elem_classes=["vramkit-sub"],
                js_on_load=None,
            )
        for key, device in shape["models"]:
            with gr.Row(equal_height=True):
                gr.HTML(f"<b>{html.escape(key)}</b> <span>({html.escape(device)})</span>")
                for action, _, capability in _MODEL_BUTTONS:
                    reason = reasons.get(device, {}).get(capability)
                    self._button(action, key, reason, outputs, size="sm")

    def _button(
        self,
        action: str,
        model: str | None,
        disabled: str | None,
        outputs: list[Any],
        *,
        variant: Literal["primary", "secondary", "stop"] = "secondary",
        size: Literal["sm", "md", "lg"] = "md",
    ) -> None:
        slug = _slug(model) + "-" if model is not None else ""
        button = gr.Button(
            _LABELS[action],
            interactive=disabled is None,
            variant=variant,
            size=size,
            elem_id=f"vramkit-{slug}{action.replace('_', '-')}",
            min_width=80,
        )
        if disabled is not None:
            return

        def handler(request: gr.Request) -> tuple[Any, ...]:
            operation = self.run(action, model, _operator(request))
            return (_feedback(operation), *self.views())

        button.click(handler, None, outputs, show_progress="hidden", concurrency_limit=None)


def _html(value: str, elem_id: str) -> gr.HTML:
    return gr.HTML(value, elem_id=elem_id, css_template=_CSS, js_on_load=None)


def _all_devices_say(reasons: Mapping[str, Mapping[str, str | None]], action: str) -> str | None:
    """The reason ``action`` does nothing, when it does nothing on every device."""
    said = [by_action.get(action) for by_action in reasons.values()]
    return said[0] if said and all(r is not None for r in said) else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"


# ---------------------------------------------------------------------- what a page shows


def _operator(request: gr.Request | None) -> str | None:
    """Who pressed the button: the login name under Gradio's ``auth``, else the client address."""
    if request is None:
        return None
    if request.username:
        return str(request.username)
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return str(host) if host else None


def _feedback(operation: Operation) -> str:
    """One line for a person: a mark for the outcome, then what happened."""
    text = f"{_MARKS.get(operation.outcome, '•')} {operation.message}"
    if operation.outcome == "busy":
        text += " (nothing was done)"
    return text


def _layout(status: Mapping[str, Any]) -> dict[str, Any]:
    """What the buttons depend on: each device's disabled actions and each model's key."""
    names = collections.Counter(m["name"] for m in status["models"])
    return {
        "reasons": {d["device"]: dict(d["capabilities"]) for d in status["devices"]},
        "models": [[_key(m, names), str(m.get("device") or "")] for m in status["models"]],
    }


def _key(model: Mapping[str, Any], names: Mapping[str, int]) -> str:
    """The name :class:`Controls` knows the model by (``pool/name`` where names clash)."""
    name = str(model["name"])
    return f"{model['pool']}/{name}" if names[name] > 1 and model.get("pool") else name


def _memory_html(status: Mapping[str, Any]) -> str:
    """The memory lines, one per device, and each pool's budget line."""
    alerting = {
        device: watch["threshold"]
        for watch in status["watches"]
        for device, state in watch["devices"].items()
        if state["alerting"]
    }
    rows = [_device_html(d, alerting.get(d["device"])) for d in status["devices"]]
    rows += [_pool_html(p) for p in status["pools"]]
    return "\n".join(rows)


def _device_html(device: Mapping[str, Any], threshold: float | None) -> str:
    extra = []
    if device.get("process_used_bytes") is not None:
        extra.append(f"this process {format_bytes(device['process_used_bytes'])}")
    if device.get("allocated_bytes") is not None:
        extra.append(f"{format_bytes(device['allocated_bytes'])} allocated")
    if device.get("reserved_bytes") is not None:
        extra.append(f"{format_bytes(device['reserved_bytes'])} reserved")
    alert = (
        f' <span class="vramkit-alert">⚠️ over the {threshold:.0%} threshold</span>'
        if threshold is not None
        else ""
    )
    return (
        f'<div class="vramkit-device" data-device="{html.escape(device["device"])}" '
        f'data-used-bytes="{device.get("used_bytes") or ""}">'
        f'<span class="vramkit-line">{html.escape(device["memory_line"])}</span>{alert}'
        f' <span class="vramkit-sub">{html.escape(" · ".join(extra))}</span></div>'
    )


def _pool_html(pool: Mapping[str, Any]) -> str:
    charged, budget = pool["charged_bytes"], pool["budget_bytes"]
    share = f" ({charged / budget:.0%})" if budget else ""
    return (
        f'<div class="vramkit-pool" data-pool="{html.escape(pool["name"])}" '
        f'data-charged-bytes="{charged}">pool <b>{html.escape(pool["name"])}</b> on '
        f"{html.escape(pool['device'])}: {format_part_of(charged, budget)} charged{share}"
        f' <span class="vramkit-sub">· peak {format_bytes(pool["peak_charged_bytes"])}'
        f" · {pool['loads']} loads · {pool['evictions']} evictions</span></div>"
    )


_MODEL_COLUMNS = (
    "Model", "Pool", "Device", "State", "Tier", "On device", "Size", "Leases", "Idle",
    "Keep-alive",
)  # fmt: skip


def _models_html(status: Mapping[str, Any]) -> str:
    """The model table: one row per model, with ``data-model`` and ``data-state`` for scripts."""
    models = status["models"]
    if not models:
        return '<p class="vramkit-empty">no models</p>'
    names = collections.Counter(m["name"] for m in models)
    rows = [_model_row(m, _key(m, names)) for m in models]
    return _table(_MODEL_COLUMNS, rows)


def _model_row(model: Mapping[str, Any], key: str) -> str:
    leases = int(model.get("leases") or 0)
    cells = [
        _td(model["name"]),
        _td(model.get("pool") or "-"),
        _td(model.get("device") or "-"),
        _td(model["state"], "vramkit-busy" if leases else ""),
        _td(model.get("tier") or "-"),
        _td(format_bytes(model.get("device_bytes")), "num"),
        _td(format_bytes(model.get("size_bytes")), "num"),
        _td(str(leases), "num vramkit-busy" if leases else "num"),
        _td(_seconds(model.get("idle_seconds")), "num"),
        _td(_keep_alive(model.get("keep_alive")), "num"),
    ]
    return (
        f'<tr data-model="{html.escape(key)}" data-state="{html.escape(model["state"])}" '
        f'data-leases="{leases}" data-device-bytes="{int(model.get("device_bytes") or 0)}">'
        f"{''.join(cells)}</tr>"
    )


_LOG_COLUMNS = (
    "Time", "Operator", "Action", "Model", "Outcome", "Memory before", "Memory after",
    "Seconds", "Message",
)  # fmt: skip


def _log_html(log: Iterable[Operation], rows: int) -> str:
    """The latest ``rows`` operations, newest first."""
    latest = list(log)[-rows:][::-1]
    if not latest:
        return '<p class="vramkit-empty">no operations yet</p>'
    return _table(_LOG_COLUMNS, [_log_row(op) for op in latest])


def _log_row(op: Operation) -> str:
    record = op.to_dict()  # the HTTP API's format: one log, one way of writing it
    action = record["action"]
    if action == "offload" and op.detail.get("tier"):
        action = f"offload ({op.detail['tier']})"
    cells = [
        _td(str(record["time"]).replace("T", " ")),
        _td(record["caller"] or "-"),
        _td(action),
        _td(record["model"] or "-"),
        _td(f"{_MARKS.get(op.outcome, '')} {op.outcome}"),
        _td(_footprint(op.memory_before)),
        _td(_footprint(op.memory_after)),
        _td(f"{op.seconds:.2f}", "num"),
        _td(op.message),
    ]
    return (
        f'<tr data-action="{html.escape(op.action)}" data-outcome="{op.outcome}">'
        + "".join(cells)
        + "</tr>"
    )


def _footprint(snapshot: MemorySnapshot) -> str:
    """Per device, the process's own memory where the driver says, else the device's."""
    return ", ".join(_reading_footprint(r) for r in snapshot.readings)


def _reading_footprint(reading: DeviceMemory) -> str:
    if reading.process_used_bytes is not None:
        return f"{reading.device} {format_bytes(reading.process_used_bytes)} (process)"
    return f"{reading.device} {format_bytes(reading.used_bytes)} (device)"


def _watch_html(status: Mapping[str, Any]) -> str:
    """Each running watch: its threshold, timed action, alerts and next run."""
    watches = status["watches"]
    if not watches:
        return '<p class="vramkit-empty">no watch running</p>'
    return "\n".join(_watch_line(w) for w in watches)


def _watch_line(watch: Mapping[str, Any]) -> str:
    parts = []
    if watch["threshold"] is not None:
        over = [d for d, state in watch["devices"].items() if state["alerting"]]
        parts.append(
            f"alert over {watch['threshold']:.0%} (checked every "
            f"{_seconds(watch['check_every_seconds'])}; {watch['alerts']} alerts"
            + (f"; now over: {', '.join(over)}" if over else "")
            + ")"
        )
    if watch["action_disabled"] is not None:
        parts.append(f"no timed cleanup: {watch['action_disabled']}")
    elif watch["every_seconds"] is not None:
        next_in = watch["next_action_in_seconds"]
        parts.append(
            f"{watch['action']} every {_seconds(watch['every_seconds'])}"
            + (f", next in {_seconds(next_in)}" if next_in is not None else "")
            + f"; {watch['actions_run']} run"
            + (f", last {watch['last_outcome']}" if watch["last_outcome"] else "")
        )
    text = f"<b>{html.escape(watch['name'])}</b>: " + html.escape("; ".join(parts))
    return f'<div class="vramkit-watch" data-watch="{html.escape(watch["name"])}">{text}</div>'


def _table(columns: Iterable[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _td(text: str, classes: str = "") -> str:
    attribute = f' class="{classes}"' if classes else ""
    return f"<td{attribute}>{html.escape(str(text))}</td>"


def _seconds(value: float | None) -> str:
    """``"42 s"``, ``"5 min"``, ``"1.5 h"``; ``"-"`` for ``None``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.0f} s"
    if value < 3600:
        return f"{value / 60:.0f} min" if value % 60 < 1 else f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _keep_alive(value: float | None) -> str:
    return "forever" if value is None else _seconds(value)
