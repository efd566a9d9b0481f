"""Checks of ``ManagedModel``'s options that would otherwise fail late (after a forward)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from vramkit.cleaning import CleanupPolicy
from vramkit.errors import InvalidArgumentError

__all__ = ["check_options"]


def check_options(cleanup: object, config: object, offload_dir: object) -> None:
    """Refuse, at construction, options that would otherwise fail later (after a forward)."""
    if cleanup is not None and not isinstance(cleanup, CleanupPolicy):
        raise InvalidArgumentError(
            f"cleanup must be a CleanupPolicy (vramkit.CleanupPolicy(...)) or None; got {cleanup!r}"
        )
    if config is not None and not isinstance(config, Mapping):
        raise InvalidArgumentError(f"config must be a mapping (a dict) or None; got {config!r}")
    if offload_dir is not None and (
        not isinstance(offload_dir, str | os.PathLike) or not os.fspath(offload_dir)
    ):
        raise InvalidArgumentError(
            "offload_dir must be a directory path (a non-empty str or os.PathLike) or None; "
            f"got {offload_dir!r}"
        )
