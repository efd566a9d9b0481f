"""The docs hold: every ``python`` block runs on its own, and the facts they repeat agree.

A reader copies one block, not a page, so each block runs alone: in a fresh
interpreter state, with nothing from the blocks above it. To keep that cheap,
one server process per test worker imports torch and vramkit once and forks a
child per block (a fork is a fresh interpreter as it stood after those
imports); where ``fork`` does not exist, each block gets its own interpreter.
A block whose first line is ``# requires: cuda`` (or ``mps``, or module names
such as ``funasr, onnx``) runs only where that is available; its modules are
imported in the server first, so the ~7 s of ``import funasr`` is paid once.

A tutorial that builds one example over several blocks says so where a reader
sees it: a block whose first line after the requirements is
``# continues the example above`` runs after the blocks it continues (up to the
nearest block without that line), and nothing else is carried over.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
REQUIRES = re.compile(r"#\s*requires:\s*([\w, ]+)")
CONTINUES = "# continues the example above"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str

    @property
    def requires(self) -> list[str]:
        match = REQUIRES.match(self.code.lstrip())
        return [r.strip() for r in match.group(1).split(",")] if match else []

    @property
    def continues(self) -> bool:
        lines = [line for line in self.code.lstrip().splitlines() if not REQUIRES.match(line)]
        return bool(lines) and lines[0].strip() == CONTINUES

    def __str__(self) -> str:
        where = self.page.relative_to(ROOT / "docs") if self.page.parent != ROOT else self.page
        return f"{Path(where).as_posix() if where != self.page else self.page.name}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
            found.append(Block(page, line, match.group(1)))
    return found


def _chain(block: Block, blocks: list[Block]) -> str:
    """The code to run for ``block``: itself, after the blocks it says it continues."""
    earlier = [b for b in blocks if b.page == block.page and b.line < block.line]
    chain = [block]
    while chain[0].continues and earlier:
        chain.insert(0, earlier.pop())
    return "\n".join(b.code for b in chain)


def _available(requirement: str) -> bool:
    if requirement == "cuda":
        return bool(torch.cuda.is_available())
    if requirement == "mps":
        return bool(torch.backends.mps.is_available())
    return importlib.util.find_spec(requirement) is not None


# The server: reads one JSON request per line, forks a child per block, answers
# one JSON line. The child's stdout and stderr go to a file, never to the pipe.
SERVER = r"""
import builtins, json, os, signal, sys, traceback
import torch, vramkit  # what nearly every block imports: paid once


def child(request):
    # Everything here is a local: the block gets __main__'s globals to itself.
    os.chdir(request["cwd"])
    out = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    signal.alarm(int(request["timeout"]))
    exit, print_exc, namespace = os._exit, traceback.print_exc, sys.modules["__main__"].__dict__
    stdout, stderr, home = sys.stdout, sys.stderr, builtins
    namespace.clear()
    namespace.update(__name__="__main__", __builtins__=home)
    status = 0
    try:
        exec(compile(request["code"], request["name"], "exec"), namespace)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        print_exc()
        status = 1
    stdout.flush()
    stderr.flush()
    exit(status)


def serve():
    hard_exit = os._exit  # a local: the child clears the globals
    # Replies get a descriptor of their own: what imports print (FunASR's
    # notices) goes to stderr instead of into the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        for module in request["preload"]:
            __import__(module)
        sys.stdout.flush()
        replies.flush()
        pid = os.fork()
        if pid == 0:
            try:
                child(request)
            finally:
                hard_exit(70)  # never back into the server loop
        _, status = os.waitpid(pid, 0)
        path = os.path.join(request["cwd"], "output.txt")
        with open(path, encoding="utf-8", errors="replace") as fh:
            output = fh.read()
        reply = {"returncode": os.waitstatus_to_exitcode(status), "output": output}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


serve()
"""


class BlockRunner:
    """Runs one block at a time in a forked child of a server that imported torch once."""

    def __init__(self) -> None:
        self._server: subprocess.Popen[str] | None = None

    def run(self, block: Block, cwd: Path, *, timeout: int = 300) -> tuple[int, str]:
        request = {
            "code": _chain(block, BLOCKS),
            "name": str(block),
            "cwd": str(cwd),
            "timeout": timeout,
            "preload": [r for r in block.requires if r not in ("cuda", "mps")],
        }
        if not hasattr(os, "fork"):
            return self._run_alone(block, cwd, timeout)
        server = self._start()
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        if not reply:
            self.close()
            raise AssertionError(f"the docs block server died running {block}")
        answer = json.loads(reply)
        return int(answer["returncode"]), str(answer["output"])

    def _start(self) -> subprocess.Popen[str]:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=dict(os.environ, PYTHONWARNINGS="ignore"),
            )
        return self._server

    @staticmethod
    def _run_alone(block: Block, cwd: Path, timeout: int) -> tuple[int, str]:
        completed = subprocess.run(
            [sys.executable, "-c", _chain(block, BLOCKS)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            check=False,
        )
        return completed.returncode, completed.stdout + completed.stderr

    def close(self) -> None:
        if self._server is not None:
            for pipe in (self._server.stdin, self._server.stdout):
                if pipe is not None:
                    pipe.close()
            self._server.wait(30)
            self._server = None


@pytest.fixture(scope="module")
def runner() -> Iterator[BlockRunner]:
    runner = BlockRunner()
    yield runner
    runner.close()


BLOCKS = _blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_each_python_block_runs_on_its_own(
    block: Block, runner: BlockRunner, tmp_path: Path
) -> None:
    missing = [r for r in block.requires if not _available(r)]
    if missing:
        pytest.skip(f"{block} needs {', '.join(missing)}")
    returncode, output = runner.run(block, tmp_path)
    assert returncode == 0, f"{block} failed when run alone:\n{textwrap.indent(output, '  ')}"


# --------------------------------------------------------------------------- facts that repeat


def _extras_table(page: Path) -> dict[str, str]:
    """``| `extra` | installs | for |`` rows of a page: extra -> the installs cell."""
    rows = re.findall(r"^\| `(\w+)`\s*\|([^|]*)\|", page.read_text(encoding="utf-8"), re.M)
    return {name: cell.strip() for name, cell in rows}


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "index.md"], ids=str)
def test_the_extras_tables_list_what_pyproject_declares(page: Path) -> None:
    declared = PYPROJECT["project"]["optional-dependencies"]
    table = _extras_table(page)
    user_extras = {name for name in declared if name != "dev"}
    assert set(table) == user_extras, f"{page.name} lists extras {sorted(table)}"
    for name, requirements in declared.items():
        if name in ("all", "dev"):
            continue
        for requirement in requirements:
            package = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0]
            assert f"`{package}`" in table[name], f"{page.name}: {name} should name {package}"


def test_shown_versions_are_the_package_version() -> None:
    version = PYPROJECT["project"]["version"]
    for page in PAGES:
        for shown in re.findall(r"^vramkit (\d\S*) · torch", page.read_text("utf-8"), re.M):
            assert shown == version, f"{page.name} shows vramkit {shown}; the package is {version}"


def test_the_site_links_the_declared_source_and_lists_every_page() -> None:
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    source = PYPROJECT["project"]["urls"]["Source"]
    assert f"repo_url: {source}" in mkdocs
    for page in (ROOT / "docs").rglob("*.md"):
        name = page.relative_to(ROOT / "docs").as_posix()
        assert f" {name}\n" in mkdocs, f"docs/{name} is not in mkdocs.yml's nav"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
