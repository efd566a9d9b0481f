"""Thin adapters to other people's frameworks, each behind its own extra.

Nothing in vramkit imports these modules, and they use vramkit's public API
only, so each can be installed, imported and tested on its own:

- :mod:`vramkit.integrations.ray_serve` (extra ``ray``): a byte-budgeted
  replacement for Ray Serve's ``@serve.multiplexed``, one
  :class:`vramkit.ModelPool` per replica.
- :mod:`vramkit.integrations.http` (extra ``http``): an ASGI admin API over
  :class:`vramkit.Controls`, with Prometheus metrics.
- :mod:`vramkit.integrations.gradio` (extra ``webui``): a memory panel for
  Gradio apps over :class:`vramkit.Controls`.
"""
