"""Tiny third-party models built offline, and the loaders people write for them.

Every model here is built from a config with random weights (seeded), saved
the way its library saves it, and loaded back the way users load it: Hugging
Face models with ``from_pretrained`` (which maps the safetensors file, so the
weights are file-backed), accelerate models with ``init_empty_weights`` and
``load_checkpoint_and_dispatch`` or ``cpu_offload``, FunASR pipelines with
``AutoModel``, ONNX Runtime with a file exported by ``torch.onnx.export``.
Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from vramkit.model import ManagedModel

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

IDS = torch.tensor([[1, 2, 3, 4]])
AUDIO_SECONDS = 1.0


def quiet_transformers() -> Any:
    """Import transformers with its progress bars and config chatter off."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _configs() -> dict[str, tuple[Any, Any]]:
    t = quiet_transformers()
    tokens = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return {
        "gpt2": (  # lm_head is tied to the token embedding (wte), the largest weight
            t.GPT2LMHeadModel,
            t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=32, **tokens),
        ),
        "whisper": (  # proj_out is tied to the decoder's token embedding
            t.WhisperForConditionalGeneration,
            t.WhisperConfig(
                vocab_size=64,
                num_mel_bins=8,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                d_model=16,
                max_source_positions=16,
                max_target_positions=16,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
            ),
        ),
        "llama": (
            t.LlamaForCausalLM,
            t.LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                **tokens,
            ),
        ),
        "bert": (
            t.BertModel,
            t.BertConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
            ),
        ),
    }


HF_KINDS = ("gpt2", "whisper", "llama", "bert")
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "hello"]


def save_hf_models(root: Path) -> dict[str, Path]:
    """Save each tiny Hugging Face model (and a BERT vocabulary) under ``root``."""
    found = {}
    for kind, (cls, config) in _configs().items():
        torch.manual_seed(0)
        target = root / kind
        cls(config).save_pretrained(target)
        found[kind] = target
    (root / "vocab.txt").write_text("\n".join(_VOCAB))
    found["vocab"] = root / "vocab.txt"
    return found


def hf_class(kind: str) -> Any:
    return _configs()[kind][0]


def hf_loader(path: Path, kind: str) -> Callable[[], torch.nn.Module]:
    """What a user writes: ``from_pretrained`` on the saved directory, in eval mode."""
    cls = hf_class(kind)

    def load() -> torch.nn.Module:
        return cls.from_pretrained(path).eval()  # type: ignore[no-any-return]

    load.__name__ = f"load_{kind}"
    return load


def hf_inputs(kind: str) -> dict[str, torch.Tensor]:
    if kind == "whisper":
        generator = torch.Generator().manual_seed(0)
        return {
            "input_features": torch.randn(1, 8, 32, generator=generator),
            "decoder_input_ids": torch.tensor([[1, 5, 6]]),
        }
    return {"input_ids": IDS}


def hf_run(kind: str, model: Any) -> torch.Tensor:
    """One forward pass; the tensor that must come back bit-identical after a round trip."""
    output = model(**hf_inputs(kind))
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output.last_hidden_state).detach().clone()


def bert_pipeline(paths: dict[str, Path]) -> Any:
    """A ``transformers.pipeline`` object (feature extraction) over the tiny BERT."""
    t = quiet_transformers()
    model = t.BertModel.from_pretrained(paths["bert"]).eval()
    tokenizer = t.BertTokenizer(str(paths["vocab"]))
    return t.pipeline("feature-extraction", model=model, tokenizer=tokenizer)


def pipeline_run(pipe: Any) -> torch.Tensor:
    return torch.tensor(pipe("hello abc"))


# ---------------------------------------------------------------------- accelerate


def dispatched_llama(path: Path, offload_folder: Path) -> torch.nn.Module:
    """``init_empty_weights`` + ``load_checkpoint_and_dispatch``: layer 1 offloaded to disk."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    cls, config = _configs()["llama"]
    with init_empty_weights():
        model = cls(config)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with _quiet():
        return load_checkpoint_and_dispatch(  # type: ignore[no-any-return]
            model, checkpoint=str(path), device_map=device_map, offload_folder=str(offload_folder)
        ).eval()


def cpu_offloaded_llama(path: Path) -> torch.nn.Module:
    """accelerate's ``cpu_offload``: weights in hooks, parameters on ``meta``."""
    from accelerate import cpu_offload

    model = hf_class("llama").from_pretrained(path).eval()
    return cpu_offload(model, execution_device=torch.device("cpu"))  # type: ignore[no-any-return]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with (
        open(os.devnull, "w") as sink,
        warnings.catch_warnings(),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------- plain torch


class Int8Linear(torch.nn.Module):
    """Weight-only int8 quantisation, as small LLM runtimes do: int8 buffer, float scale."""

    def __init__(self, features: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(features, features, generator=generator)
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = torch.nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale  # type: ignore[operator]
        return torch.nn.functional.linear(x, weight, self.bias)


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def export_onnx(path: Path) -> Path:
    """A torch model exported with ``torch.onnx.export`` (the TorchScript exporter)."""
    with _quiet():
        torch.onnx.export(
            tiny_mlp().eval(),
            (torch.ones(1, 32),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return path


# ---------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One model as a user would manage it, and how to check it computes the same."""

    name: str
    manage: Callable[[], ManagedModel[Any]]
    run: Callable[[Any], Any]
    torch_weights: bool = True  # False: an ONNX Runtime session (no torch tensors)


def same(a: Any, b: Any) -> bool:
    """Bit-identical outputs: tensors, arrays, strings."""
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


def funasr_text(model: Any) -> str:
    from vramkit.testing.models import synthetic_audio

    return str(model.generate(input=synthetic_audio(AUDIO_SECONDS))[0]["text"])


def onnx_run(session: Any) -> Any:
    return session.run(None, {"x": np.ones((2, 32), dtype=np.float32)})[0]


# ---------------------------------------------------------------------- proof of death


def storage_refs(tensors: Iterable[torch.Tensor]) -> list[StorageWeakRef]:
    """Weak references to the distinct storages behind ``tensors`` (meta ones skipped)."""
    found: dict[int, StorageWeakRef] = {}
    with torch._C.DisableTorchFunctionSubclass():
        for tensor in tensors:
            if tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            found.setdefault(storage._cdata, StorageWeakRef(storage))
    return list(found.values())


def weights_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor a loaded object holds, found the way vramkit's adapter finds them."""
    from vramkit.adapters import adapter_for

    return list(adapter_for(obj).tensors(obj))


def alive(refs: Iterable[StorageWeakRef]) -> int:
    return sum(not ref.expired() for ref in refs)
