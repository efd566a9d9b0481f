"""The fixtures: ``vram_guard``, ``vram_snapshot`` and ``managed_model_factory``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pytest

from vramkit.pytest_plugin.manager import manager_of
from vramkit.pytest_plugin.verdicts import SECTION_MODELS, Failure

if TYPE_CHECKING:
    import os

    import torch

    from vramkit.devices import DeviceLike
    from vramkit.memory import MemoryDelta, MemorySnapshot
    from vramkit.model import ManagedModel, UnloadReport
    from vramkit.session import SessionRun

__all__ = [
    "ModelFactory",
    "VramSnapshots",
    "managed_model_factory",
    "vram_guard",
    "vram_snapshot",
]

T = TypeVar("T")

_UNLOAD_TIMEOUT_SECONDS: Final = 10.0  # for leases another thread still holds at teardown


@pytest.fixture
def vram_guard(request: pytest.FixtureRequest) -> Iterator[SessionRun]:
    """Check that the test leaves no memory behind on the device; yields its session run.

    The check runs after the test and its other function-scoped fixtures have
    ended, before any wider-scoped fixture is torn down; ``run.report`` (a
    :class:`~vramkit.session.SessionReport`) is filled then. Settings come from
    the test's ``no_vram_leak`` marker, else from the ``--vram-*`` options and
    ini keys.
    """
    __tracebackhide__ = True
    manager = manager_of(request.config)
    yield manager.start(request.node)
    manager.finish(request.node)


class VramSnapshots:
    """What the ``vram_snapshot`` fixture gives a test: readings on demand, and the first one.

    Attributes:
        start: The snapshot taken when the fixture was set up.
    """

    def __init__(self, device: DeviceLike | None = None) -> None:
        """Take the first snapshot, of ``device`` (``None``: every available device)."""
        from vramkit.memory import snapshot

        self._device = device
        self.start: MemorySnapshot = snapshot(device)

    def __call__(self) -> MemorySnapshot:
        """A new snapshot of the same devices as :attr:`start`."""
        from vramkit.memory import snapshot

        return snapshot(self._device)

    def since_start(self) -> MemoryDelta:
        """What changed since :attr:`start`: ``self() - self.start``."""
        return self() - self.start

    def __repr__(self) -> str:
        return f"<VramSnapshots from {self.start!r}>"


@pytest.fixture
def vram_snapshot() -> VramSnapshots:
    """Memory readings for the test: ``vram_snapshot()`` reads now, ``.start`` is the first."""
    return VramSnapshots()


class ModelFactory:
    """Creates :class:`~vramkit.ManagedModel` objects for one test and unloads them after it.

    What the ``managed_model_factory`` fixture gives a test. Each model is made
    exactly as its constructor would make it; when the test ends every one is
    unloaded, and a model that something still held (or whose lease was never
    returned) fails the test.

    Attributes:
        unload_timeout: Seconds to wait at teardown for leases other threads hold.
    """

    def __init__(self, *, unload_timeout: float = _UNLOAD_TIMEOUT_SECONDS) -> None:
        """Start with no models."""
        self.unload_timeout = unload_timeout
        self._models: list[ManagedModel[Any]] = []

    @property
    def models(self) -> tuple[ManagedModel[Any], ...]:
        """The models created so far, oldest first."""
        return tuple(self._models)

    def __call__(self, loader: Callable[[], T], **options: Any) -> ManagedModel[T]:
        """``ManagedModel(loader, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel(loader, **options))

    def from_torch(
        self, factory: Callable[[], torch.nn.Module], **options: Any
    ) -> ManagedModel[torch.nn.Module]:
        """``ManagedModel.from_torch(factory, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_torch(factory, **options))

    def from_funasr(self, model: str | os.PathLike[str], **options: Any) -> ManagedModel[Any]:
        """``ManagedModel.from_funasr(model, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_funasr(model, **options))

    def from_onnx(self, path: str | os.PathLike[str], **options: Any) -> ManagedModel[Any]:
        """``ManagedModel.from_onnx(path, **options)``, unloaded when the test ends."""
        from vramkit.model import ManagedModel

        return self._keep(ManagedModel.from_onnx(path, **options))

    def _keep(self, model: ManagedModel[T]) -> ManagedModel[T]:
        self._models.append(model)
        return model

    def close(self) -> list[str]:
        """Unload and close every model, newest first.

        Returns:
            One account per model that did not come back cleanly: held by
            something after unloading, a lease still out, or a failed release.
        """
        from vramkit.errors import ModelBusyError, ModelStateError

        problems: list[str] = []
        models, self._models = self._models, []
        for model in reversed(models):
            if model.closed:
                continue
            report: UnloadReport | None = None
            try:
                report = model.unload(timeout=self.unload_timeout, strict=False)
            except ModelBusyError as exc:
                problems.append(f"{model.name!r} could not be unloaded: {exc}")
                continue
            except ModelStateError as exc:
                problems.append(f"{model.name!r}: {exc}")
                report = getattr(exc, "report", None)
            if report is not None and not report.died:
                problems.append(str(report))
            model.close()
        return problems

    def __repr__(self) -> str:
        return f"<ModelFactory with {len(self._models)} model(s)>"


@pytest.fixture
def managed_model_factory(request: pytest.FixtureRequest) -> Iterator[ModelFactory]:
    """Create ``ManagedModel``s for the test; all are unloaded when it ends.

    A model that survives unloading (something still holds it) or whose lease
    is still out fails the test, with the holders named.
    """
    factory = ModelFactory()
    yield factory
    problems = factory.close()
    if not problems:
        return
    failure = Failure(
        SECTION_MODELS,
        f"{len(problems)} managed model(s) did not come back cleanly at the end of the test",
        "\n".join(problems),
    )
    if not manager_of(request.config).record(request.node, failure):
        from vramkit.errors import VramLeakError

        raise VramLeakError(f"{failure.headline}\n{failure.details}")
