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

from vramkit.demo._models import LLM_MIB as LLM_MIB
from vramkit.demo._models import TTS_MIB as TTS_MIB
from vramkit.demo._models import build_models as build_models
from vramkit.demo._models import default_cache_dir as default_cache_dir
from vramkit.demo._options import add_arguments, run_demo
from vramkit.demo._options import check_arguments as check_arguments
from vramkit.demo._pipeline import STAGES as STAGES
from vramkit.demo._pipeline import (
    DemoResult,
    open_pool,
    read_back,
    run_pipeline,
    summarize,
    transcribe,
)
from vramkit.demo._pipeline import MiB as MiB
from vramkit.demo._plot import EVENT_STYLES as EVENT_STYLES
from vramkit.demo._plot import STAGE_COLOURS as STAGE_COLOURS
from vramkit.demo._plot import plot as plot

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
