"""Checks of ``ManagedModel``'s options, at construction rather than late (after a forward).

The ``from_*`` constructors' arguments are checked here too, and turned into a
:class:`Source`: the loader, with the configuration it closes over, the device
and the default name, ready for the constructor.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vramkit._units import check_flag
from vramkit._utils import callable_name
from vramkit.adapters import Adapter, GenericAdapter
from vramkit.adapters.funasr import check_funasr, funasr_loader
from vramkit.adapters.onnxruntime import (
    check_onnx_path,
    check_provider_options,
    check_providers,
    default_providers,
    device_from_providers,
    onnx_loader,
)
from vramkit.adapters.torch import check_torch_factory, torch_loader
from vramkit.cleaning import CleanupPolicy
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError

__all__ = [
    "Source",
    "adapter_given",
    "check_options",
    "funasr_source",
    "loader_name",
    "manager_options_of",
    "onnx_source",
    "torch_source",
]


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


def loader_name(loader: object, name: object) -> str:
    """Check the loader, and the model's name (default: the loader's)."""
    if not callable(loader):
        raise InvalidArgumentError(
            f"loader must be a zero-argument callable that returns the model; got {loader!r}"
        )
    if name is None:
        name = callable_name(loader)
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name must be a non-empty string; got {name!r}")
    return name


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


@dataclass(frozen=True, slots=True)
class Source:
    """What a ``from_*`` constructor hands ``ManagedModel``: its arguments, checked."""

    loader: Callable[[], Any]
    name: str
    device: Device
    config: Mapping[str, Any]


def torch_source(
    factory: Callable[[], torch.nn.Module],
    *,
    device: DeviceLike | None,
    dtype: torch.dtype | None,
    eval: bool,
    name: str | None,
) -> Source:
    """``ManagedModel.from_torch``'s arguments, checked (see there)."""
    check_torch_factory(factory, dtype)
    check_flag(eval, "eval")
    target = resolve_device(device)
    loader, config = torch_loader(factory, device=str(target), dtype=dtype, eval=eval)
    return Source(loader, name or callable_name(factory), target, config)


def funasr_source(
    model: str | os.PathLike[str],
    *,
    device: DeviceLike | None,
    name: str | None,
    disable_update: bool,
    automodel_kwargs: Mapping[str, Any],
) -> Source:
    """``ManagedModel.from_funasr``'s arguments, checked (see there)."""
    check_flag(disable_update, "disable_update")
    directory, kwargs = check_funasr(model, automodel_kwargs)
    target = resolve_device(device)
    loader, config = funasr_loader(
        directory, device=str(target), disable_update=disable_update, automodel_kwargs=kwargs
    )
    return Source(loader, name or Path(os.fspath(model)).name or "funasr", target, config)


def onnx_source(
    path: str | os.PathLike[str],
    *,
    providers: list[Any] | None,
    sess_options: Any,
    provider_options: list[dict[str, Any]] | None,
    device: DeviceLike | None,
    arena: bool,
    name: str | None,
) -> Source:
    """``ManagedModel.from_onnx``'s arguments, checked (see there)."""
    check_flag(arena, "arena")
    file = check_onnx_path(path)
    check_providers(providers)
    check_provider_options(provider_options, providers)
    target = resolve_device(device_from_providers(providers) if device is None else device)
    if providers is None:
        providers = default_providers(target.kind, target.index)
    loader, config = onnx_loader(
        file,
        providers=providers,
        sess_options=sess_options,
        provider_options=provider_options,
        arena=arena,
    )
    return Source(loader, name or file.stem, target, config)
