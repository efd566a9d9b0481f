"""``vramkit demo``: ASR -> LLM -> TTS on one device under a budget smaller than the three.

Everything is built locally and offline on the first run (tiny models with
random weights, cached): a FunASR VAD + ASR + punctuation pipeline, a small
causal language model and a small TTS-like model. A batch of synthetic audio
then goes through all three in turn, under a :class:`~vramkit.ModelPool`
whose budget cannot hold them together, so the pool evicts, offloads and wakes
as the pipeline moves. Every transition is printed with the memory it moved,
then a summary; ``--plot PATH`` draws the pool's charge against its budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import torch

    from vramkit.devices import Device, DeviceLike
    from vramkit.pool import ModelPool
    from vramkit.testing.models import TinyCausalLM, TinyTTS

__all__ = [
    "DemoResult",
    "add_arguments",
    "open_pool",
    "read_back",
    "run_demo",
    "run_pipeline",
    "summarize",
    "transcribe",
]

MiB = 1024**2
STAGES = ("asr", "llm", "tts")
LLM_MIB = 96.0
TTS_MIB = 48.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument(
        "--device", default=None, help="where the models run (default: CUDA when present, else cpu)"
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="the pool's budget, e.g. 128MiB (default: 1.2x the largest model)",
    )
    parser.add_argument("--items", type=int, default=6, help="audio clips to process (6)")
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="write a PNG of memory over time"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where the demo models are built (default: user cache)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo from parsed command-line arguments; returns the exit status.

    Raises:
        InvalidArgumentError: ``--items``, ``--budget``, ``--device`` or
            ``--plot`` is malformed (checked before anything is built).
        MissingDependencyError: funasr (or, for ``--plot``, matplotlib) is
            not installed; the message names the extra.
    """
    budget, device = check_arguments(args)
    result = run_pipeline(
        device=device,
        budget=budget,
        items=args.items,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        echo=not args.quiet,
    )
    print(result.summary())
    if args.plot:
        plot(result, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def check_arguments(args: argparse.Namespace) -> tuple[int | None, Device]:
    """Check the demo's options and what they need, before minutes of work.

    Returns:
        The budget in bytes (``None`` for the default) and the resolved device.
    """
    from vramkit._optional import require
    from vramkit._units import parse_bytes
    from vramkit.devices import resolve_device
    from vramkit.errors import InvalidArgumentError, MissingDependencyError

    if args.items < 1:
        raise InvalidArgumentError(f"--items must be at least 1; got {args.items}")
    budget = None if args.budget is None else parse_bytes(args.budget, what="--budget")
    if budget == 0:
        raise InvalidArgumentError("--budget must be more than 0 bytes")
    device = resolve_device(args.device)
    if args.plot:
        target = Path(args.plot)
        if target.suffix.lower() != ".png":
            raise InvalidArgumentError(
                f"--plot writes a PNG: give a path ending in .png; got {target}"
            )
        if target.is_dir():
            raise InvalidArgumentError(f"--plot must be a file path, not a directory: {target}")
        require("matplotlib", "vramkit demo --plot")
    import importlib.util

    for module in ("funasr", "kaldi_native_fbank"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module, "funasr", "vramkit demo")
    return budget, device


@dataclass
class DemoResult:
    """What a demo run did: the per-item outputs, events, memory samples and totals.

    Times are seconds since the pool was made; bytes are ints.
    """

    device: str
    budget_bytes: int
    sizes: dict[str, int]
    items: int
    seconds: float
    headroom_bytes: int = 0
    transcripts: list[str] = field(default_factory=list)
    # (t at the end, kind, model, state after, seconds it took)
    events: list[tuple[float, str, str, str, float]] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, charged, device)
    stage_spans: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, stage)
    device_memory: str = "process memory"  # what the device column of samples is
    peak_charged_bytes: int = 0
    peak_device_bytes: int = 0
    loads: int = 0
    wakes: int = 0
    evictions: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The closing summary printed by ``vramkit demo``."""
        together = sum(self.sizes.values())
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in self.stage_seconds.items())
        lines = [
            "",
            f"summary: {self.items} items through asr -> llm -> tts on {self.device} "
            f"in {self.seconds:.2f} s ({stages})",
            "  models: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in self.sizes.items())
            + f" = {_fmt(together)} together; budget {_fmt(self.budget_bytes)}",
            f"  loads {self.loads}, wakes {self.wakes}, evictions {self.evictions}",
            f"  peak charged {_fmt(self.peak_charged_bytes)} of {_fmt(self.budget_bytes)} budget "
            f"({'within' if self.peak_charged_bytes <= self.budget_bytes else 'OVER'} budget)",
        ]
        if self.peak_device_bytes:
            lines.append(
                f"  peak {self.device_memory} {_fmt(self.peak_device_bytes)} (everything in the "
                "process, libraries included; the budget counts the models)"
            )
        if self.transcripts:
            lines.append(f"  first transcript: {self.transcripts[0]!r} (random weights)")
        return "\n".join(lines)


def _fmt(value: int | None) -> str:
    from vramkit._units import format_bytes

    return format_bytes(value)


def default_cache_dir() -> Path:
    """Where the demo builds its models: ``$VRAMKIT_CACHE_DIR/demo`` or the user cache."""
    from vramkit._utils import user_cache_dir

    override = os.environ.get("VRAMKIT_CACHE_DIR")
    return Path(override).expanduser() / "demo" if override else user_cache_dir() / "demo"


def build_models(cache_dir: Path) -> dict[str, Any]:
    """Build (once) the three stages' files under ``cache_dir``; returns their locations."""
    from vramkit.testing.models import build_funasr_pipeline

    cache_dir.mkdir(parents=True, exist_ok=True)
    dirs = build_funasr_pipeline(cache_dir / "funasr")
    return {
        "funasr": dirs,
        "llm": _checkpoint(cache_dir / "llm", "llm", LLM_MIB),
        "tts": _checkpoint(cache_dir / "tts", "tts", TTS_MIB),
    }


