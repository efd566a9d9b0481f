"""FunASR model directories that ``funasr.AutoModel`` loads offline: VAD, ASR, punctuation."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vramkit._optional import require
from vramkit.adapters.funasr import funasr_side_effects_undone, import_funasr

__all__ = [
    "FunasrPipelineDirs",
    "build_funasr_paraformer",
    "build_funasr_pipeline",
    "build_funasr_punc",
    "build_funasr_sensevoice",
    "build_funasr_vad",
    "funasr_dir_is_complete",
]


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
