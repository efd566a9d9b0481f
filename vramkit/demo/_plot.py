"""The picture: the pool's charge against its budget over a run, stages shaded, events marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vramkit.demo._pipeline import DemoResult, MiB, _fmt

STAGE_COLOURS = {"asr": "#d6e4f5", "llm": "#fbe3c6", "tts": "#d9efd6"}
EVENT_STYLES = {  # kind -> (marker, colour, legend text)
    "load": ("^", "#2e7d32", "load (built from its files)"),
    "wake": ("o", "#00838f", "wake (from an offload tier)"),
    "evict": ("v", "#e65100", "evict (offload or unload)"),
    "expire": ("x", "#6d4c41", "keep-alive expiry"),
}


def plot(result: DemoResult, path: Path) -> None:
    """Draw the pool's charge against its budget, stages shaded, one mark per event.

    The main panel is what the budget limits: the bytes the pool charges for
    its models. A smaller panel below gives the device's memory as context
    (on ``cpu``, the whole process's RSS: Python, torch, FunASR and buffers),
    which the budget does not count and which may lie above it.
    """
    from vramkit._optional import require

    matplotlib = require("matplotlib", "vramkit demo --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 11}):
        figure, (main, context) = plt.subplots(
            2,
            1,
            figsize=(12, 7.4),
            dpi=100,
            sharex=True,
            gridspec_kw={"height_ratios": [3, 1], "hspace": 0.12},
        )
        _draw_main(main, result)
        _draw_context(context, result)
        together = sum(result.sizes.values())
        figure.suptitle(
            f"vramkit demo: three models needing {_fmt(together)} together take turns "
            f"under a {_fmt(result.budget_bytes)} budget",
            fontsize=14,
            fontweight="bold",
            y=0.985,
        )
        main.set_title(
            f"{result.items} items, asr -> llm -> tts on {result.device}; "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in result.sizes.items())
            + " (tiny stand-ins, random weights)",
            fontsize=10,
            color="#444444",
        )
        from matplotlib.patches import Patch

        handles, labels = main.get_legend_handles_labels()
        for stage, colour in STAGE_COLOURS.items():
            handles.append(Patch(color=colour))
            labels.append(f"{stage} stage running")
        figure.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.945),
            ncol=4,
            fontsize=10,
            frameon=False,
        )
        figure.subplots_adjust(left=0.07, right=0.98, top=0.82, bottom=0.09)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        plt.close(figure)


def _draw_main(axis: Any, result: DemoResult) -> None:
    budget = result.budget_bytes / MiB
    top = max(budget, result.peak_charged_bytes / MiB) * 1.25
    for begin, end, stage in result.stage_spans:
        axis.axvspan(begin, end, color=STAGE_COLOURS[stage], zorder=0, linewidth=0)
        if end - begin > 0.02 * max(result.seconds, 1e-9) or len(result.stage_spans) <= 12:
            axis.text(
                (begin + end) / 2,
                top * 0.97,
                stage,
                ha="center",
                va="top",
                fontsize=10,
                color="#555555",
            )
    axis.axhline(budget, color="#c62828", linestyle="--", linewidth=1.8, zorder=2)
    axis.text(
        0.0,
        budget,
        f" budget {_fmt(result.budget_bytes)}",
        color="#c62828",
        va="bottom",
        ha="left",
        fontsize=11,
        fontweight="bold",
        zorder=4,
    )
    if result.samples:
        axis.step(
            [t for t, _, _ in result.samples],
            [c / MiB for _, c, _ in result.samples],
            where="post",
            color="#1a3a6b",
            linewidth=2.6,
            zorder=3,
            label="charged to the pool (what the budget limits)",
        )
    shown: set[str] = set()
    for t, kind, model, _, seconds in result.events:
        marker, colour, text = EVENT_STYLES[kind]
        # An eviction is marked where the model's bytes leave (the top of the
        # drop: the charge before it started), a load or wake where they arrived.
        leaving = kind in {"evict", "expire"}
        y = _charged_around(result, t - seconds if leaving else t, before=leaving) / MiB
        axis.plot(
            t,
            y,
            marker=marker,
            color=colour,
            markersize=11,
            linestyle="none",
            zorder=5,
            markeredgecolor="white",
            label=None if kind in shown else text,
        )
        shown.add(kind)
        axis.annotate(
            model,
            (t, y),
            xytext=(7, -16 if leaving else 6),
            textcoords="offset points",
            fontsize=10,
            color=colour,
            fontweight="bold",
            zorder=5,
        )
    axis.set_ylim(0, top)
    axis.set_ylabel("MiB charged to the pool")
    axis.grid(axis="y", alpha=0.3)


def _draw_context(axis: Any, result: DemoResult) -> None:
    for begin, end, stage in result.stage_spans:
        axis.axvspan(begin, end, color=STAGE_COLOURS[stage], zorder=0, linewidth=0)
    if result.samples:
        axis.step(
            [t for t, _, _ in result.samples],
            [d / MiB for _, _, d in result.samples],
            where="post",
            color="#616161",
            linewidth=1.6,
        )
    axis.set_ylabel("MiB")
    axis.set_xlabel("seconds since the pool started")
    axis.set_title(
        f"context: {result.device_memory}, everything in the process, libraries included "
        "(not what the budget counts)",
        fontsize=10,
        color="#444444",
        loc="left",
    )
    axis.grid(axis="y", alpha=0.3)


def _charged_around(result: DemoResult, t: float, *, before: bool) -> int:
    """The pool's charge just before time ``t`` or just after it."""
    if before:
        earlier = [charged for when, charged, _ in result.samples if when < t]
        return earlier[-1] if earlier else 0
    for when, charged, _ in result.samples:
        if when >= t:
            return charged
    return result.samples[-1][1] if result.samples else 0