def _checkpoint(directory: Path, kind: str, mib: float) -> Path:
    """Save a torch model's config and weights once (atomically), like a downloaded checkpoint."""
    import torch

    from vramkit.testing.models import tiny_causal_lm, tiny_tts

    weights = directory / "model.pt"
    if weights.exists() and (directory / "config.json").exists():
        return directory
    model = tiny_causal_lm(mib, seed=1) if kind == "llm" else tiny_tts(mib, seed=2)
    config = _config_of(model)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".model.pt.{os.getpid()}"
    torch.save(model.state_dict(), partial)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    os.replace(partial, weights)
    return directory


def _config_of(model: Any) -> dict[str, Any]:
    from vramkit.testing.models import TinyCausalLM

    if isinstance(model, TinyCausalLM):
        return {
            "kind": "llm",
            "vocab": model.vocab,
            "dim": model.tok_emb.embedding_dim,
            "layers": len(model.blocks),
            "max_seq_len": model.max_seq_len,
        }
    return {
        "kind": "tts",
        "vocab": model.embed.num_embeddings,
        "dim": model.embed.embedding_dim,
        "layers": len(model.encoder),
    }


def _torch_loader(directory: Path, device: Any) -> Any:
    """A user's loader: build the module from its config, then load the checkpoint."""

    def load() -> Any:
        import torch

        from vramkit.testing.models import TinyCausalLM, TinyTTS

        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        kind = config.pop("kind")
        model = TinyCausalLM(**config) if kind == "llm" else TinyTTS(**config)
        state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.to(device).eval()

    load.__name__ = f"load_{directory.name}"
    return load


