"""The example web app, served for the browser tests, with its ASR stage under the test's control.

``python -m tests.webui_server --port P --cache-dir DIR`` prints ``serving URL``
once the app answers. Lines on stdin steer it: ``hold`` makes the next
transcriptions wait inside their ASR lease (answered ``holding``), ``release``
lets them go, ``quit`` (or the end of stdin) stops the app. Each transcription
that starts waiting prints ``held``.

The app runs in its own process so that Gradio's own warnings and leftovers
(event loops it never closes, files pydub leaves open) stay out of the test
process, whose warnings are errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np


class Gate:
    """An ASR stage that waits inside its lease while the test holds the gate."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def transcribe(self, asr: Any, audio: np.ndarray) -> str:
        from vramkit.demo import transcribe

        if not self._open.is_set():
            _say("held")
            if not self._open.wait(300):
                raise TimeoutError("the test never released the transcription")
        return transcribe(asr, audio)


def _say(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cache-dir", required=True)
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from examples.asr_webui.app import Pipeline, build_app, offline_theme
    from vramkit.demo import open_pool

    gate = Gate()
    pool = open_pool(cache_dir=Path(args.cache_dir))
    pipeline = Pipeline(pool, gate.transcribe)
    app = build_app(pipeline, refresh=0.5)
    try:
        app.launch(
            server_name="127.0.0.1",
            server_port=args.port,
            prevent_thread_lock=True,
            quiet=True,
            theme=offline_theme(),
        )
        _say(f"serving {app.local_url}")
        for line in sys.stdin:
            command = line.strip()
            if command == "hold":
                gate.hold()
                _say("holding")
            elif command == "release":
                gate.release()
                _say("released")
            elif command == "quit":
                break
    finally:
        gate.release()
        app.close()
        pipeline.close()
        pool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
