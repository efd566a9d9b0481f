"""Test utilities shipped with vramkit: a scripted fake device and tiny local models.

:class:`FakeDevice` is for testing policy code (eviction order, cleanup cadence,
budgets) without a GPU; it is never a substitute for testing a real backend.
The tiny model builders live in :mod:`vramkit.testing.models` (imported on
demand: numpy, funasr and onnx only when a builder that needs them is called).
"""

from vramkit.testing.fake import FakeDevice

__all__ = ["FakeDevice"]
