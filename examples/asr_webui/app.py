"""The example web app: audio -> FunASR transcript -> LM "summary" -> TTS "read-back".

The three models are the demo's tiny random-weight stand-ins, in one
``ModelPool`` whose budget is smaller than their sum, so the pool evicts and
wakes them as requests move through; the memory panel in the second tab
shows it and frees memory on demand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import string
import time
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

from vramkit import Controls, ModelPool
from vramkit.demo import read_back, summarize, transcribe
from vramkit.integrations.gradio import memory_panel

SAMPLE_RATE = 16000  # what the ASR model's frontend expects

NOTICE = """\
Upload or record a clip: FunASR transcribes it, a small language model "summarises" the
transcript and a small TTS model reads the summary back. **The three models are
random-weight stand-ins, built offline on the first run: the transcript and the summary
are gibberish by design, and the read-back is noise.** What is real is the memory: the
three share a pool whose budget is smaller than their sum, so the pool evicts and wakes
them as requests go through. Watch it, and free memory, in the *Memory* tab.
"""

Transcriber = Callable[[Any, np.ndarray], str]


class Pipeline:
    """ASR -> LLM -> TTS over the pool, one lease per stage, in named worker threads.

    The threads' name (``transcription_N``) is what a busy model's message
    names as the holder of its lease.

    Args:
        pool: A pool holding ``asr``, ``llm`` and ``tts`` (see ``vramkit.demo.open_pool``).
        transcribe: The ASR stage, called inside the ``asr`` lease (tests pass one
            that waits, to press buttons while a request holds the model).
    """

    def __init__(self, pool: ModelPool, transcribe: Transcriber = transcribe) -> None:
        self.pool = pool
        self.transcribe = transcribe
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="transcription"
        )
        self._requests = itertools.count(1)

    async def submit(self, audio: tuple[int, np.ndarray] | None) -> tuple[Any, ...]:
        """The button's handler: run off the event loop, so the page stays live."""
        if audio is None:
            raise gr.Error("Upload or record some audio first.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self.run, *audio)

    def run(self, rate: int, samples: np.ndarray) -> tuple[str, str, tuple[int, np.ndarray], str]:
        """Transcript, summary, read-back (``(sample rate, int16 samples)``) and a status line."""
        number = next(self._requests)
        clip = to_model_audio(rate, samples)
        seconds = {}
        started = time.perf_counter()
        with self.pool.use("asr") as asr:
            text = self.transcribe(asr, clip)
        seconds["asr"], started = time.perf_counter() - started, time.perf_counter()
        with self.pool.use("llm") as llm:
            reply = summarize(llm, text)
        seconds["llm"], started = time.perf_counter() - started, time.perf_counter()
        with self.pool.use("tts") as tts:
            wave = read_back(tts, reply)
            rate_out = int(tts.sample_rate)
        seconds["tts"] = time.perf_counter() - started
        status = f"request {number} done: " + " · ".join(
            f"{stage} {value:.2f} s" for stage, value in seconds.items()
        )
        speech = (rate_out, to_pcm16(wave.detach().cpu().numpy()))
        return text, to_text(reply.tolist()), speech, status

    def close(self) -> None:
        """Stop the worker threads (after the running requests)."""
        self._threads.shutdown(wait=True)


def to_model_audio(rate: int, samples: np.ndarray) -> np.ndarray:
    """Gradio's audio (int PCM, maybe stereo, any rate) as 16 kHz mono float32 in [-1, 1]."""
    data = np.asarray(samples)
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = data.astype(np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if rate != SAMPLE_RATE and data.size:
        positions = np.arange(round(data.size * SAMPLE_RATE / rate)) * (rate / SAMPLE_RATE)
        data = np.interp(positions, np.arange(data.size), data).astype(np.float32)
    return data


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """A float waveform as int16 PCM, scaled to its peak (silence stays silent)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak == 0.0:
        return np.zeros(wave.shape, dtype=np.int16)
    return (wave / peak * 32767).astype(np.int16)


_PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation + " ")


def to_text(tokens: list[int]) -> str:
    """The LM's byte tokens as text, keeping printable ASCII only (the rest is noise)."""
    text = "".join(c for c in (chr(t % 256) for t in tokens) if c in _PRINTABLE)
    return text or "(no printable text)"


def build_app(
    pipeline: Pipeline, *, controls: Controls | None = None, refresh: float = 2.0
) -> gr.Blocks:
    """The app: a *Transcribe* tab over the pipeline, and the memory panel in a *Memory* tab.

    Args:
        pipeline: The three stages over the demo's pool (``vramkit.demo.open_pool()``).
        controls: The controls the panel works through (default: new ones over the pool).
        refresh: Seconds between the panel's refreshes.

    Returns:
        The app, ready to ``launch()``.
    """
    app = gr.Blocks(title="vramkit: ASR -> LLM -> TTS")
    with app:
        gr.Markdown("## vramkit example: transcribe, summarise, read back")
        gr.Markdown(NOTICE, elem_id="asr-notice")
        with gr.Tab("Transcribe"):
            with gr.Row():
                audio = gr.Audio(
                    sources=["upload", "microphone"],
                    type="numpy",
                    label="Audio: upload a WAV file or record",
                    elem_id="asr-input",
                )
                with gr.Column():
                    transcript = gr.Textbox(
                        label="Transcript (ASR)", interactive=False, elem_id="asr-transcript"
                    )
                    summary = gr.Textbox(
                        label="Summary (LM)", interactive=False, elem_id="asr-summary"
                    )
                    speech = gr.Audio(
                        label="Read-back (TTS)", type="numpy", interactive=False, elem_id="asr-tts"
                    )
            run = gr.Button("Transcribe", variant="primary", elem_id="asr-run")
            status = gr.Textbox(label="Status", interactive=False, elem_id="asr-status")
        with gr.Tab("Memory", elem_id="memory-tab"):
            memory_panel(controls=controls or Controls(pipeline.pool), refresh=refresh)
        outputs = [transcript, summary, speech, status]
        run.click(pipeline.submit, [audio], outputs, concurrency_limit=2)
    return app


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts: nothing is fetched from the internet."""
    system = ("ui-sans-serif", "system-ui", "sans-serif")
    return gr.themes.Default(font=system, font_mono=("ui-monospace", "monospace"))
