"""The example web app's audio plumbing: what Gradio hands over becomes what the models take.

Browsers record at 44.1 or 48 kHz, often in stereo, and Gradio passes integer
PCM; the ASR model takes 16 kHz mono floats, and Gradio plays int16 back.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gradio")
app = pytest.importorskip("examples.asr_webui.app")


def test_a_48_khz_stereo_recording_becomes_16_khz_mono_floats() -> None:
    t = np.arange(48000) / 48000
    tone = np.sin(2 * np.pi * 440 * t)
    stereo = (np.stack([tone, tone], axis=1) * 16000).astype(np.int16)
    clip = app.to_model_audio(48000, stereo)
    assert clip.dtype == np.float32
    assert clip.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 16000 / 32767
    assert np.allclose(clip, expected, atol=2e-3)


def test_16_khz_mono_only_changes_scale() -> None:
    samples = np.array([0, 16384, -32767, 32767], dtype=np.int16)
    clip = app.to_model_audio(16000, samples)
    assert np.allclose(clip, samples / 32767)


def test_read_back_is_int16_scaled_to_its_peak_and_silence_stays_silent() -> None:
    pcm = app.to_pcm16(np.array([0.0, 0.25, -0.5], dtype=np.float32))
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [0, 16383, -32767]
    assert app.to_pcm16(np.zeros(4, dtype=np.float32)).tolist() == [0, 0, 0, 0]


def test_the_summary_keeps_printable_ascii_only() -> None:
    assert app.to_text([72, 105, 0, 7, 33, 200]) == "Hi!"
    assert app.to_text([0, 1, 2]) == "(no printable text)"
