"""The stand-in models: built once, offline, into a cache, and loaded the way a user's are.

A FunASR VAD + ASR + punctuation pipeline, a small causal language model and a
small TTS-like model, all with random weights; and the filter that keeps
FunASR's banners out of the demo's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

LLM_MIB = 96.0
TTS_MIB = 48.0


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
