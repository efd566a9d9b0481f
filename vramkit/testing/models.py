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

import contextlib
import copy
import io
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vramkit._optional import require
from vramkit.adapters.funasr import funasr_side_effects_undone, import_funasr
from vramkit.errors import InvalidArgumentError

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

_MIB = 1 << 20

# --------------------------------------------------------------------------- audio


def synthetic_audio(
    seconds: float = 1.0, sample_rate: int = 16000, seed: int = 0
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Make a deterministic test signal: sine bursts separated by near-silence.

    The signal starts with 0.1 s of quiet, then alternates 0.25 s tone bursts
    (a different pitch each, faded in and out) with 0.2 s gaps, over a little
    white noise everywhere, so a VAD finds one segment per burst.

    Args:
        seconds: Length of the signal in seconds (> 0).
        sample_rate: Samples per second (> 0).
        seed: Seed of the noise.

    Returns:
        A float32 mono waveform in ``[-1, 1]``, shape ``(round(seconds * sample_rate),)``.

    Raises:
        InvalidArgumentError: ``seconds`` or ``sample_rate`` is not positive.
    """
    if not seconds > 0 or sample_rate <= 0:
        raise InvalidArgumentError(
            f"synthetic_audio needs seconds > 0 and sample_rate > 0, "
            f"got seconds={seconds!r}, sample_rate={sample_rate!r}"
        )
    n = round(seconds * sample_rate)
    rng = np.random.default_rng(seed)
    audio = rng.normal(0.0, 0.002, n)
    t = np.arange(n) / sample_rate
    lead, burst, gap = 0.1, 0.25, 0.2
    fade = max(int(0.01 * sample_rate), 1)
    start, k = lead, 0
    while start < seconds:
        i0, i1 = int(start * sample_rate), min(int((start + burst) * sample_rate), n)
        if i1 - i0 > 2 * fade:
            freq = 220.0 * (1 + k % 4)
            env = np.ones(i1 - i0)
            ramp = np.linspace(0.0, 1.0, fade)
            env[:fade], env[-fade:] = ramp, ramp[::-1]
            audio[i0:i1] += 0.5 * env * np.sin(2 * np.pi * freq * t[i0:i1])
        start += burst + gap
        k += 1
    result: np.ndarray[Any, np.dtype[np.float32]] = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return result


# --------------------------------------------------------------------------- FunASR

# Manifest written last into every FunASR directory built here: a directory
# without it (or with another kind or seed) is not a complete build.
_MANIFEST = "vramkit_model.json"
_MANIFEST_FORMAT = 1

# Chinese characters: Paraformer's sentence post-processing joins them without
# spaces and the punctuation model splits them back one by one, so the ASR's
# output is always text the punctuation model can read.
_ASR_CHARS = "你好世界今天气很不错我们一起去公园散步吧这是测试模型的声音识别"
_SENSEVOICE_CORPUS = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a tiny model for tests",
    "speech to text and back again",
    "memory comes back after unload",
    "one two three four five six seven eight nine ten",
)
# Frontends: 16 mel bins; the VAD stacks 5 frames (LFR 5/1), the speech
# models 7, keeping every 6th (LFR 7/6). CMVN files need the stacked size.
_N_MELS = 16
_VAD_LFR_M = 5
_SPEECH_LFR_M = 7
_VAD_FEATURES = _N_MELS * _VAD_LFR_M
_SPEECH_FEATURES = _N_MELS * _SPEECH_LFR_M

# Punctuation classes: none, then the full-width comma, full stop, question
# mark and enumeration comma, as in the real model (escaped: they look like ASCII).
_PUNC_LIST = ["<unk>", "_", "\uff0c", "\u3002", "\uff1f", "\u3001"]


@dataclass(frozen=True)
class FunasrPipelineDirs:
    """The three model directories of a FunASR VAD + ASR + punctuation pipeline.

    Attributes:
        asr: Paraformer directory (``model=``).
        vad: FSMN VAD directory (``vad_model=``).
        punc: CT-Transformer punctuation directory (``punc_model=``).
    """

    asr: Path
    vad: Path
    punc: Path

    def automodel_kwargs(self) -> dict[str, Any]:
        """The three as ``model``, ``vad_model`` and ``punc_model`` strings.

        For ``funasr.AutoModel(**dirs.automodel_kwargs(), device="cpu")`` or
        ``ManagedModel.from_funasr(**dirs.automodel_kwargs(), name="asr")``.
        """
        return {"model": str(self.asr), "vad_model": str(self.vad), "punc_model": str(self.punc)}


def _unique_chars(text: str) -> list[str]:
    return list(dict.fromkeys(text))


def _am_mvn(dim: int, mean: float, scale: float) -> str:
    """Kaldi nnet-style CMVN text, the format of FunASR's ``am.mvn``."""
    means = " ".join([f"{mean:g}"] * dim)
    scales = " ".join([f"{scale:g}"] * dim)
    return (
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {means} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scales} ]\n"
        "</Nnet>\n"
    )


