"""FunASR's ``AutoModel``: every place it keeps torch objects.

An ``AutoModel`` holds its networks in ``model``, ``vad_model``, ``punc_model``,
``spk_model`` and ``cb_model`` (with a speaker model), its frontends (with
CMVN statistics as plain tensors) in ``kwargs`` and the ``*_kwargs`` dicts, and
deep copies of those dicts in ``_base_kwargs_map``, which are swapped in at
every ``generate()``. This adapter measures and frees all of them. It matches
by type name, so ``import funasr`` (about 7 s) never happens here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vramkit.adapters._base import AdapterBase, type_path
from vramkit.adapters._torch_util import modules_in, neutralise_torch, storage_bytes, tensors_in
from vramkit.errors import InvalidArgumentError, MissingDependencyError, MissingModelError

__all__ = [
    "PATH_KEYS",
    "SUBMODELS",
    "FunasrAdapter",
    "check_funasr",
    "funasr_loader",
    "funasr_side_effects_undone",
    "import_funasr",
    "modelscope_cache",
    "modelscope_snapshot",
]

SUBMODELS = ("model", "vad_model", "punc_model", "spk_model", "cb_model")
"""Attributes of an ``AutoModel`` that hold networks."""

PATH_KEYS = ("model", "vad_model", "punc_model", "spk_model")
"""``AutoModel`` arguments that name a model directory (or a hub name)."""

_KWARGS = ("kwargs", "vad_kwargs", "punc_kwargs", "spk_kwargs", "_base_kwargs_map")


class FunasrAdapter(AdapterBase):
    """``funasr.AutoModel`` (VAD, ASR, punctuation, speaker models and their frontends)."""

    name = "funasr"

    def matches(self, obj: object) -> bool:
        """``funasr...AutoModel`` instances, recognised without importing funasr."""
        path = type_path(obj)
        return path.startswith("funasr.") and path.endswith(".AutoModel")

    def submodels(self, obj: object) -> dict[str, torch.nn.Module]:
        """The networks an ``AutoModel`` holds, by attribute name."""
        found = {}
        for name in SUBMODELS:
            value = getattr(obj, name, None)
            if isinstance(value, torch.nn.Module):
                found[name] = value
        return found

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """Networks by attribute name, then frontends (and their copies) in the kwargs dicts."""
        found: dict[str, torch.nn.Module] = dict(self.submodels(obj))
        ids = {id(m) for m in found.values()}
        for name in _KWARGS:
            for i, module in enumerate(modules_in(getattr(obj, name, None), depth=4)):
                if id(module) not in ids:
                    ids.add(id(module))
                    found[f"{name}.{i}"] = module
        return found

    def size_bytes(self, obj: object) -> int | None:
        """Bytes of all networks and frontend tensors (shared storages once)."""
        return storage_bytes(self.tensors(obj))

    def tensors(self, obj: object) -> Sequence[torch.Tensor]:
        """Every tensor in the networks and in the frontends kept in the kwargs dicts."""
        found: dict[int, torch.Tensor] = {}
        for module in self.submodels(obj).values():
            for tensor in tensors_in(module):
                found.setdefault(id(tensor), tensor)
        for name in _KWARGS:
            for tensor in tensors_in(getattr(obj, name, None), depth=4):
                found.setdefault(id(tensor), tensor)
        return list(found.values())

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Move a surviving ``AutoModel``'s networks to ``meta``; empty its other tensors."""
        found: list[object] = []
        for survivor in survivors:
            if self.matches(survivor):
                found.extend(self.tensors(survivor))
                found.extend(self.submodels(survivor).values())
                for name in _KWARGS:  # frontends run first in generate(): they must refuse too
                    found.extend(modules_in(getattr(survivor, name, None), depth=4))
            else:
                found.append(survivor)
        return neutralise_torch(found, message)


@contextlib.contextmanager
def funasr_side_effects_undone() -> Iterator[None]:
    """Restore what importing FunASR or building its models changes globally.

    ``AutoModel`` (through ``build_model``) calls ``torch.set_num_threads``,
    seeds Python's, NumPy's and torch's global generators, and calls
    ``logging.basicConfig``; a library that loads models for an application
    must leave all three as it found them.
    """
    import numpy

    threads = torch.get_num_threads()
    py_state = random.getstate()
    np_state = numpy.random.get_state()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if not handlers:
        # AutoModel calls logging.basicConfig(level=INFO), which would print its
        # loading chatter through the root logger for the rest of the process.
        # With a handler present basicConfig does nothing.
        root.addHandler(logging.NullHandler())
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            numpy.random.set_state(np_state)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            root.handlers[:] = handlers
            root.setLevel(level)


_module: Any = None
_import_lock = threading.Lock()


def import_funasr(purpose: str) -> Any:
    """``import funasr`` once per process (about 7 s), thread-safe, side effects undone.

    Raises:
        MissingDependencyError: funasr is not installed (names the ``funasr`` extra).
    """
    global _module
    with _import_lock:
        if _module is None:
            from vramkit._optional import require

            with funasr_side_effects_undone():
                _module = require("funasr", purpose)
        return _module


