"""Reading other people's objects by identity only: names, attributes, keys, frames.

Nothing here calls ``==``, ``hash()``, ``repr()`` of a foreign object,
``__getattr__``, properties or any other Python-level method: dicts, slots and
type fields are read through their C-level accessors, fetched once.
"""

from __future__ import annotations

import gc
import os
import types
from typing import Any

# vramkit's own directory (this file sits in vramkit/referrers/): its frames are
# the search's own, never holders.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# C-level accessors, fetched once: calling them never runs Python code of the object.
_type_mro: Any = type.__dict__["__mro__"]
_type_dict: Any = type.__dict__["__dict__"]
_type_name: Any = type.__dict__["__name__"]
_type_module: Any = type.__dict__["__module__"]
_type_qualname: Any = type.__dict__["__qualname__"]
_module_dict: Any = vars(types.ModuleType)["__dict__"]
_SAFE_KEYS = (str, int, float, bool, bytes, type(None))


def _key_text(key: object) -> str:
    kind = type(key)
    if kind in _SAFE_KEYS:
        text = repr(key)
        return text if len(text) <= 60 else text[:57] + "..."
    if kind is tuple:
        parts: list[Any] = list(tuple.__iter__(key))  # type: ignore[arg-type]
        if len(parts) <= 4 and all(type(p) in _SAFE_KEYS for p in parts):
            return repr(tuple(parts))
    return f"<{_name(kind)}>"


def _attribute_names(holder: object, child: object) -> list[str]:
    """Names under which ``holder`` keeps ``child``: instance dict entries, then slots."""
    names: list[str] = []
    attributes = _instance_dict(holder)
    if attributes is not None:
        names += [k for k, v in dict.items(attributes) if v is child and type(k) is str][:3]
    if names:
        return names
    for cls in _type_mro.__get__(type(holder)):
        for name, descriptor in dict.items(_class_namespace(cls)):
            if type(descriptor) is types.MemberDescriptorType and type(name) is str:
                try:
                    value = descriptor.__get__(holder, type(holder))
                except Exception:  # an empty slot raises AttributeError
                    continue
                if value is child:
                    names.append(name)
    return names[:3]


def _instance_dict(obj: object) -> dict[str, Any] | None:
    """``obj.__dict__`` through the type's own C accessor, or ``None`` when it has none."""
    for cls in _type_mro.__get__(type(obj)):
        descriptor = _lookup(_class_namespace(cls), "__dict__")
        if descriptor is None:
            continue
        if type(descriptor) is not types.GetSetDescriptorType:
            return None  # a Python-level __dict__ (property): not ours to call
        try:
            value = descriptor.__get__(obj, type(obj))
        except Exception:  # objects without a dict, or odd C types
            return None
        return value if type(value) is dict else None
    return None


def _lookup(namespace: dict[Any, Any], name: str) -> Any:
    """``namespace[name]`` without hashing or comparing foreign keys."""
    for key, value in dict.items(namespace):
        if type(key) is str and key == name:
            return value
    return None


def _class_namespace(cls: type) -> dict[str, Any]:
    """The dict behind ``cls.__dict__`` (a read-only proxy around it)."""
    proxy = _type_dict.__get__(cls)
    inner = gc.get_referents(proxy)
    return inner[0] if inner and type(inner[0]) is dict else {}


def _name(cls: type) -> str:
    return str(_type_name.__get__(cls))


def _qualified(cls: type) -> str:
    return f"{_type_module.__get__(cls)}.{_type_qualname.__get__(cls)}"


def _is_vramkit(code: types.CodeType) -> bool:
    return code.co_filename.startswith(_PACKAGE_DIR)


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"{name}() in {os.path.basename(code.co_filename)}:{frame.f_lineno}"


def _locals(frame: types.FrameType) -> list[tuple[str, Any]]:
    """A frame's local variables."""
    return _items(frame.f_locals)


def _items(scope: Any) -> list[tuple[str, Any]]:
    """Entries of ``f_locals``: a dict before Python 3.13, a C-level proxy since."""
    items = dict.items(scope) if type(scope) is dict else scope.items()
    return [(name, value) for name, value in items if type(name) is str]
