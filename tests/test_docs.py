"""Every ``python`` code block in the docs and README runs.

Blocks of one page run in order in one fresh interpreter, sharing a namespace,
so a page reads like a session. A block whose first line is
``# requires: cuda`` (or ``mps``, ``funasr``, ``onnx``) runs only where that is
available.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from .helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _available(requirement: str) -> bool:
    if requirement == "cuda":
        return bool(torch.cuda.is_available())
    if requirement == "mps":
        return bool(torch.backends.mps.is_available())
    return importlib.util.find_spec(requirement) is not None


def _runnable_blocks(page: Path) -> list[str]:
    blocks = []
    for block in BLOCK.findall(page.read_text(encoding="utf-8")):
        first = block.splitlines()[0] if block.strip() else ""
        match = re.match(r"#\s*requires:\s*([\w, ]+)", first)
        if match and not all(_available(r.strip()) for r in match.group(1).split(",")):
            continue
        blocks.append(block)
    return blocks


@pytest.mark.parametrize(
    "page", [p for p in PAGES if BLOCK.search(p.read_text(encoding="utf-8"))], ids=lambda p: p.name
)
def test_code_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = _runnable_blocks(page)
    if not blocks:
        pytest.skip(f"every python block in {page.name} needs hardware this machine lacks")
    script = "\n\n".join(blocks)
    code = f"import os; os.chdir({str(tmp_path)!r})\n" + script
    run_python(code, timeout=300)
