"""A holder's chain as data and as text: the steps of a path, how they read, which come first.

The walk carries each path as tokens (``_Token``) and renders them only to sort
and to report, so ``Linear.__dict__['_parameters']['weight']`` can read as
``Linear.weight`` however the path was found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# A step through an instance dict, or the dicts where nn.Module keeps parameters,
# buffers and submodules, reads as the attribute it stands for (``Linear.weight``).
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "__dict__"})
_WIDTH = 32  # holders carried to the next level (more only when tied by text)
_ROOT_ORDER = {"module global": 0, "frame": 1, "class attribute": 2, "traceback": 3}


@dataclass(frozen=True, slots=True)
class ReferrerChain:
    """One path from a root to the object that is still held.

    Attributes:
        root: What kind of root holds the path: ``"module global"``,
            ``"frame"`` (a local of a running function), ``"class attribute"``,
            ``"traceback"`` (an exception being handled), or ``"unknown"`` (the
            search reached its bounds, or failed, before a root; the steps then
            start with ``"..."`` or say why).
        steps: The path, root first, each step readable on its own.
    """

    root: str
    steps: tuple[str, ...]

    def __str__(self) -> str:
        return " -> ".join(self.steps)


# A step of a path, as data until the path is rendered: (kind, text, extra).
#   ("module", "pkg.mod", "")          root: a module's globals dict
#   ("class", "pkg.mod.Cls", "")       root: a class's namespace
#   ("key", "'name'", "name")          a dict entry (extra: the key if a str)
#   ("index", "3", "")                 a list or tuple item
#   ("set", "", "")                    a set member
#   ("cell", "", "")                   a closure cell
#   ("closure", "qualname", "a b c")   a function's closure tuple (extra: free vars)
#   ("attr", "Type", "name")           an attribute of an object
#   ("text", "...", "")                anything already readable
_Token = tuple[str, str, str]


@dataclass(slots=True)
class _Path:
    """A frontier entry: the object's id and the steps from it down to its target."""

    oid: int
    tokens: tuple[_Token, ...]
    target: int  # index of the target this path leads to
    text: str = ""  # rendered tokens, the sort key that keeps the walk deterministic


def _render(tokens: Iterable[_Token]) -> tuple[str, ...]:
    """Readable steps, root first: dict and index steps glue to what holds them."""
    merged = _merge(list(tokens))
    steps: list[str] = []
    for kind, text, extra in merged:
        if kind in ("key", "index", "set", "cell") and steps:
            steps[-1] += {"key": f"[{text}]", "index": f"[{text}]", "set": "{...}", "cell": ""}[
                kind
            ]
        elif kind in ("key", "index"):
            steps.append(f"[{text}]")
        elif kind == "attr":
            steps.append(f"{text}.{extra}")
        elif kind == "closure":
            steps.append(f"closure of {text}")
        elif kind in ("module", "class", "text"):
            steps.append(text)
        # a lone set or cell step carries no text of its own
    return tuple(steps)


def _merge(tokens: list[_Token]) -> list[_Token]:
    """Fold steps that read better together.

    ``Linear.__dict__['_parameters']['weight']`` becomes ``Linear.weight``,
    ``module`` + ``'name'`` becomes ``pkg.mod.name``, and a closure tuple's
    index and cell become the variable's name.
    """
    out: list[_Token] = []
    for token in tokens:
        kind, _, extra = token
        if out and kind == "key" and extra:
            last_kind, last_text, last_extra = out[-1]
            if last_kind in ("module", "class"):
                out[-1] = ("text", f"{last_text}.{extra}", "")
                continue
            if last_kind == "attr" and (
                last_extra in _MODULE_INTERNALS or last_extra == "__dict__"
            ):
                out[-1] = ("attr", last_text, extra)
                continue
        if out and kind == "cell" and len(out) >= 2:
            closure, index = out[-2], out[-1]
            if closure[0] == "closure" and index[0] == "index":
                names = closure[2].split()
                position = int(index[1])
                variable = names[position] if position < len(names) else "?"
                out[-2:] = [("text", f"closure of {closure[1]} (variable {variable!r})", "")]
                continue
        out.append(token)
    return out


def _partial(path: _Path) -> ReferrerChain:
    return ReferrerChain("unknown", ("...", *_render(path.tokens)))


def _best(chains: list[tuple[int, ReferrerChain]], limit: int) -> list[ReferrerChain]:
    unique: dict[tuple[str, ...], tuple[int, ReferrerChain]] = {}
    for target, chain in chains:
        known = unique.get(chain.steps)
        if known is None or target < known[0]:
            unique[chain.steps] = (target, chain)
    ordered = sorted(
        unique.values(),
        key=lambda item: (
            _ROOT_ORDER.get(item[1].root, 9),
            item[0],
            len(item[1].steps),
            str(item[1]),
        ),
    )
    return [chain for _, chain in ordered[:limit]]


def _narrow(paths: list[_Path]) -> list[_Path]:
    """The next level: sorted by what it reads like, cut to the width (ties kept whole)."""
    paths.sort(key=lambda p: (p.target, len(p.tokens), p.text))
    if len(paths) <= _WIDTH:
        return paths
    edge = (paths[_WIDTH - 1].target, paths[_WIDTH - 1].text)
    cut = _WIDTH
    while cut < min(len(paths), 4 * _WIDTH) and (paths[cut].target, paths[cut].text) == edge:
        cut += 1
    return paths[:cut]
