"""``python -m vramkit.demo [OPTIONS]``: the same as ``vramkit demo [OPTIONS]``."""

from __future__ import annotations

import sys

from vramkit.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
