"""Tiny, deterministic, offline models for vramkit's tests, benchmarks and demo.

Nothing here downloads anything. Every builder takes a ``seed`` and gives the
same weights for the same seed, and every model runs in well under a second on
a laptop CPU:

- FunASR model directories (``config.yaml`` + ``model.pt`` + token list,
  sentencepiece model or CMVN file) that ``funasr.AutoModel(model=str(path),
  device="cpu", disable_update=True)`` loads with no network:
  :func:`build_funasr_vad`, :func:`build_funasr_punc`,
  :func:`build_funasr_paraformer`, :func:`build_funasr_sensevoice` and
  :func:`build_funasr_pipeline` (VAD + ASR + punctuation, cached on disk).
- ONNX files for ONNX Runtime: :func:`build_onnx_mlp` and
  :func:`build_onnx_matmul_chain` (a chain of initializers of a chosen size).
- Pure-torch models sized in MiB: :class:`TinyMLP` / :func:`tiny_mlp`,
  :class:`TinyCausalLM` / :func:`tiny_causal_lm` and :class:`TinyTTS` /
  :func:`tiny_tts`, the three stages of the demo pipeline (ASR -> LLM -> TTS)
  and the weights of memory tests.

Importing this module is cheap: funasr (about seven seconds to import), onnx
and onnxruntime are imported only inside the functions that need them.

Example:
    >>> from vramkit.testing.models import tiny_mlp, module_nbytes
    >>> model = tiny_mlp(1.0, seed=0)
    >>> round(module_nbytes(model) / 2**20, 1)
    1.0
"""

from __future__ import annotations

from vramkit.testing.models.audio import synthetic_audio
from vramkit.testing.models.funasr_dirs import (
    FunasrPipelineDirs,
    build_funasr_paraformer,
    build_funasr_pipeline,
    build_funasr_punc,
    build_funasr_sensevoice,
    build_funasr_vad,
    funasr_dir_is_complete,
)
from vramkit.testing.models.onnx_files import build_onnx_matmul_chain, build_onnx_mlp
from vramkit.testing.models.tiny import (
    TinyCausalLM,
    TinyMLP,
    TinyTTS,
    module_nbytes,
    tiny_causal_lm,
    tiny_mlp,
    tiny_tts,
)

__all__ = [
    "FunasrPipelineDirs",
    "TinyCausalLM",
    "TinyMLP",
    "TinyTTS",
    "build_funasr_paraformer",
    "build_funasr_pipeline",
    "build_funasr_punc",
    "build_funasr_sensevoice",
    "build_funasr_vad",
    "build_onnx_matmul_chain",
    "build_onnx_mlp",
    "funasr_dir_is_complete",
    "module_nbytes",
    "synthetic_audio",
    "tiny_causal_lm",
    "tiny_mlp",
    "tiny_tts",
]
