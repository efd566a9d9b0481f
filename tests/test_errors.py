import builtins

import pytest

import vramkit
from vramkit import errors


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.InvalidArgumentError, ValueError),
        (errors.InvalidArgumentError, TypeError),
        (errors.UnknownModelError, KeyError),
        (errors.UnknownModelError, errors.InvalidArgumentError),
        (errors.ModelStateError, RuntimeError),
        (errors.ModelBusyError, errors.ModelStateError),
        (errors.BudgetExceededError, RuntimeError),
        (errors.OutOfMemoryError, MemoryError),
        (errors.OffloadError, OSError),
        (errors.VramLeakError, AssertionError),
        (errors.DeviceUnavailableError, RuntimeError),
        (errors.MissingDependencyError, ImportError),
        (errors.MissingModelError, FileNotFoundError),
    ],
)
def test_each_error_is_a_vramkit_error_and_its_builtin(error: type, builtin: type) -> None:
    assert issubclass(error, errors.VramkitError)
    assert issubclass(error, builtin)


def test_every_error_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} missing from the tree in errors.py's docstring"
        assert getattr(vramkit, name) is getattr(errors, name)


def test_missing_dependency_names_the_extra() -> None:
    exc = errors.MissingDependencyError("onnxruntime", "onnx", "ManagedModel.from_onnx")
    assert 'pip install "vramkit[onnx]"' in str(exc)
    assert exc.name == "onnxruntime"
    assert isinstance(exc, builtins.ImportError)


def test_require_raises_missing_dependency_for_an_absent_module() -> None:
    from vramkit._optional import require

    with pytest.raises(errors.MissingDependencyError, match=r"vramkit\[all\]"):
        require("surely_not_installed_vramkit_dep", "a test")
    assert require("json", "a test").__name__ == "json"
