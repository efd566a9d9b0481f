import vramkit


def test_all_is_exactly_the_public_names() -> None:
    import types

    for name in vramkit.__all__:
        getattr(vramkit, name)  # every public name resolves; lazy ones load on first access
    public = {
        name
        for name, value in vars(vramkit).items()
        if not name.startswith("_")
        and (
            getattr(value, "__module__", "").startswith("vramkit")
            or (isinstance(value, types.ModuleType) and name in vramkit.__all__)
        )
    }
    assert set(vramkit.__all__) - {"__version__"} == public


def test_every_lazy_name_is_public_and_importable_from_its_module() -> None:
    import importlib

    lazy = vramkit._LAZY
    assert set(lazy) <= set(vramkit.__all__), "lazy names missing from __all__"
    for name, module in lazy.items():
        imported = importlib.import_module(module)
        value = imported if module == f"vramkit.{name}" else getattr(imported, name)
        assert getattr(vramkit, name) is value, name


def test_function_names_are_not_shadowed_by_modules() -> None:
    # `import vramkit.snapshot` would rebind vramkit.snapshot to a module: no such modules.
    import importlib.util

    for name in ("snapshot", "cleanup", "managed", "gpu_session", "oom_retry"):
        assert callable(getattr(vramkit, name))
        assert importlib.util.find_spec(f"vramkit.{name}") is None, name


def test_all_is_sorted() -> None:
    names = [n for n in vramkit.__all__ if n != "__version__"]
    assert names == sorted(names, key=str.lower) or names == sorted(names)


def test_version_is_a_string() -> None:
    assert isinstance(vramkit.__version__, str)
    assert vramkit.__version__


def test_unknown_attributes_raise_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vramkit.nope  # type: ignore[attr-defined]  # noqa: B018
