"""The import contract: which layer of vramkit may import which.

Layers, bottom up (a module may import its own layer and the ones below):

- base: errors, units, small helpers, heap walks, optional imports, keep-alive,
  which layer of a reading is the number, and events (torch-free, all of them);
- devices (where memory lives) and adapters (what holds it): the two axes, each
  on the base only and never on each other;
- readings: memory, tensors, referrers, cleaning; and process isolation (a
  worker process, its transport and proxy), which the model layer uses for
  ``isolate=True`` and which reaches the model only through what it is given;
- model: ``ManagedModel`` and its tiers;
- services: pools, sessions, policies, out-of-memory recovery, status;
- the facade (``vramkit`` itself);
- the outer ring: command line, demo, pytest plugin, integrations, testing helpers.

Every import counts, wherever it is written (module level, inside a function,
under ``TYPE_CHECKING``): a function-level import hides a dependency, it does
not remove it. The known exceptions are listed below; the test fails when a new
one appears and when a listed one is gone, so the lists only ever shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vramkit"

LAYERS: dict[str, tuple[int, str]] = {
    # prefix: (rank, layer); the longest matching prefix wins
    "vramkit.errors": (0, "base"),
    "vramkit._units": (0, "base"),
    "vramkit._utils": (0, "base"),
    "vramkit._gc": (0, "base"),
    "vramkit._layers": (0, "base"),
    "vramkit.events": (0, "base"),
    "vramkit._oomerrors": (0, "base"),
    "vramkit._optional": (0, "base"),
    "vramkit._keepalive": (0, "base"),
    "vramkit._version": (0, "base"),
    "vramkit._runtime": (0, "base"),
    "vramkit.devices": (1, "devices"),
    "vramkit.adapters": (1, "adapters"),
    "vramkit.memory": (2, "readings"),
    "vramkit.tensors": (2, "readings"),
    "vramkit.referrers": (2, "readings"),
    "vramkit.cleaning": (2, "readings"),
    "vramkit.isolation": (2, "isolation"),
    "vramkit.model": (3, "model"),
    "vramkit.offload": (3, "model"),
    "vramkit.pool": (4, "services"),
    "vramkit.session": (4, "services"),
    "vramkit.policy": (4, "services"),
    "vramkit.oom": (4, "services"),
    "vramkit._leakcheck": (4, "services"),
    "vramkit._status": (4, "services"),
    "vramkit.controls": (4, "services"),
    "vramkit": (5, "facade"),
    "vramkit.__main__": (6, "outer"),
    "vramkit.cli": (6, "outer"),
    "vramkit._ps": (6, "outer"),
    "vramkit.demo": (6, "outer"),
    "vramkit.pytest_plugin": (6, "outer"),
    "vramkit.integrations": (6, "outer"),
    "vramkit.testing": (6, "outer"),
}

# Imports that break the layer rule today, as "importer -> imported".
KNOWN_VIOLATIONS: set[str] = set()

# Groups of modules that import each other, directly or around a loop.
KNOWN_CIRCLES: set[tuple[str, ...]] = set()

# Private names imported from another part of the package, as "importer -> module.name".
KNOWN_PRIVATE_IMPORTS: set[str] = set()

# A room a reader can take in at once: lines per module, and per class.
MODULE_LINES = 700
CLASS_LINES = 500
KNOWN_LARGE: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, source: str | None = None) -> Iterator[tuple[str, str]]:
    """``(imported module, imported name or "")`` for every import ``module`` makes.

    ``source`` stands in for the module's file (to test the reader itself).
    """
    path = MODULES.get(module, PACKAGE / "__init__.py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vramkit":
                    yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != "vramkit":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # `from vramkit import events` imports the module vramkit.events.
                yield (submodule, "") if submodule in MODULES else (source, alias.name)


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in _imports(m) if target != m} for m in MODULES}


def _layer(module: str) -> tuple[int, str]:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no layer: add it to LAYERS in {Path(__file__).name}"
    return LAYERS[max(prefixes, key=len)]


def _allowed(importer: str, imported: str) -> bool:
    (rank, layer), (their_rank, their_layer) = _layer(importer), _layer(imported)
    return layer == their_layer or their_rank < rank


def _circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_every_import_names_a_module_that_exists() -> None:
    for module in MODULES:
        for target, _ in _imports(module):
            assert target in MODULES, f"{module} imports {target}, which is not a module"


def test_no_import_reaches_up_a_layer_beyond_the_known_ones() -> None:
    found = {
        f"{importer} -> {imported}"
        for importer, targets in _graph().items()
        for imported in targets
        if not _allowed(importer, imported)
    }
    assert found - KNOWN_VIOLATIONS == set(), "new imports against the layer rule"
    assert KNOWN_VIOLATIONS - found == set(), "fixed: remove these from KNOWN_VIOLATIONS"


def test_no_import_circles_beyond_the_known_ones() -> None:
    found = _circles(_graph())
    assert found - KNOWN_CIRCLES == set(), "new import circles"
    assert KNOWN_CIRCLES - found == set(), "gone: remove these from KNOWN_CIRCLES"


def test_no_private_names_cross_module_borders_beyond_the_known_ones() -> None:
    def area(module: str) -> str:
        return ".".join(module.split(".")[:2])

    found = {
        f"{module} -> {source}.{name}"
        for module in MODULES
        for source, name in _imports(module)
        if name.startswith("_") and not name.endswith("__") and area(source) != area(module)
    }
    assert found - KNOWN_PRIVATE_IMPORTS == set(), "new private imports: give them a shared home"
    assert KNOWN_PRIVATE_IMPORTS - found == set(), "gone: remove these from KNOWN_PRIVATE_IMPORTS"


def test_no_module_or_class_is_too_large_to_read_beyond_the_known_ones() -> None:
    found = set()
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MODULE_LINES:
            found.add(module)
        classes = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef)]
        found.update(
            f"{module}.{node.name}"
            for node in classes
            if (node.end_lineno or node.lineno) - node.lineno + 1 > CLASS_LINES
        )
    assert found - KNOWN_LARGE == set(), "grown too large: split them"
    assert KNOWN_LARGE - found == set(), "small enough now: remove these from KNOWN_LARGE"


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("vramkit.model", "vramkit.devices", True),
        ("vramkit.devices.cuda", "vramkit.devices._nvml", True),
        ("vramkit.devices", "vramkit.adapters", False),
        ("vramkit.adapters.torch", "vramkit.devices", False),
        ("vramkit.tensors", "vramkit.model", False),
        ("vramkit.errors", "vramkit._units", True),
        ("vramkit.cli", "vramkit.pool", True),
        ("vramkit.pool", "vramkit.cli", False),
    ],
)
def test_the_rule_itself(importer: str, imported: str, allowed: bool) -> None:
    assert _allowed(importer, imported) is allowed


def test_the_reader_sees_function_level_and_type_checking_imports() -> None:
    # The empty lists above are only worth something if hidden imports are seen.
    source = """
from typing import TYPE_CHECKING
from . import _nvml
if TYPE_CHECKING:
    from vramkit.pool import ModelPool

def late():
    from vramkit.policy import managed
    import vramkit.session
"""
    found = {target for target, _ in _imports("vramkit.devices.cuda", source)}
    assert found == {"vramkit.devices._nvml", "vramkit.pool", "vramkit.policy", "vramkit.session"}
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