def open_pool(
    *,
    device: DeviceLike | None = None,
    budget: str | int | None = None,
    cache_dir: Path | None = None,
    name: str = "demo",
) -> ModelPool:
    """Build the models (first run only) and a pool of the three stages, ``asr``, ``llm``, ``tts``.

    Nothing is loaded yet. FunASR is imported here (about 7 s, once), as any
    application imports it before serving; its banners are kept out of stdout.

    Args:
        device: Device for all three (default: the best available).
        budget: The pool's budget (default: 1.2x the largest model's checkpoint,
            less than the three together).
        cache_dir: Where the models are built (default: :func:`default_cache_dir`).
        name: The pool's name.

    Returns:
        The open :class:`~vramkit.ModelPool`; close it when done.
    """
    import vramkit
    from vramkit import ManagedModel, ModelPool
    from vramkit.adapters.funasr import import_funasr
    from vramkit.devices import resolve_device

    target = resolve_device(device)
    with _third_party_quiet():
        files = build_models(cache_dir or default_cache_dir())
        import_funasr("vramkit demo")
    dirs = files["funasr"]
    sizes = {
        "asr": sum((d / "model.pt").stat().st_size for d in (dirs.asr, dirs.vad, dirs.punc)),
        "llm": (files["llm"] / "model.pt").stat().st_size,
        "tts": (files["tts"] / "model.pt").stat().st_size,
    }
    budget_bytes = (
        vramkit.parse_bytes(budget, what="budget")
        if budget is not None
        else int(1.2 * max(sizes.values()))
    )
    pool = ModelPool(
        target,
        budget=budget_bytes,
        headroom=min(8 * MiB, budget_bytes // 16),
        name=name,
        timeout=60.0,
    )
    try:
        pool.add(
            ManagedModel.from_funasr(
                **dirs.automodel_kwargs(),
                device=target,
                name="asr",
                manager_options={"size_hint": sizes["asr"]},
                disable_pbar=True,
                disable_log=True,
            )
        )
        for stage in ("llm", "tts"):
            loader = _torch_loader(files[stage], target.torch)
            pool.register(stage, loader, size_hint=sizes[stage])
    except BaseException:
        pool.close()
        raise
    return pool


def transcribe(asr: Any, audio: Any) -> str:
    """The ASR stage: FunASR's text for ``audio`` (16 kHz mono float samples, or a WAV path)."""
    return str(asr.generate(input=audio)[0]["text"])


def summarize(llm: TinyCausalLM, text: str, *, max_new_tokens: int = 16) -> torch.Tensor:
    """The LLM stage: the reply's token ids (bytes of ``text`` in, ``max_new_tokens`` out)."""
    import torch

    device = next(llm.parameters()).device
    prompt = torch.tensor([list(text.encode("utf-8"))[:64] or [0]], device=device) % llm.vocab
    return llm.generate(prompt, max_new_tokens=max_new_tokens)[0, prompt.shape[1] :]


def read_back(tts: TinyTTS, tokens: torch.Tensor) -> torch.Tensor:
    """The TTS stage: a waveform for ``tokens``, at ``tts.sample_rate`` samples per second."""
    return tts.synthesize(tokens.to(next(tts.parameters()).device))


def run_pipeline(
    *,
    device: DeviceLike | None = None,
    budget: str | int | None = None,
    items: int = 6,
    cache_dir: Path | None = None,
    echo: bool = True,
) -> DemoResult:
    """Build the models (first run only), then push ``items`` clips through ASR -> LLM -> TTS.

    Args:
        device: Device for all three (default: the best available).
        budget: The pool's budget (default: 1.2x the largest model's checkpoint).
        items: Number of synthetic audio clips.
        cache_dir: Where the models are built (default: :func:`default_cache_dir`).
        echo: Print each transition as it happens.

    Returns:
        A :class:`DemoResult`.
    """
    import vramkit
    from vramkit.devices import resolve_device

    target = resolve_device(device)
    started = time.perf_counter()
    if echo:
        print(f"vramkit {vramkit.__version__} demo: asr -> llm -> tts on {target}")
        print(
            "the models are tiny stand-ins with random weights, built locally: their words "
            "are gibberish,\nbut the memory they take and give back is real"
        )
        print(f"building them (cached in {cache_dir or default_cache_dir()}) ...")
    # FunASR's import (~7 s) happens in here: before the clock starts, like any app's imports.
    pool = open_pool(device=target, budget=budget, cache_dir=cache_dir)
    with _third_party_quiet():
        result = _Run(target, pool, items, echo).run()
    result.seconds = time.perf_counter() - started
    return result


class _Run:
    """One pass of the pipeline through a pool, recording what the pool did."""

    def __init__(self, target: Device, pool: ModelPool, items: int, echo: bool) -> None:
        self.target, self.pool, self.echo = target, pool, echo
        status = pool.status()
        sizes = {stage: pool[stage].expected_bytes or 0 for stage in STAGES}
        self.result = DemoResult(
            str(target), status.budget_bytes, sizes, items, 0.0, status.headroom_bytes
        )
        self.result.device_memory = (
            "process memory (RSS)"
            if target.is_host
            else (f"{target} memory of this process (driver view)")
        )
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sample(self) -> None:
        from vramkit.memory import driver_layer, layer_bytes

        charged = self.pool.status().charged_bytes
        reading = self.target.read()
        device = layer_bytes(reading, driver_layer(reading)) or 0
        with self.lock:
            self.result.samples.append((self.now(), charged, device))
            self.result.peak_charged_bytes = max(self.result.peak_charged_bytes, charged)
            self.result.peak_device_bytes = max(self.result.peak_device_bytes, device)

    def on_event(self, event: Any) -> None:
        # The pool's own kinds only: an eviction is one "evict" (the model's
        # offload or unload under it would mark the same moment twice).
        if event.model not in STAGES or event.kind not in {"load", "wake", "evict", "expire"}:
            return
        now = self.now()
        with self.lock:
            self.result.events.append(
                (now, event.kind, event.model, event.state_after, event.seconds or 0.0)
            )
        self.sample()
        if not self.echo:
            return
        tier = event.detail.get("tier")
        moved = "" if event.bytes is None else f" {_fmt(event.bytes):>10}"
        where = event.state_after
        if event.kind == "evict":
            where = "UNLOADED" if tier == "unload" else f"{tier} tier"
        elif event.kind == "wake":
            where = f"READY from {tier}"
        status = self.pool.status()
        print(
            f"[{now:7.2f}s] {event.kind:<8} {event.model:<4} -> {where:<16}{moved}"
            f"  in {event.seconds:.3f} s   pool {_fmt(status.charged_bytes)}"
            f" / {_fmt(status.budget_bytes)}"
        )

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = self.now()
        try:
            yield
        finally:
            end = self.now()
            with self.lock:
                self.result.stage_spans.append((begin, end, name))
                self.result.stage_seconds[name] = (
                    self.result.stage_seconds.get(name, 0.0) + end - begin
                )

    def run(self) -> DemoResult:
        from vramkit import events

        stop = threading.Event()

        def sampler() -> None:  # a steady trace between events, for the plot
            while not stop.wait(0.02):
                self.sample()

        unsubscribe = events.subscribe(self.on_event)
        sampling = threading.Thread(target=sampler, name="vramkit-demo-sampler", daemon=True)
        sampling.start()
        try:
            self.pool.plan([stage for _ in range(self.result.items) for stage in STAGES])
            for item in range(self.result.items):
                self.item(item)
                self.sample()
            self.result.evictions = self.pool.status().evictions
            self.result.loads = sum(self.pool[s].stats.loads for s in STAGES)
            self.result.wakes = sum(self.pool[s].stats.wakes for s in STAGES)
        finally:
            stop.set()
            sampling.join()
            unsubscribe()
            self.pool.close()
        self.result.samples.sort()
        return self.result

    def item(self, item: int) -> None:
        from vramkit.testing.models import synthetic_audio

        audio = synthetic_audio(1.0 + 0.25 * (item % 3), seed=item)
        with self.stage("asr"), self.pool.use("asr") as asr:
            text = transcribe(asr, audio)
        with self.stage("llm"), self.pool.use("llm") as llm:
            reply = summarize(llm, text)
        with self.stage("tts"), self.pool.use("tts") as tts:
            wave = read_back(tts, reply)
        self.result.transcripts.append(text)
        if self.echo:
            print(
                f"item {item + 1}/{self.result.items}: heard {text!r}, replied {reply.numel()} "
                f"tokens, spoke {wave.numel() / 16000:.2f} s of audio"
            )


# What FunASR prints on its own: a notice at import when ffmpeg is missing (the
# demo feeds arrays, not files) and its version at every AutoModel.
_NOISE = ("Notice: ffmpeg is not installed", "If you want to use ffmpeg", "funasr version:")
_NOISE_CONTINUATION = ("\tsudo apt install ffmpeg", "\t# brew install ffmpeg")


class _DropNoise(io.TextIOBase):
    """A stdout that passes every line on except FunASR's banners."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                if not line.startswith(_NOISE + _NOISE_CONTINUATION):
                    self._out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial and not self._partial.startswith(_NOISE + _NOISE_CONTINUATION):
                self._out.write(self._partial)
            self._partial = ""
            self._out.flush()


@contextlib.contextmanager
def _third_party_quiet() -> Iterator[None]:
    """Keep FunASR's banners and pydub's ffmpeg warning out of the demo's output."""
    quiet = _DropNoise(sys.stdout)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.filterwarnings("ignore", message="Couldn't find ffmpeg", category=RuntimeWarning)
        try:
            yield
        finally:
            quiet.flush()


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
