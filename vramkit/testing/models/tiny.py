"""Pure-torch models sized in MiB: the MLP of memory tests and the demo's LLM and TTS stages."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vramkit.errors import InvalidArgumentError

__all__ = [
    "TinyCausalLM",
    "TinyMLP",
    "TinyTTS",
    "module_nbytes",
    "tiny_causal_lm",
    "tiny_mlp",
    "tiny_tts",
]

_MIB = 1 << 20


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
