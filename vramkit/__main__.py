"""``python -m vramkit``: the same as the ``vramkit`` command."""

from vramkit.cli import main

raise SystemExit(main())
