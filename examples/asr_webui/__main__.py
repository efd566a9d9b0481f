"""``python -m examples.asr_webui``: build the demo's models (first run only) and serve the app.

The app listens on 127.0.0.1 only and prints its local URL; Ctrl+C stops it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.asr_webui",
        description="Offline ASR -> LLM -> TTS web app with vramkit's memory panel.",
    )
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (7860)")
    parser.add_argument(
        "--budget", default=None, help="the pool's budget, e.g. 128MiB (default: 1.2x the largest)"
    )
    parser.add_argument("--device", default=None, help="default: CUDA when present, else cpu")
    parser.add_argument("--cache-dir", default=None, help="where the models are built")
    parser.add_argument(
        "--refresh", type=float, default=2.0, help="seconds between panel refreshes (2)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the app until interrupted; returns the exit status."""
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"--port must be in 1..65535; got {args.port}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: nothing phones home
    from pathlib import Path

    from vramkit.demo import open_pool

    from .app import Pipeline, build_app, offline_theme

    print("building the tiny offline models (first run only) and importing FunASR ...")
    pool = open_pool(
        device=args.device,
        budget=args.budget,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    pipeline = Pipeline(pool)
    app = build_app(pipeline, refresh=args.refresh)
    try:
        app.launch(
            server_name="127.0.0.1",
            server_port=args.port,
            prevent_thread_lock=True,
            quiet=True,
            theme=offline_theme(),
        )
        print(f"vramkit ASR web UI running on {app.local_url} (Ctrl+C to stop)", flush=True)
        app.block_thread()
    finally:
        app.close()
        pipeline.close()
        pool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
