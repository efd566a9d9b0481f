"""Tests of vramkit.testing.models: the tiny offline FunASR, ONNX and torch models."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from vramkit.errors import InvalidArgumentError
from vramkit.testing import models as M
from vramkit.testing.models import funasr_dirs as funasr_dirs_module

FUNASR_BUILDERS: dict[str, Callable[..., Path]] = {
    "vad": M.build_funasr_vad,
    "punc": M.build_funasr_punc,
    "paraformer": M.build_funasr_paraformer,
    "sensevoice": M.build_funasr_sensevoice,
}
# full-width comma, full stop, question mark, enumeration comma; ASCII , . ?
PUNCTUATION = set("\uff0c\u3002\uff1f\u3001,.?")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """AutoModel calls torch.set_num_threads(ncpu): undo it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def funasr_dirs(
    funasr_module: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each FunASR kind built once per session."""
    root = tmp_path_factory.mktemp("funasr_models")
    return {kind: build(root / kind) for kind, build in FUNASR_BUILDERS.items()}


@pytest.fixture(scope="session")
def load_funasr(funasr_module: ModuleType) -> Callable[..., Any]:
    """AutoModel with offline, quiet, single-thread settings."""

    def load(**kwargs: Any) -> Any:
        for key in ("model", "vad_model", "punc_model"):
            if key in kwargs:
                kwargs[key] = str(kwargs[key])
        return funasr_module.AutoModel(
            device="cpu", disable_update=True, disable_pbar=True, ncpu=1, **kwargs
        )

    return load


@pytest.fixture(scope="session")
def audio() -> np.ndarray[Any, Any]:
    return M.synthetic_audio()


# --------------------------------------------------------------------------- module


def test_import_does_not_pull_heavy_optional_packages() -> None:
    code = textwrap.dedent(
        """
        import sys
        import vramkit.testing.models
        print(sorted(m for m in ("funasr", "onnx", "onnxruntime", "sentencepiece")
                     if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_the_torch_models_need_no_numpy() -> None:
    # torch does not require numpy, and neither does vramkit: the README's
    # example imports TinyMLP, and audio names the extra that brings numpy.
    code = textwrap.dedent(
        """
        import sys
        import warnings
        warnings.simplefilter("ignore")  # torch warns that numpy is missing
        sys.modules["numpy"] = None
        from vramkit.errors import MissingDependencyError
        from vramkit.testing.models import TinyMLP, synthetic_audio
        print(sum(p.numel() for p in TinyMLP(8).parameters()))
        try:
            synthetic_audio(1.0)
        except MissingDependencyError as error:
            print(error)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    count, message = out.stdout.strip().splitlines()
    assert int(count) > 0
    assert "synthetic_audio needs the 'numpy' package" in message
    assert 'pip install "vramkit[funasr]"' in message


def test_all_is_the_public_api() -> None:
    public = {
        name
        for name, value in vars(M).items()
        if not name.startswith("_")
        and str(getattr(value, "__module__", "")).startswith(f"{M.__name__}.")
        and callable(value)
    }
    assert set(M.__all__) == public


# --------------------------------------------------------------------------- audio


def test_synthetic_audio_shape_range_and_determinism() -> None:
    a = M.synthetic_audio(1.5, 8000, seed=3)
    assert a.dtype == np.float32
    assert a.shape == (12000,)
    assert float(np.abs(a).max()) <= 1.0
    np.testing.assert_array_equal(a, M.synthetic_audio(1.5, 8000, seed=3))
    assert not np.array_equal(a, M.synthetic_audio(1.5, 8000, seed=4))
    # bursts (loud) and gaps (quiet): the first 0.1 s is near-silence
    assert float(np.abs(a[:400]).max()) < 0.05
    assert float(np.abs(a[1600:2800]).max()) > 0.3


@pytest.mark.parametrize(("seconds", "rate"), [(0.0, 16000), (-1.0, 16000), (1.0, 0)])
def test_synthetic_audio_rejects_bad_arguments(seconds: float, rate: int) -> None:
    with pytest.raises(InvalidArgumentError, match="seconds"):
        M.synthetic_audio(seconds, rate)


# --------------------------------------------------------------------------- FunASR


def test_funasr_dirs_hold_what_automodel_reads(funasr_dirs: dict[str, Path]) -> None:
    expected = {
        "vad": {"config.yaml", "model.pt", "am.mvn"},
        "punc": {"config.yaml", "model.pt", "tokens.json"},
        "paraformer": {"config.yaml", "model.pt", "tokens.json", "am.mvn"},
        "sensevoice": {"config.yaml", "model.pt", "bpe.model", "am.mvn"},
    }
    for kind, path in funasr_dirs.items():
        files = {p.name for p in path.iterdir()}
        assert expected[kind] <= files, kind
        assert M.funasr_dir_is_complete(path, kind=kind, seed=0)
        assert not M.funasr_dir_is_complete(path, kind=kind, seed=1)
        assert path.joinpath("model.pt").stat().st_size < 1_000_000  # tiny
        # no hidden temporary directory left next to it
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_loaded_weights_are_the_saved_weights(
    funasr_dirs: dict[str, Path], load_funasr: Callable[..., Any]
) -> None:
    # FunASR skips checkpoint tensors whose shape does not match the config
    # (ignore_init_mismatch), silently: check that every tensor was loaded.
    for kind, path in funasr_dirs.items():
        saved = torch.load(path / "model.pt", map_location="cpu")
        loaded = load_funasr(model=path).model.state_dict()
        assert saved.keys() == loaded.keys(), kind
        for key, value in saved.items():
            assert torch.equal(value, loaded[key]), (kind, key)


def test_vad_finds_one_segment_per_burst(
    funasr_dirs: dict[str, Path], load_funasr: Callable[..., Any]
) -> None:
    vad = load_funasr(model=funasr_dirs["vad"])
    assert isinstance(vad.kwargs["frontend"].cmvn, torch.Tensor)  # am.mvn was read
    for seconds, bursts in [(1.0, 2), (2.0, 5)]:
        segments = vad.generate(M.synthetic_audio(seconds))[0]["value"]
        assert len(segments) == bursts, segments
        for i, (start, end) in enumerate(segments):
            # ms: 0.1 s lead, then 0.25 s bursts and 0.2 s gaps, the last one cut short
            burst_start, burst_end = 100 + 450 * i, min(350 + 450 * i, seconds * 1000)
            assert start < (burst_start + burst_end) / 2 < end
        assert segments == vad.generate(M.synthetic_audio(seconds))[0]["value"]


def test_punctuation_model(funasr_dirs: dict[str, Path], load_funasr: Callable[..., Any]) -> None:
    punc = load_funasr(model=funasr_dirs["punc"])
    text = "你好世界今天天气很不错我们一起去公园散步吧"
    result = punc.generate(text)[0]
    assert "".join(c for c in result["text"] if c not in PUNCTUATION) == text
    assert result["text"].endswith("。")
    assert isinstance(result["punc_array"], torch.Tensor)  # results keep tensors
    assert len(result["punc_array"]) == len(text)
    assert punc.generate(text)[0]["text"] == result["text"]
    # English words are in the vocabulary too
    assert punc.generate("hello world the quick brown fox")[0]["text"]


def test_paraformer_transcribes_to_known_characters(
    funasr_dirs: dict[str, Path],
    load_funasr: Callable[..., Any],
    audio: np.ndarray[Any, Any],
) -> None:
    asr = load_funasr(model=funasr_dirs["paraformer"])
    text = asr.generate(audio)[0]["text"]
    tokens = json.loads((funasr_dirs["paraformer"] / "tokens.json").read_text("utf-8"))
    assert text
    assert set(text) <= set(tokens)
    assert asr.generate(audio)[0]["text"] == text
    # the CMVN file reached the frontend, as a plain tensor attribute
    assert isinstance(asr.kwargs["frontend"].cmvn, torch.Tensor)


def test_sensevoice_generates_with_language_and_itn(
    funasr_dirs: dict[str, Path],
    load_funasr: Callable[..., Any],
    audio: np.ndarray[Any, Any],
) -> None:
    sv = load_funasr(model=funasr_dirs["sensevoice"])
    first = sv.generate(audio, language="en", use_itn=True)[0]["text"]
    assert isinstance(first, str)
    assert first.strip()
    assert sv.generate(audio, language="en", use_itn=True)[0]["text"] == first
    assert isinstance(sv.generate(audio, language="auto")[0]["text"], str)


def test_vad_asr_punc_pipeline_end_to_end(
    funasr_module: ModuleType,
    tmp_path_factory: pytest.TempPathFactory,
    load_funasr: Callable[..., Any],
) -> None:
    dirs = M.build_funasr_pipeline(tmp_path_factory.mktemp("pipeline"))
    am = load_funasr(model=dirs.asr, vad_model=dirs.vad, punc_model=dirs.punc)
    for seconds in (1.0, 3.0):
        result = am.generate(M.synthetic_audio(seconds), batch_size_s=60)
        assert len(result) == 1
        text = result[0]["text"]
        assert text
        assert text[-1] in PUNCTUATION
        assert am.generate(M.synthetic_audio(seconds), batch_size_s=60)[0]["text"] == text


def test_pipeline_reuses_complete_builds_and_replaces_broken_ones(
    funasr_module: ModuleType, tmp_path: Path
) -> None:
    dirs = M.build_funasr_pipeline(tmp_path)
    assert {dirs.asr.name, dirs.vad.name, dirs.punc.name} == {"asr", "vad", "punc"}

    def stamps() -> dict[str, int]:
        return {
            p.name: (p / "model.pt").stat().st_mtime_ns for p in (dirs.asr, dirs.vad, dirs.punc)
        }

    before = stamps()
    assert M.build_funasr_pipeline(tmp_path) == dirs
    assert stamps() == before  # nothing rebuilt

    # a directory without a finished build (crash, or someone else's files)
    (dirs.punc / funasr_dirs_module._MANIFEST).unlink()
    assert not M.funasr_dir_is_complete(dirs.punc)
    M.build_funasr_pipeline(tmp_path)
    after = stamps()
    assert M.funasr_dir_is_complete(dirs.punc, kind="punc", seed=0)
    assert after["asr"] == before["asr"]
    assert after["vad"] == before["vad"]

    # another seed is another build
    M.build_funasr_pipeline(tmp_path, seed=1)
    assert all(M.funasr_dir_is_complete(p, seed=1) for p in (dirs.asr, dirs.vad, dirs.punc))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_nothing_behind(
    funasr_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "vad"

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        M.build_funasr_vad(target)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    M.build_funasr_vad(target)
    stamp = (target / "model.pt").stat().st_mtime_ns
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        M.build_funasr_vad(target)  # a failed rebuild keeps the old directory
    assert (target / "model.pt").stat().st_mtime_ns == stamp
    assert M.funasr_dir_is_complete(target, kind="vad")
    assert [p.name for p in tmp_path.iterdir()] == ["vad"]


@pytest.mark.parametrize("kind", sorted(FUNASR_BUILDERS))
def test_funasr_builds_are_deterministic(
    funasr_module: ModuleType, tmp_path: Path, kind: str
) -> None:
    build = FUNASR_BUILDERS[kind]
    a, b, c = build(tmp_path / "a"), build(tmp_path / "b"), build(tmp_path / "c", seed=1)
    sa, sb, sc = (torch.load(p / "model.pt", map_location="cpu") for p in (a, b, c))
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    for name in ("config.yaml", "tokens.json", "bpe.model", "am.mvn"):
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_funasr_build_leaves_global_state_alone(funasr_module: ModuleType, tmp_path: Path) -> None:
    # build_model seeds all three global generators and sets torch's threads
    threads = torch.get_num_threads()
    torch_state = torch.random.get_rng_state()
    np.random.seed(7)
    random.seed(7)
    M.build_funasr_paraformer(tmp_path / "asr", seed=5)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.random() == np.random.RandomState(7).random()
    assert random.random() == random.Random(7).random()


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def ort() -> Any:
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def _session(ort: ModuleType, path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_mlp_runs_in_onnxruntime(ort: ModuleType, tmp_path: Path) -> None:
    path = M.build_onnx_mlp(tmp_path / "mlp.onnx", hidden=32, layers=3)
    assert path == tmp_path / "mlp.onnx"
    sess = _session(ort, path)
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert sess.get_inputs()[0].shape == ["batch", 16]
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (5, 4)
    assert y.dtype == np.float32

    again = M.build_onnx_mlp(tmp_path / "again.onnx", hidden=32, layers=3)
    np.testing.assert_array_equal(_session(ort, again).run(None, {"x": x})[0], y)
    other = M.build_onnx_mlp(tmp_path / "other.onnx", hidden=32, layers=3, seed=1)
    assert not np.array_equal(_session(ort, other).run(None, {"x": x})[0], y)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_onnx_matmul_chain_size_and_shape(ort: ModuleType, tmp_path: Path) -> None:
    import onnx

    path = M.build_onnx_matmul_chain(tmp_path / "chain.onnx", mib=4)
    model = onnx.load(str(path))
    weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert weight_bytes == 4 * 2**20
    sess = _session(ort, path)
    n = sess.get_inputs()[0].shape[1]
    assert n == 1024
    (y,) = sess.run(None, {"x": np.ones((2, n), np.float32)})
    assert y.shape == (2, n)
    assert np.isfinite(y).all()

    small = M.build_onnx_matmul_chain(tmp_path / "small.onnx", mib=0.75, n=128)
    (y,) = _session(ort, small).run(None, {"x": np.ones((3, 128), np.float32)})
    assert y.shape == (3, 128)
    assert os.path.getsize(small) == pytest.approx(0.75 * 2**20, rel=0.01)


def test_onnx_builders_reject_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        M.build_onnx_mlp(tmp_path / "x.onnx", layers=0)
    with pytest.raises(InvalidArgumentError):
        M.build_onnx_matmul_chain(tmp_path / "x.onnx", mib=0)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- torch

TORCH_FACTORIES: dict[str, Callable[..., Any]] = {
    "mlp": M.tiny_mlp,
    "mlp_tied": lambda mib, seed=0: M.tiny_mlp(mib, tied=True, seed=seed),
    "lm": M.tiny_causal_lm,
    "tts": M.tiny_tts,
}


def _run(name: str, model: Any) -> Any:
    if name.startswith("mlp"):
        dim = model.dim
        with torch.no_grad():
            out: torch.Tensor = model(torch.linspace(-1, 1, 2 * dim).reshape(2, dim))
        return out
    if name == "lm":
        return model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    return model.synthesize(torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
@pytest.mark.parametrize("mib", [1.0, 8.0])
def test_torch_model_size_is_close_to_target(name: str, mib: float) -> None:
    model = TORCH_FACTORIES[name](mib)
    assert M.module_nbytes(model) == pytest.approx(mib * 2**20, rel=0.10)
    assert not model.training


@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
def test_torch_models_are_deterministic(name: str) -> None:
    factory = TORCH_FACTORIES[name]
    a, b, c = factory(1.0), factory(1.0), factory(1.0, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    out = _run(name, a)
    assert torch.equal(out, _run(name, a))
    assert torch.equal(out, _run(name, b))
    assert not out.requires_grad


@pytest.mark.parametrize("dim", [1, 7, 24, 101])
def test_closed_form_parameter_counts_match_the_models(dim: int) -> None:
    lm = M.TinyCausalLM(vocab=30, dim=dim, layers=2, max_seq_len=16)
    assert sum(p.numel() for p in lm.parameters()) == M.TinyCausalLM.num_parameters(
        30, dim, 2, max_seq_len=16
    )
    tts = M.TinyTTS(vocab=30, dim=dim, layers=3, n_mels=12, upsample=(4, 3))
    assert sum(p.numel() for p in tts.parameters()) == M.TinyTTS.num_parameters(
        30, dim, 3, n_mels=12, upsample=(4, 3)
    )


def test_builders_leave_the_global_torch_generator_alone() -> None:
    state = torch.random.get_rng_state()
    M.tiny_mlp(0.5, seed=3)
    M.tiny_causal_lm(0.5, seed=3)
    M.tiny_tts(0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tied_weights_share_one_parameter() -> None:
    model = M.tiny_mlp(4.0, layers=4, tied=True)
    first: Any = model.layers[0]
    last: Any = model.layers[-1]
    assert first.weight is last.weight
    assert first.weight.data_ptr() == last.weight.data_ptr()
    named = dict(model.named_parameters())
    assert "layers.3.weight" not in named  # listed once, under the first owner
    with torch.no_grad():
        first.weight[0, 0] = 42.0
    assert last.weight[0, 0].item() == 42.0
    # counted once: a tied model of the same size is wider than an untied one
    untied = M.tiny_mlp(4.0, layers=4)
    assert model.dim > untied.dim
    assert "scale" in dict(model.named_buffers())


def test_causal_lm_generate() -> None:
    lm = M.TinyCausalLM(vocab=50, dim=24, layers=1, max_seq_len=8).eval()
    out = lm.generate(torch.tensor([1, 2, 3]), max_new_tokens=10)  # past max_seq_len
    assert out.shape == (13,)
    assert out[:3].tolist() == [1, 2, 3]
    assert int(out.max()) < 50
    batch = lm.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2)
    assert batch.shape == (2, 4)
    assert lm(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50)


def test_tts_synthesize() -> None:
    tts = M.TinyTTS(vocab=40, dim=16, frames_per_token=3, upsample=(4, 5)).eval()
    wave = tts.synthesize(torch.tensor([1, 2, 3, 4]))
    assert wave.shape == (4 * 3 * 20,)
    assert wave.dtype == torch.float32
    assert float(wave.abs().max()) <= 1.0
    assert tts.synthesize(torch.tensor([[1, 2], [3, 4]])).shape == (2, 2 * 3 * 20)
    assert tts.mel(torch.tensor([[1, 2]])).shape == (1, 20, 6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.tiny_mlp(0),
        lambda: M.tiny_causal_lm(-1),
        lambda: M.tiny_tts(float("nan")),
        lambda: M.TinyMLP(8, 1, tied=True),
        lambda: M.tiny_mlp(1.0, layers=1, tied=True),
        lambda: M.TinyCausalLM(dim=10, heads=3),
    ],
)
def test_torch_builders_reject_bad_arguments(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidArgumentError):
        call()