def _train_sentencepiece(lines: tuple[str, ...], vocab_size: int) -> bytes:
    """Train a tiny BPE sentencepiece model in memory; same input, same bytes."""
    spm = require("sentencepiece", "build_funasr_sensevoice")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # no 240 KB NFKC table in the file
        minloglevel=2,
    )
    return buffer.getvalue()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def funasr_dir_is_complete(
    path: str | os.PathLike[str], kind: str | None = None, seed: int | None = None
) -> bool:
    """Tell whether ``path`` holds a complete FunASR directory built by this module.

    Args:
        path: Directory to check.
        kind: Expected kind (``"vad"``, ``"punc"``, ``"paraformer"``,
            ``"sensevoice"``), or None for any.
        seed: Expected seed, or None for any.

    Returns:
        True when the build manifest is there, matches ``kind`` and ``seed``,
        and every file it lists exists.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    if manifest is None or manifest.get("format") != _MANIFEST_FORMAT:
        return False
    if kind is not None and manifest.get("kind") != kind:
        return False
    if seed is not None and manifest.get("seed") != seed:
        return False
    files = manifest.get("files")
    if not isinstance(files, list):
        return False
    return all(isinstance(name, str) and (directory / name).is_file() for name in files)


def _publish_dir(tmp: Path, target: Path, *, replace: bool) -> None:
    """Move the finished ``tmp`` directory to ``target`` with renames only.

    A crash leaves either the old directory, or the new one, or a hidden
    temporary directory next to them; never a half-written ``target``.
    """
    old: Path | None = None
    if replace and target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name.rpartition('-')[2]}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old is not None:  # put the previous build back
            old.rename(target)
            raise
        # Someone else published first (another process filling the same
        # cache): keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class _FunasrSpec:
    """How to write one kind of FunASR directory."""

    config: Callable[[], dict[str, Any]]
    files: Callable[[], dict[str, bytes | str]]
    adjust: Callable[[Any], None]


def _build_funasr_dir(
    target: str | os.PathLike[str], *, kind: str, seed: int, replace: bool = True
) -> Path:
    """Write ``config.yaml``, the spec's files and a seeded ``model.pt`` into ``target``.

    The model is built the way ``AutoModel`` builds it (``AutoModel.build_model``
    with the same config), so the saved state dict has exactly the keys and
    shapes that loading expects. With ``replace=False`` an existing ``target``
    is kept and the new build discarded.
    """
    purpose = f"build_funasr_{kind}"
    funasr = import_funasr(purpose)  # first, so a missing extra is named
    yaml = require("yaml", purpose)  # a dependency of funasr
    spec = _FUNASR_SPECS[kind]
    config, files = spec.config(), spec.files()

    target_path = Path(target)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_path.name}.tmp-", dir=target_path.parent))
    try:
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        (tmp / "config.yaml").write_text(
            yaml.safe_dump(dict(config), allow_unicode=True, sort_keys=False), encoding="utf-8"
        )

        kwargs: dict[str, Any] = copy.deepcopy(dict(config))
        if "tokens.json" in files:
            kwargs["tokenizer_conf"]["token_list"] = str(tmp / "tokens.json")
        if "bpe.model" in files:
            kwargs["tokenizer_conf"]["bpemodel"] = str(tmp / "bpe.model")
        if "am.mvn" in files:
            kwargs["frontend_conf"]["cmvn_file"] = str(tmp / "am.mvn")
        kwargs.update(
            model=config["model"],
            device="cpu",
            seed=seed,
            ncpu=torch.get_num_threads(),
            disable_log=True,
        )
        with funasr_side_effects_undone():
            model, _ = funasr.AutoModel.build_model(**kwargs)
        model.eval()
        with torch.no_grad():
            spec.adjust(model)
        torch.save(model.state_dict(), tmp / "model.pt")
        del model

        manifest = {
            "format": _MANIFEST_FORMAT,
            "kind": kind,
            "seed": seed,
            "files": sorted([*files, "config.yaml", "model.pt"]),
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _publish_dir(tmp, target_path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target_path


def _vad_config() -> dict[str, Any]:
    n_mels, lfr_m = _N_MELS, _VAD_LFR_M
    return {
        "model": "FsmnVADStreaming",
        "model_conf": {
            "sample_rate": 16000,
            "detect_mode": 1,
            "max_end_silence_time": 150,
            "max_start_silence_time": 3000,
            "window_size_ms": 100,
            "sil_to_speech_time_thres": 50,
            "speech_to_sil_time_thres": 50,
            "speech_2_noise_ratio": 1.0,
            "do_extend": 1,
            "lookback_time_start_point": 20,
            "lookahead_time_end_point": 20,
            "max_single_segment_time": 60000,
            "snr_thres": -100.0,
            "noise_frame_num_used_for_snr": 100,
            # Energy gate: frames quieter than this are silence whatever the
            # network says. In FunASR's units (10*log10 of a 25 ms frame's
            # energy, samples in [-1, 1]) synthetic_audio()'s bursts are
            # ~17 dB and its noise floor ~-28 dB.
            "decibel_thres": -5.0,
            "speech_noise_thres": 0.6,
            "fe_prior_thres": 0.0001,
            "silence_pdf_num": 1,
            "sil_pdf_ids": [0],
            "speech_noise_thresh_low": -0.1,
            "speech_noise_thresh_high": 0.3,
            "output_frame_probs": False,
            "frame_in_ms": 10,
            "frame_length_ms": 25,
        },
        # At top level, a fixed end-of-speech silence also switches off the
        # dynamic silence schedule (which waits up to 2 s before cutting).
        "max_end_silence_time": 150,
        "encoder": "FSMN",
        "encoder_conf": {
            "input_dim": n_mels * lfr_m,
            "input_affine_dim": 32,
            "fsmn_layers": 2,
            "linear_dim": 32,
            "proj_dim": 16,
            "lorder": 4,
            "rorder": 0,
            "lstride": 1,
            "rstride": 0,
            "output_affine_dim": 32,
            "output_dim": 8,
        },
        "frontend": "WavFrontendOnline",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": n_mels,
            "frame_length": 25,
            "frame_shift": 10,
            "dither": 0.0,
            "lfr_m": lfr_m,
            "lfr_n": 1,
        },
    }


def _adjust_vad(model: Any) -> None:
    # Make the network say "speech" (silence pdf 0 nearly impossible) so that
    # the decibel gate alone decides: segments follow the signal's bursts.
    out = model.encoder.out_linear2.linear
    out.weight.mul_(0.01)
    out.bias.zero_()
    out.bias[0] = -8.0


def build_funasr_vad(target: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny FSMN VAD (``FsmnVADStreaming``) FunASR directory.

    Encoder ``FSMN``, frontend ``WavFrontendOnline`` (16 mel bins, LFR 5/1,
    CMVN from ``am.mvn``, no dither), about 30 KB of weights. The network is
    biased towards "speech" and an energy gate (``decibel_thres``) marks quiet
    frames as silence, so on :func:`synthetic_audio` it returns one segment
    per tone burst.

    Args:
        target: Directory to create; an existing one is replaced.
        seed: Seed of the weights.

    Returns:
        ``target`` as a :class:`~pathlib.Path`, ready for ``AutoModel(model=...)``
        or ``vad_model=``.
    """
    return _build_funasr_dir(target, kind="vad", seed=seed)


