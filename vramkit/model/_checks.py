"""Checks of ``ManagedModel``'s options, at construction rather than late (after a forward)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from vramkit.adapters import Adapter, GenericAdapter
from vramkit.cleaning import CleanupPolicy
from vramkit.errors import InvalidArgumentError

__all__ = ["adapter_given", "check_options", "manager_options_of"]


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


def adapter_given(
    adapter: Adapter | None,
    release: Callable[[Any], object] | None,
    size: Callable[[Any], int | None] | None,
    name: str,
) -> Adapter | None:
    """The adapter a model was given: ``adapter=``, or one made of ``release=`` / ``size=``."""
    if adapter is not None and (release is not None or size is not None):
        raise InvalidArgumentError("pass either adapter= or release=/size=, not both")
    if release is not None or size is not None:
        return GenericAdapter(release=release, size=size, name=name)
    if adapter is not None and not isinstance(adapter, Adapter):
        raise InvalidArgumentError(
            f"adapter must implement vramkit.adapters.Adapter; got {adapter!r}"
        )
    return adapter


def manager_options_of(model_class: type, options: object) -> dict[str, Any]:
    """Check ``manager_options=``: a mapping of the constructor's own keyword options.

    Passed on as ``**options``, a wrong key would fail inside the constructor
    with a TypeError about an "unexpected keyword argument".
    """
    if options is None:
        return {}
    # The from_* method sets these itself (isolate= is its own parameter).
    taken = ("loader", "name", "device", "config", "isolate")
    allowed = [p for p in inspect.signature(model_class).parameters if p != "self"]
    allowed = [p for p in allowed if p not in taken]
    if not isinstance(options, Mapping) or not all(k in allowed for k in options):
        raise InvalidArgumentError(
            f"manager_options must be a mapping of ManagedModel options ({', '.join(allowed)}) "
            f"or None; got {options!r}"
        )
    return dict(options)
