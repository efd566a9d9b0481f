import vramkit


def test_all_is_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(vramkit).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("vramkit")
    }
    assert set(vramkit.__all__) - {"__version__"} == public


def test_all_is_sorted() -> None:
    names = [n for n in vramkit.__all__ if n != "__version__"]
    assert names == sorted(names, key=str.lower) or names == sorted(names)


def test_version_is_a_string() -> None:
    assert isinstance(vramkit.__version__, str)
    assert vramkit.__version__