def _punc_tokens() -> list[str]:
    words = sorted({w for line in _SENSEVOICE_CORPUS for w in line.split()})
    return ["<s>", "</s>", *_unique_chars(_ASR_CHARS), *words, "<unk>"]


def _punc_config() -> dict[str, Any]:
    dim = 32
    return {
        "model": "CTTransformer",
        "model_conf": {
            "ignore_id": 0,
            "embed_unit": dim,
            "att_unit": dim,
            "dropout_rate": 0.0,
            "punc_list": list(_PUNC_LIST),
            "punc_weight": [1.0] * len(_PUNC_LIST),
            "sentence_end_id": 3,
        },
        "encoder": "SANMEncoder",
        "encoder_conf": {
            "input_size": dim,
            "output_size": dim,
            "attention_heads": 2,
            "linear_units": 64,
            "num_blocks": 2,
            "dropout_rate": 0.0,
            "positional_dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "input_layer": "pe",
            "normalize_before": True,
            "kernel_size": 5,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
            "padding_idx": 0,
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>"},
    }


def _adjust_punc(model: Any) -> None:
    # Class 0 is "<unk>", which the real model never predicts (it would be
    # pasted into the text): rule it out.
    model.decoder.bias[0] = -30.0
    # Favour "_" (no punctuation) so that marks are sparse, as in real text.
    model.decoder.bias[1] = 1.5


def build_funasr_punc(target: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny CT-Transformer punctuation FunASR directory.

    Model ``CTTransformer`` with a 2-block ``SANMEncoder`` (dim 32),
    ``CharTokenizer`` over ``tokens.json`` (the Paraformer's characters plus
    the SenseVoice corpus's English words), punctuation classes "none" and
    the full-width comma, full stop, question mark and enumeration comma
    (``_``, U+FF0C, U+3002, U+FF1F, U+3001). Results carry ``punc_array`` as
    a torch tensor, like the real model's.

    Args:
        target: Directory to create; an existing one is replaced.
        seed: Seed of the weights.

    Returns:
        ``target`` as a :class:`~pathlib.Path`, ready for ``AutoModel(model=...)``
        or ``punc_model=``.
    """
    return _build_funasr_dir(target, kind="punc", seed=seed)


def _paraformer_tokens() -> list[str]:
    return ["<blank>", "<s>", "</s>", *_unique_chars(_ASR_CHARS), "<unk>"]


def _speech_frontend_conf() -> dict[str, Any]:
    return {
        "fs": 16000,
        "window": "hamming",
        "n_mels": _N_MELS,
        "frame_length": 25,
        "frame_shift": 10,
        "lfr_m": _SPEECH_LFR_M,
        "lfr_n": 6,
        "dither": 0.0,
    }


def _paraformer_config() -> dict[str, Any]:
    dim = 32
    return {
        "model": "Paraformer",
        "model_conf": {
            "ctc_weight": 0.0,
            "lsm_weight": 0.1,
            "length_normalized_loss": True,
            "predictor_weight": 1.0,
            "predictor_bias": 1,
            "sampling_ratio": 0.75,
        },
        "encoder": "SANMEncoder",
        "encoder_conf": {
            "output_size": dim,
            "attention_heads": 2,
            "linear_units": 64,
            "num_blocks": 2,
            "dropout_rate": 0.0,
            "positional_dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "input_layer": "pe",
            "normalize_before": True,
            "kernel_size": 5,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            "attention_heads": 2,
            "linear_units": 64,
            "num_blocks": 2,
            "dropout_rate": 0.0,
            "positional_dropout_rate": 0.0,
            "self_attention_dropout_rate": 0.0,
            "src_attention_dropout_rate": 0.0,
            "att_layer_num": 2,
            "kernel_size": 5,
            "sanm_shfit": 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {
            "idim": dim,
            "threshold": 1.0,
            "l_order": 1,
            "r_order": 1,
            "tail_threshold": 0.45,
        },
        "frontend": "WavFrontend",
        "frontend_conf": _speech_frontend_conf(),
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


def _adjust_paraformer(model: Any) -> None:
    # Never emit <blank>, <s>, </s> or <unk>: every token the predictor fires
    # becomes a character, so the text is never empty.
    bias = model.decoder.output_layer.bias
    bias[:3] = -30.0
    bias[-1] = -30.0
    # About one token per two encoder frames (~8 characters a second).
    model.predictor.cif_output.weight.mul_(0.1)
    model.predictor.cif_output.bias.fill_(0.0)


def build_funasr_paraformer(target: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny Paraformer ASR FunASR directory.

    ``SANMEncoder`` and ``ParaformerSANMDecoder`` (2 blocks each, dim 32),
    ``CifPredictorV2``, ``WavFrontend`` (16 mel bins, LFR 7/6, CMVN from
    ``am.mvn``, no dither), ``CharTokenizer`` over Chinese characters, so the
    punctuation model of :func:`build_funasr_punc` reads its output. The text
    is nonsense but deterministic and never empty for speech.

    Args:
        target: Directory to create; an existing one is replaced.
        seed: Seed of the weights.

    Returns:
        ``target`` as a :class:`~pathlib.Path`, ready for ``AutoModel(model=...)``.
    """
    return _build_funasr_dir(target, kind="paraformer", seed=seed)


def _sensevoice_config() -> dict[str, Any]:
    dim = 32
    return {
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {
            "output_size": dim,
            "attention_heads": 2,
            "linear_units": 64,
            "num_blocks": 2,
            "tp_blocks": 1,
            "dropout_rate": 0.0,
            "positional_dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "input_layer": "pe",
            "normalize_before": True,
            "kernel_size": 5,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "frontend": "WavFrontend",
        "frontend_conf": _speech_frontend_conf(),
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


def _adjust_sensevoice(model: Any) -> None:
    # Keep the CTC from emitting <s> / </s> (ids 1, 2), which decode to
    # nothing; blank (id 0, <unk>) stays possible, as CTC needs it.
    model.ctc.ctc_lo.bias[1:3] = -30.0


def build_funasr_sensevoice(target: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny SenseVoiceSmall FunASR directory.

    ``SenseVoiceEncoderSmall`` (2 + 1 blocks, dim 32), ``WavFrontend`` (16
    mel bins, LFR 7/6, CMVN from ``am.mvn``), ``SentencepiecesTokenizer`` over
    a BPE model trained here on a few English sentences (``bpe.model``).
    ``generate(..., language="en", use_itn=True)`` works; the text is
    nonsense but deterministic.

    Args:
        target: Directory to create; an existing one is replaced.
        seed: Seed of the weights.

    Returns:
        ``target`` as a :class:`~pathlib.Path`, ready for ``AutoModel(model=...)``.
    """
    return _build_funasr_dir(target, kind="sensevoice", seed=seed)


_FUNASR_SPECS: dict[str, _FunasrSpec] = {
    "vad": _FunasrSpec(
        _vad_config,
        lambda: {"am.mvn": _am_mvn(_VAD_FEATURES, mean=-10.0, scale=0.2)},
        _adjust_vad,
    ),
    "punc": _FunasrSpec(
        _punc_config,
        lambda: {"tokens.json": json.dumps(_punc_tokens(), ensure_ascii=False)},
        _adjust_punc,
    ),
    "paraformer": _FunasrSpec(
        _paraformer_config,
        lambda: {
            "tokens.json": json.dumps(_paraformer_tokens(), ensure_ascii=False),
            "am.mvn": _am_mvn(_SPEECH_FEATURES, mean=-10.0, scale=0.2),
        },
        _adjust_paraformer,
    ),
    "sensevoice": _FunasrSpec(
        _sensevoice_config,
        lambda: {
            "bpe.model": _train_sentencepiece(_SENSEVOICE_CORPUS, vocab_size=48),
            "am.mvn": _am_mvn(_SPEECH_FEATURES, mean=-10.0, scale=0.2),
        },
        _adjust_sensevoice,
    ),
}


def build_funasr_pipeline(root: str | os.PathLike[str], *, seed: int = 0) -> FunasrPipelineDirs:
    """Build (or reuse) the VAD, Paraformer and punctuation directories under ``root``.

    A model whose directory already holds a complete build with the same seed
    is kept as it is, so a session-scoped fixture or ``vramkit demo`` pays the
    build once. Each directory is built in a temporary directory next to it
    and renamed into place, so an interrupted build never counts as complete.

    Args:
        root: Parent directory; ``asr/``, ``vad/`` and ``punc/`` go under it.
        seed: Seed of the weights of all three.

    Returns:
        The three paths, for ``AutoModel(model=dirs.asr, vad_model=dirs.vad,
        punc_model=dirs.punc)`` (as strings).
    """
    base = Path(root)
    dirs = FunasrPipelineDirs(asr=base / "asr", vad=base / "vad", punc=base / "punc")
    for path, kind in ((dirs.vad, "vad"), (dirs.asr, "paraformer"), (dirs.punc, "punc")):
        if not funasr_dir_is_complete(path, kind=kind, seed=seed):
            # Replace only what is there and incomplete: if another process
            # publishes first while this one builds, its directory is kept.
            _build_funasr_dir(path, kind=kind, seed=seed, replace=path.exists())
    return dirs


# --------------------------------------------------------------------------- ONNX

_ONNX_OPSET = 17  # ONNX Runtime >= 1.14 runs it
_ONNX_IR_VERSION = 8


def _save_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    onnx = require("onnx", "build_onnx_*")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp_name)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return target


def _onnx_model(graph: Any) -> Any:
    onnx = require("onnx", "build_onnx_*")
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="vramkit.testing",
    )
    model.ir_version = _ONNX_IR_VERSION
    return model


def build_onnx_mlp(
    path: str | os.PathLike[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    in_features: int = 16,
    out_features: int = 4,
    seed: int = 0,
) -> Path:
    """Write a small MLP as an ONNX file (MatMul + Add, Relu between layers).

    Input ``x``: float32 ``[batch, in_features]``; output ``y``: float32
    ``[batch, out_features]``. ``layers`` counts the weight matrices
    (``layers - 1`` hidden layers of width ``hidden``).

    Args:
        path: File to write (replaced atomically if it exists).
        hidden: Width of the hidden layers.
        layers: Number of linear layers (>= 1).
        in_features: Width of the input.
        out_features: Width of the output.
        seed: Seed of the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidArgumentError: A size is not positive.
    """
    if min(hidden, layers, in_features, out_features) < 1:
        raise InvalidArgumentError(
            "build_onnx_mlp needs hidden, layers, in_features and out_features >= 1, got "
            f"{hidden=}, {layers=}, {in_features=}, {out_features=}"
        )
    onnx = require("onnx", "build_onnx_mlp")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(seed)
    widths = [in_features] + [hidden] * (layers - 1) + [out_features]
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        weight = (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)
        bias = (0.01 * rng.standard_normal(n_out)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(widths) - 2
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["y" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "vramkit_tiny_mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", out_features])],
        initializer=inits,
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)
    return _save_onnx(model, path)


def build_onnx_matmul_chain(
    path: str | os.PathLike[str], *, mib: float = 256, n: int | None = None, seed: int = 0
) -> Path:
    """Write a chain of square MatMuls whose weights total about ``mib`` MiB.

    Input ``x``: float32 ``[batch, n]``; output ``y``: float32 ``[batch, n]``.
    Each weight is an ``n x n`` float32 initializer scaled by ``1/sqrt(n)`` so
    activations keep their size along the chain. Without ``n``, it is the
    largest power of two up to 1024 whose matrix fits in ``mib``, and the
    number of matrices is ``round(mib MiB / matrix bytes)`` (256 MiB: 64
    matrices of 1024 x 1024).

    Args:
        path: File to write (replaced atomically if it exists).
        mib: Target size of all weights in MiB (> 0).
        n: Matrix side; None to choose as above.
        seed: Seed of the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidArgumentError: ``mib`` or ``n`` is not positive.
    """
    if not mib > 0 or (n is not None and n < 1):
        raise InvalidArgumentError(
            f"build_onnx_matmul_chain needs mib > 0 and n >= 1, got {mib=}, {n=}"
        )
    onnx = require("onnx", "build_onnx_matmul_chain")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    target_bytes = mib * _MIB
    if n is None:
        n = 1024
        while n > 8 and n * n * 4 > target_bytes:
            n //= 2
    count = max(1, round(target_bytes / (n * n * 4)))
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / math.sqrt(n))
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    for i in range(count):
        weight = rng.standard_normal((n, n), dtype=np.float32)
        weight *= scale
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        out = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "vramkit_matmul_chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", n])],
        initializer=inits,
    )
    return _save_onnx(_onnx_model(graph), path)


# --------------------------------------------------------------------------- torch


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, shared storage counted once.

    Args:
        module: Any ``nn.Module``.

    Returns:
        Total bytes of the distinct storages behind its parameters and buffers
        (tied weights count once).
    """
    seen: dict[tuple[str, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":  # no storage to share: count each tensor once
            seen[("meta", id(tensor))] = tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_target(target_mib: float, name: str) -> None:
    if not (isinstance(target_mib, int | float) and math.isfinite(target_mib) and target_mib > 0):
        raise InvalidArgumentError(f"{name} needs target_mib > 0, got {target_mib!r}")


def _fit_dim(size: Callable[[int], int], target_bytes: float, lo: int, hi: int) -> int:
    """The ``dim`` in ``[lo, hi]`` whose size (increasing in ``dim``) is closest to the target.

    Sizes come from closed-form parameter counts, not from models built on the
    ``meta`` device: initialising an embedding there imports ``torch._dynamo``
    (about 1.5 s).
    """
    if size(lo) >= target_bytes:
        return lo
    while lo < hi:  # smallest dim whose size reaches the target
        mid = (lo + hi) // 2
        if size(mid) < target_bytes:
            lo = mid + 1
        else:
            hi = mid
    below = max(lo - 1, 1)
    return lo if abs(size(lo) - target_bytes) <= abs(size(below) - target_bytes) else below


class TinyMLP(nn.Module):
    """A stack of square ``nn.Linear`` layers with ReLUs and a registered buffer.

    Made for memory tests and benchmarks: its size is almost all weights, and
    ``tied=True`` makes the last layer share the first layer's weight
    Parameter (one storage, two modules), the way tied embeddings do.

    Args:
        dim: Width of every layer.
        layers: Number of ``nn.Linear`` layers (>= 1; >= 2 with ``tied``).
        tied: Share one weight Parameter between the first and last layer.

    Example:
        >>> m = TinyMLP(8, 3, tied=True)
        >>> m.layers[0].weight is m.layers[-1].weight
        True
    """

    def __init__(self, dim: int, layers: int = 4, *, tied: bool = False) -> None:
        super().__init__()
        if dim < 1 or layers < (2 if tied else 1):
            raise InvalidArgumentError(
                f"TinyMLP needs dim >= 1 and layers >= {2 if tied else 1}, got {dim=}, {layers=}"
            )
        self.dim = dim
        self.tied = tied
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        if tied:
            self.layers[-1].weight = self.layers[0].weight
        self.scale: torch.Tensor
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers.

        Args:
            x: Input of shape ``(..., dim)``.

        Returns:
            Output of shape ``(..., dim)``.
        """
        x = x * self.scale
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def tiny_mlp(target_mib: float, seed: int = 0, *, layers: int = 4, tied: bool = False) -> TinyMLP:
    """Build a :class:`TinyMLP` of about ``target_mib`` MiB (float32, eval mode).

    Args:
        target_mib: Wanted size of parameters plus buffers in MiB (> 0).
        seed: Seed of the weights.
        layers: Number of linear layers.
        tied: Share the first layer's weight with the last one (see
            :class:`TinyMLP`); the size counts the shared weight once.

    Returns:
        The model, in eval mode, within a few percent of the target for
        targets of 0.1 MiB and more.
    """
    _check_target(target_mib, "tiny_mlp")
    if layers < (2 if tied else 1):
        raise InvalidArgumentError(
            f"tiny_mlp needs layers >= {2 if tied else 1}{' when tied' if tied else ''}, "
            f"got {layers=}"
        )
    unique = layers - 1 if tied else layers
    target = target_mib * _MIB / 4  # float32 elements
    # unique * dim^2 weights + layers * dim biases + dim buffer elements
    b = layers + 1
    dim = max(1, round((-b + math.sqrt(b * b + 4 * unique * target)) / (2 * unique)))
    with _seeded(seed):
        model = TinyMLP(dim, layers, tied=tied)
    return model.eval()


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        result: torch.Tensor = x + self.mlp(self.norm2(x))
        return result


def _heads_for(dim: int) -> int:
    for heads in (8, 4, 2):
        if dim % heads == 0 and dim // heads >= 8:
            return heads
    return 1


class TinyCausalLM(nn.Module):
    """A small GPT-style causal language model: embeddings, blocks, LM head.

    Stands in for the LLM of the demo pipeline. Tokens are plain integers in
    ``[0, vocab)`` (256 is enough for bytes of UTF-8 text). No dropout, so
    outputs depend only on the weights and the input.

    Args:
        vocab: Vocabulary size.
        dim: Model width.
        layers: Number of transformer blocks.
        heads: Attention heads (must divide ``dim``); None picks 8, 4, 2 or 1.
        max_seq_len: Longest context; ``generate`` keeps the last
            ``max_seq_len`` tokens.

    Example:
        >>> lm = TinyCausalLM(vocab=32, dim=16, layers=1).eval()
        >>> lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape
        torch.Size([1, 7])
    """

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 64,
        layers: int = 2,
        *,
        heads: int | None = None,
        max_seq_len: int = 128,
    ) -> None:
        super().__init__()
        heads = _heads_for(dim) if heads is None else heads
        if min(vocab, dim, layers, heads, max_seq_len) < 1 or dim % heads:
            raise InvalidArgumentError(
                "TinyCausalLM needs positive sizes and heads dividing dim, got "
                f"{vocab=}, {dim=}, {layers=}, {heads=}, {max_seq_len=}"
            )
        self.vocab = vocab
        self.max_seq_len = max_seq_len
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: int64 tensor ``(batch, seq)`` with ``seq <= max_seq_len``.

        Returns:
            Logits ``(batch, seq, vocab)``.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits

    @staticmethod
    def num_parameters(vocab: int, dim: int, layers: int, *, max_seq_len: int = 128) -> int:
        """Count the parameters of a model with these sizes, without building it.

        Args:
            vocab: Vocabulary size.
            dim: Model width.
            layers: Number of transformer blocks.
            max_seq_len: Longest context.

        Returns:
            The number of scalar parameters (float32: 4 bytes each).
        """
        # per block: 2 LayerNorms (4d), qkv (3d^2 + 3d), proj (d^2 + d),
        # MLP (8d^2 + 5d); outside: embeddings, final LayerNorm, head
        block = 12 * dim * dim + 13 * dim
        return layers * block + dim * (2 * vocab + max_seq_len + 2)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy decoding, recomputing the context each step (no KV cache).

        Args:
            input_ids: int64 tensor ``(batch, seq)`` or ``(seq,)``.
            max_new_tokens: Tokens to append (>= 0).

        Returns:
            The input followed by ``max_new_tokens`` generated tokens, with the
            input's number of dimensions.
        """
        squeeze = input_ids.dim() == 1
        ids = input_ids.unsqueeze(0) if squeeze else input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.max_seq_len :])
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids.squeeze(0) if squeeze else ids


def tiny_causal_lm(
    target_mib: float,
    seed: int = 0,
    *,
    vocab: int = 256,
    layers: int = 2,
    max_seq_len: int = 128,
) -> TinyCausalLM:
    """Build a :class:`TinyCausalLM` of about ``target_mib`` MiB (float32, eval mode).

    The width is chosen (any integer, heads adapted) so that the parameters
    come closest to the target; vocabulary, depth and context are fixed.

    Args:
        target_mib: Wanted size of the parameters in MiB (> 0).
        seed: Seed of the weights.
        vocab: Vocabulary size.
        layers: Number of transformer blocks.
        max_seq_len: Longest context.

    Returns:
        The model, in eval mode, within a few percent of the target for
        targets of 0.5 MiB and more.
    """
    _check_target(target_mib, "tiny_causal_lm")

    def size(dim: int) -> int:
        return 4 * TinyCausalLM.num_parameters(vocab, dim, layers, max_seq_len=max_seq_len)

    dim = _fit_dim(size, target_mib * _MIB, 1, 1 << 16)
    with _seeded(seed):
        model = TinyCausalLM(vocab, dim, layers, max_seq_len=max_seq_len)
    return model.eval()


class TinyTTS(nn.Module):
    """A toy text-to-speech model: token ids -> mel frames -> waveform.

    A 1-D convolutional text encoder, each token repeated to
    ``frames_per_token`` mel frames, and a small convolutional "vocoder" that
    upsamples each frame to ``hop`` samples (two transposed convolutions).
    Stands in for the TTS of the demo pipeline. No dropout.

    Args:
        vocab: Vocabulary size.
        dim: Width of the text encoder (the vocoder uses ``dim/2`` and ``dim/4``).
        layers: Convolutions in the text encoder.
        n_mels: Mel bins.
        frames_per_token: Mel frames per input token.
        upsample: The two upsampling factors; ``hop = upsample[0] * upsample[1]``.
        sample_rate: Nominal sample rate of the output (metadata only).

    Example:
        >>> tts = TinyTTS(vocab=32, dim=16).eval()
        >>> tts.synthesize(torch.tensor([1, 2, 3])).shape
        torch.Size([768])
    """

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 64,
        layers: int = 2,
        *,
        n_mels: int = 20,
        frames_per_token: int = 4,
        upsample: tuple[int, int] = (8, 8),
        sample_rate: int = 16000,
    ) -> None:
        super().__init__()
        if min(vocab, dim, layers, n_mels, frames_per_token, *upsample) < 1:
            raise InvalidArgumentError(
                "TinyTTS needs positive sizes, got "
                f"{vocab=}, {dim=}, {layers=}, {n_mels=}, {frames_per_token=}, {upsample=}"
            )
        self.frames_per_token = frames_per_token
        self.hop = upsample[0] * upsample[1]
        self.sample_rate = sample_rate
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.ModuleList(nn.Conv1d(dim, dim, 5, padding=2) for _ in range(layers))
        self.to_mel = nn.Conv1d(dim, n_mels, 1)
        c1, c2 = max(dim // 2, 1), max(dim // 4, 1)
        self.vocoder = nn.Sequential(
            nn.Conv1d(n_mels, dim, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.ConvTranspose1d(dim, c1, upsample[0], stride=upsample[0]),
            nn.LeakyReLU(0.1),
            nn.ConvTranspose1d(c1, c2, upsample[1], stride=upsample[1]),
            nn.LeakyReLU(0.1),
            nn.Conv1d(c2, 1, 7, padding=3),
            nn.Tanh(),
        )

    @staticmethod
    def num_parameters(
        vocab: int,
        dim: int,
        layers: int,
        *,
        n_mels: int = 20,
        upsample: tuple[int, int] = (8, 8),
    ) -> int:
        """Count the parameters of a model with these sizes, without building it.

        Args:
            vocab: Vocabulary size.
            dim: Width of the text encoder.
            layers: Convolutions in the text encoder.
            n_mels: Mel bins.
            upsample: The two upsampling factors.

        Returns:
            The number of scalar parameters (float32: 4 bytes each).
        """
        c1, c2 = max(dim // 2, 1), max(dim // 4, 1)
        embedding = vocab * dim
        text_encoder = layers * (5 * dim * dim + dim)
        to_mel = n_mels * dim + n_mels
        vocoder = (
            (3 * n_mels * dim + dim)
            + (upsample[0] * dim * c1 + c1)
            + (upsample[1] * c1 * c2 + c2)
            + (7 * c2 + 1)
        )
        return embedding + text_encoder + to_mel + vocoder

    def mel(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text to mel frames.

        Args:
            token_ids: int64 tensor ``(batch, tokens)``.

        Returns:
            Mel frames ``(batch, n_mels, tokens * frames_per_token)``.
        """
        x = self.embed(token_ids).transpose(1, 2)
        for conv in self.encoder:
            x = x + F.gelu(conv(x))
        x = x.repeat_interleave(self.frames_per_token, dim=2)
        mel: torch.Tensor = self.to_mel(x)
        return mel

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text to waveform.

        Args:
            token_ids: int64 tensor ``(batch, tokens)``.

        Returns:
            Waveform ``(batch, tokens * frames_per_token * hop)`` in ``[-1, 1]``.
        """
        wave: torch.Tensor = self.vocoder(self.mel(token_ids)).squeeze(1)
        return wave

    @torch.no_grad()
    def synthesize(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Synthesize a waveform without autograd.

        Args:
            token_ids: int64 tensor ``(tokens,)`` or ``(batch, tokens)``.

        Returns:
            float32 waveform ``(samples,)`` or ``(batch, samples)``, with
            ``samples = tokens * frames_per_token * hop``.
        """
        squeeze = token_ids.dim() == 1
        wave: torch.Tensor = self(token_ids.unsqueeze(0) if squeeze else token_ids)
        return wave.squeeze(0) if squeeze else wave


def tiny_tts(target_mib: float, seed: int = 0, *, vocab: int = 256, layers: int = 2) -> TinyTTS:
    """Build a :class:`TinyTTS` of about ``target_mib`` MiB (float32, eval mode).

    Args:
        target_mib: Wanted size of the parameters in MiB (> 0).
        seed: Seed of the weights.
        vocab: Vocabulary size.
        layers: Convolutions in the text encoder.

    Returns:
        The model, in eval mode, within a few percent of the target for
        targets of 0.5 MiB and more.
    """
    _check_target(target_mib, "tiny_tts")

    def size(dim: int) -> int:
        return 4 * TinyTTS.num_parameters(vocab, dim, layers)

    dim = _fit_dim(size, target_mib * _MIB, 1, 1 << 16)
    with _seeded(seed):
        model = TinyTTS(vocab, dim, layers)
    return model.eval()
