"""The pipeline: ASR -> LLM -> TTS through one pool, and the record of what the pool did."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramkit.demo._models import _third_party_quiet, _torch_loader, build_models, default_cache_dir

if TYPE_CHECKING:
    import torch

    from vramkit.devices import Device, DeviceLike
    from vramkit.pool import ModelPool
    from vramkit.testing.models import TinyCausalLM, TinyTTS


MiB = 1024**2
STAGES = ("asr", "llm", "tts")


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
