"""``vramkit demo``: ASR -> LLM -> TTS on one device under a budget smaller than the three.

Everything is built locally and offline on the first run (tiny models with
random weights, cached): a FunASR VAD + ASR + punctuation pipeline, a small
causal language model and a small TTS-like model. A batch of synthetic audio
then goes through all three in turn, under a :class:`~vramkit.ModelPool`
whose budget cannot hold them together, so the pool evicts, offloads and wakes
as the pipeline moves. Every transition is printed with the memory it moved,
then a summary; ``--plot PATH`` draws memory over time with the events marked.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "add_arguments", "run_demo", "run_pipeline"]

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
    """Run the demo from parsed command-line arguments; returns the exit status."""
    from vramkit.errors import InvalidArgumentError

    if args.items < 1:
        raise InvalidArgumentError(f"--items must be at least 1; got {args.items}")
    result = run_pipeline(
        device=args.device,
        budget=args.budget,
        items=args.items,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        echo=not args.quiet,
    )
    print(result.summary())
    if args.plot:
        plot(result, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


@dataclass
class DemoResult:
    """What a demo run did: the per-item outputs, events, memory samples and totals."""

    device: str
    budget_bytes: int
    sizes: dict[str, int]
    items: int
    seconds: float
    headroom_bytes: int = 0
    transcripts: list[str] = field(default_factory=list)
    events: list[tuple[float, str, str, str]] = field(default_factory=list)  # (t, kind, model, to)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, charged, process)
    peak_charged_bytes: int = 0
    peak_process_bytes: int = 0
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
        if self.peak_process_bytes:
            lines.append(f"  peak process memory {_fmt(self.peak_process_bytes)}")
        if self.transcripts:
            lines.append(f"  first transcript: {self.transcripts[0]!r}")
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


def run_pipeline(
    *,
    device: str | None = None,
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
    import torch

    import vramkit
    from vramkit import ManagedModel, ModelPool, events
    from vramkit.devices import resolve_device
    from vramkit.testing.models import synthetic_audio

    target = resolve_device(device)
    started = time.perf_counter()
    if echo:
        print(f"vramkit {vramkit.__version__} demo: asr -> llm -> tts on {target}")
        print(f"building tiny offline models (cached in {cache_dir or default_cache_dir()}) ...")
    files = build_models(cache_dir or default_cache_dir())
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
    headroom = min(8 * MiB, budget_bytes // 16)
    from vramkit.adapters.funasr import import_funasr

    import_funasr("vramkit demo")  # ~7 s, once: before the clock starts, like any app's imports
    pool = ModelPool(target, budget=budget_bytes, headroom=headroom, name="demo", timeout=60.0)
    result = DemoResult(str(target), budget_bytes, sizes, items, 0.0, headroom)
    t0 = time.perf_counter()
    backend_cpu = vramkit.devices.get_backend("cpu")
    lock = threading.Lock()

    def sample() -> None:
        charged = pool.status().charged_bytes
        process = backend_cpu.read(0).process_used_bytes or 0
        with lock:
            result.samples.append((time.perf_counter() - t0, charged, process))
            result.peak_charged_bytes = max(result.peak_charged_bytes, charged)
            result.peak_process_bytes = max(result.peak_process_bytes, process)

    def on_event(event: events.Event) -> None:
        if event.model not in STAGES:
            return
        now = time.perf_counter() - t0
        with lock:
            result.events.append((now, event.kind, event.model, event.state_after))
        sample()
        # Every offload or unload here is an eviction, printed once as "evict".
        if echo and event.kind in {"load", "wake", "evict", "expire", "load_failed"}:
            tier = event.detail.get("tier")
            moved = "" if event.bytes is None else f" {_fmt(event.bytes):>10}"
            where = event.state_after
            if event.kind == "evict":
                where = "UNLOADED" if tier == "unload" else f"{tier} tier"
            elif event.kind == "wake":
                where = f"READY from {tier}"
            status = pool.status()
            print(
                f"[{now:7.2f}s] {event.kind:<8} {event.model:<4} -> {where:<16}{moved}"
                f"  in {event.seconds:.3f} s   pool {_fmt(status.charged_bytes)}"
                f" / {_fmt(status.budget_bytes)}"
            )

    stop = threading.Event()

    def sampler() -> None:  # a steady trace between events, for the plot
        while not stop.wait(0.02):
            sample()

    unsubscribe = events.subscribe(on_event)
    sampling = threading.Thread(target=sampler, name="vramkit-demo-sampler", daemon=True)
    sampling.start()
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
        pool.register("llm", _torch_loader(files["llm"], target.torch), size_hint=sizes["llm"])
        pool.register("tts", _torch_loader(files["tts"], target.torch), size_hint=sizes["tts"])
        pool.plan([stage for _ in range(items) for stage in STAGES])
        timings = dict.fromkeys(STAGES, 0.0)
        for item in range(items):
            audio = synthetic_audio(1.0 + 0.25 * (item % 3), seed=item)
            step = time.perf_counter()
            with pool.use("asr") as asr:
                text = str(asr.generate(input=audio)[0]["text"])
            timings["asr"] += time.perf_counter() - step
            step = time.perf_counter()
            with pool.use("llm") as llm:
                prompt = (
                    torch.tensor([list(text.encode("utf-8"))[:64] or [0]], device=target.torch)
                    % llm.vocab
                )
                reply = llm.generate(prompt, max_new_tokens=16)[0, prompt.shape[1] :]
            timings["llm"] += time.perf_counter() - step
            step = time.perf_counter()
            with pool.use("tts") as tts:
                wave = tts.synthesize(reply.to(target.torch))
            timings["tts"] += time.perf_counter() - step
            result.transcripts.append(text)
            if echo:
                print(
                    f"item {item + 1}/{items}: heard {text!r}, replied {reply.numel()} tokens, "
                    f"spoke {wave.numel() / 16000:.2f} s of audio"
                )
            sample()
        result.stage_seconds = timings
        result.evictions = pool.status().evictions
        result.loads = sum(pool[s].stats.loads for s in STAGES)
        result.wakes = sum(pool[s].stats.wakes for s in STAGES)
    finally:
        stop.set()
        sampling.join()
        unsubscribe()
        pool.close()
    result.samples.sort()
    result.seconds = time.perf_counter() - started
    return result


def plot(result: DemoResult, path: Path) -> None:
    """Draw memory over time (charged by the pool, process RSS) with the events marked."""
    from vramkit._optional import require

    matplotlib = require("matplotlib", "vramkit demo --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 4.5), dpi=110)
    if result.samples:
        times = [t for t, _, _ in result.samples]
        axis.step(
            times,
            [c / MiB for _, c, _ in result.samples],
            where="post",
            label="charged to the pool",
            color="tab:blue",
            linewidth=2,
        )
        base = min(p for _, _, p in result.samples)
        axis.step(
            times,
            [(p - base) / MiB for _, _, p in result.samples],
            where="post",
            label="process memory (above its low)",
            color="tab:gray",
            alpha=0.7,
        )
    axis.axhline(result.budget_bytes / MiB, color="tab:red", linestyle="--", label="budget")
    colours = {
        "load": "tab:green",
        "wake": "tab:cyan",
        "evict": "tab:orange",
        "offload": "tab:purple",
        "unload": "tab:brown",
    }
    marked: set[str] = set()
    for t, kind, model, _ in result.events:
        colour = colours.get(kind)
        if colour is None:
            continue
        axis.axvline(
            t, color=colour, alpha=0.35, linewidth=1, label=kind if kind not in marked else None
        )
        marked.add(kind)
        if kind in {"load", "wake"}:
            axis.annotate(
                model, (t, result.budget_bytes / MiB), rotation=90, fontsize=7, va="top", ha="right"
            )
    axis.set_xlabel("seconds")
    axis.set_ylabel("MiB")
    axis.set_title(
        f"vramkit demo: {result.items} items, asr -> llm -> tts on {result.device} "
        f"under a {_fmt(result.budget_bytes)} budget"
    )
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
