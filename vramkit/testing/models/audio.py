"""Synthetic audio: deterministic waveforms for the speech models, no recordings needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vramkit._optional import require
from vramkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "synthetic_audio",
]


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
    # numpy is not a dependency of vramkit (nor of torch); the funasr extra,
    # which needs these waveforms, brings it.
    numpy = require("numpy", "synthetic_audio", extra="funasr")
    n = round(seconds * sample_rate)
    rng = numpy.random.default_rng(seed)
    audio = rng.normal(0.0, 0.002, n)
    t = numpy.arange(n) / sample_rate
    lead, burst, gap = 0.1, 0.25, 0.2
    fade = max(int(0.01 * sample_rate), 1)
    start, k = lead, 0
    while start < seconds:
        i0, i1 = int(start * sample_rate), min(int((start + burst) * sample_rate), n)
        if i1 - i0 > 2 * fade:
            freq = 220.0 * (1 + k % 4)
            env = numpy.ones(i1 - i0)
            ramp = numpy.linspace(0.0, 1.0, fade)
            env[:fade], env[-fade:] = ramp, ramp[::-1]
            audio[i0:i1] += 0.5 * env * numpy.sin(2 * numpy.pi * freq * t[i0:i1])
        start += burst + gap
        k += 1
    clipped = numpy.clip(audio, -1.0, 1.0)
    result: np.ndarray[Any, np.dtype[np.float32]] = clipped.astype(numpy.float32)
    return result
