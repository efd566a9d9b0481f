"""Thin adapters to other people's frameworks, each behind its own extra.

Nothing inside vramkit imports these modules; each uses vramkit's public API
only and is imported by the application that wants it, for example
``from vramkit.integrations.ray_serve import vramkit_multiplexed``.
"""