def check_funasr(model: object, automodel_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check, before anything loads, that funasr is there and the models can be found.

    A model directory must exist and hold a ``config.yaml``. A ModelScope id
    (``org/name``, as FunASR's own README names models) is resolved from the
    local ModelScope cache, so a reload never depends on the network. FunASR's
    short aliases (``"fsmn-vad"``) are left to FunASR.

    Returns:
        ``model`` and ``automodel_kwargs`` with every id replaced by its directory.

    Raises:
        MissingDependencyError: funasr is not installed.
        InvalidArgumentError: A path (for ``model``, ``vad_model``, ``punc_model``,
            ``spk_model``) that does not exist or is not a FunASR model directory.
        MissingModelError: A ModelScope id that is not in the local cache.
    """
    import importlib.util

    if importlib.util.find_spec("funasr") is None:
        raise MissingDependencyError("funasr", "funasr", "ManagedModel.from_funasr")
    resolved = {
        key: _resolve(key, value) if key in PATH_KEYS and value is not None else value
        for key, value in automodel_kwargs.items()
    }
    return _resolve("model", model), resolved


_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _resolve(key: str, value: object) -> str:
    if not isinstance(value, str | os.PathLike):
        raise InvalidArgumentError(
            f"{key} must be a FunASR model directory or hub name (str or path); got {value!r}"
        )
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.yaml").exists():
            raise InvalidArgumentError(
                f"{key}={text!r} is not a FunASR model directory: it has no config.yaml"
            )
        return text
    if isinstance(value, str) and _MODEL_ID.fullmatch(text):
        return str(modelscope_snapshot(key, text))
    if isinstance(value, os.PathLike) or os.sep in text or text.startswith((".", "~")):
        raise InvalidArgumentError(f"{key}={text!r} does not exist")
    return text  # a FunASR alias ("fsmn-vad"): FunASR maps it to a hub id


def modelscope_cache() -> Path:
    """The ModelScope cache: ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub``."""
    override = os.environ.get("MODELSCOPE_CACHE")
    root = override or os.path.join("~", ".cache", "modelscope", "hub")
    return Path(root).expanduser()


def modelscope_snapshot(key: str, model_id: str) -> Path:
    """The local directory of ModelScope model ``model_id``, in any layout the SDK has used.

    ``models/{org}--{name}/snapshots/{revision}/`` (the revision ``refs/master``
    names, else the newest), then the older ``models/{org}/{name}/``,
    ``{org}/{name}/`` and ``hub/{org}/{name}/``. A directory counts when it
    holds a ``config.yaml`` (or ModelScope's ``configuration.json``) and
    belongs to this user (a model file is code to ``torch.load``).

    Raises:
        MissingModelError: The model is in none of them.
    """
    root = modelscope_cache()
    owner, name = model_id.split("/", 1)
    repo = root / "models" / f"{owner}--{name}"
    candidates = [*_snapshots(repo)]
    candidates += [
        root / "models" / owner / name.replace(".", "___"),
        root / "models" / owner / name,
        root / owner / name,
        root / "hub" / owner / name,
    ]
    for candidate in candidates:
        if _is_model_dir(candidate):
            return candidate
    raise MissingModelError(
        f"{key}={model_id!r} is a ModelScope model id that is not in the local ModelScope "
        f"cache (looked in {root}, set by MODELSCOPE_CACHE); vramkit never downloads, so that "
        f"a reload cannot depend on the network: download it once (`modelscope download "
        f"--model {model_id}`) or pass the model's directory"
    )


def _snapshots(repo: Path) -> list[Path]:
    snapshots = repo / "snapshots"
    try:
        ref = (repo / "refs" / "master").read_text().strip()
    except OSError:
        ref = ""
    try:
        found = sorted(
            (p for p in snapshots.iterdir() if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return []
    return sorted(found, key=lambda p: p.name != ref)  # the referenced revision first


def _is_model_dir(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    owned = not hasattr(os, "getuid") or info.st_uid in (os.getuid(), 0)
    has_config = (path / "config.yaml").is_file() or (path / "configuration.json").is_file()
    return path.is_dir() and owned and has_config


def funasr_loader(
    model: str | os.PathLike[str],
    *,
    device: str,
    disable_update: bool,
    automodel_kwargs: Mapping[str, Any],
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The loader ``from_funasr`` manages: an ``AutoModel`` built with the same arguments each time.

    Returns:
        The loader, and the configuration it closes over (``model`` and every
        ``AutoModel`` argument).
    """
    kwargs = dict(automodel_kwargs)
    kwargs.setdefault("ncpu", torch.get_num_threads())
    kwargs["disable_update"] = disable_update
    kwargs["device"] = device
    model_ref = os.fspath(model)
    # A partial, not a closure: an isolated model's loader is pickled to its worker.
    load_funasr = functools.partial(_load_funasr, model_ref, kwargs)
    return load_funasr, {"model": model_ref, **kwargs}


def _load_funasr(model: str, kwargs: Mapping[str, Any]) -> Any:
    funasr = import_funasr("ManagedModel.from_funasr")
    with funasr_side_effects_undone():
        return funasr.AutoModel(model=model, **kwargs)
