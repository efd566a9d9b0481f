"""The example web app in a real browser: transcribe, then free memory from the panel.

Headless Chromium (Debian's ``chromium`` package) driven by Playwright for
Python loads the app from examples/asr_webui, served on a free loopback port
with the demo's tiny offline models (tests/webui_server.py, in its own
process). One app and one browser serve the whole module, and every wait is
on a condition of the page or a line from the server, with a timeout.

Where Chromium or Playwright is missing the module is skipped, saying which;
with ``VRAMKIT_REQUIRE_BROWSER=1`` (as CI runs) it fails instead. A screenshot
of the panel is written to ``$VRAMKIT_TEST_ARTIFACTS`` (default: pytest's
temporary directory).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("VRAMKIT_CHROMIUM", "/usr/bin/chromium")
# Bounds for a loaded machine: every wait ends as soon as its condition holds.
TIMEOUT_S = 180.0


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("VRAMKIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"VRAMKIT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """tests/webui_server.py in a child process, steered by lines on its stdin."""

    def __init__(self, cache_dir: Path, log: Path) -> None:
        self._log = log
        self._stderr = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.webui_server", "--port", str(_free_port()),
             "--cache-dir", str(cache_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"},
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        self.url = self.wait_for("serving ").removeprefix("serving ")

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, prefix: str) -> str:
        """The next line from the server that starts with ``prefix``."""
        while True:
            try:
                line = self._lines.get(timeout=TIMEOUT_S)
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"the web app never said {prefix!r}; its log:\n{self._log.read_text()[-3000:]}"
                )
            if line.startswith(prefix):
                return line

    def send(self, command: str, answer: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self.wait_for(answer)

    def stop(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()  # end of stdin: the app stops
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            self._reader.join(TIMEOUT_S)  # the pipe ends with the process
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for module, extra in (("funasr", "funasr"), ("kaldi_native_fbank", "funasr"),
                          ("gradio", "webui")):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (vramkit[{extra}])")
    _need(
        shutil.which(CHROMIUM) is not None, f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    )
    _need(
        importlib.util.find_spec("playwright") is not None,
        "playwright is not installed (pip install playwright; it needs no browser download)",
    )
    folder = tmp_path_factory.mktemp("webui")
    server = Server(folder / "models", folder / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_S * 1000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_S * 1000)
            page.goto(server.url)
            yield page
        finally:
            browser.close()


def _write_wav(path: Path, seconds: float, seed: int) -> Path:
    from vramkit.testing.models import synthetic_audio

    samples = (synthetic_audio(seconds, seed=seed) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.tobytes())
    return path


def _artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("VRAMKIT_TEST_ARTIFACTS")
    folder = Path(configured) if configured else tmp_path_factory.getbasetemp() / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class App:
    """What the test reads and does on the page."""

    def __init__(self, page: Any, folder: Path) -> None:
        self.page = page
        self.folder = folder

    def textbox(self, elem_id: str) -> Any:
        return self.page.locator(f"#{elem_id} textarea")

    def row(self, model: str) -> Any:
        return self.page.locator(f'#vramkit-models tr[data-model="{model}"]')

    def pool_line(self) -> Any:
        return self.page.locator('#vramkit-memory [data-pool="demo"]')

    def number(self, locator: Any, attribute: str) -> int:
        return int(locator.get_attribute(attribute))

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def upload(self, seconds: float, seed: int) -> None:
        from playwright.sync_api import expect

        clip = _write_wav(self.folder / f"clip-{seed}.wav", seconds, seed)
        clear = self.page.locator("#asr-input button[aria-label=Clear]")
        if clear.count():  # a clip is loaded: the upload area comes back once it is cleared
            clear.click()
        self.page.locator("#asr-input input[type=file]").set_input_files(str(clip))
        link = self.page.locator("#asr-input [data-testid=download-link]")
        expect(link).to_have_attribute("href", re.compile(re.escape(clip.name) + "$"))


def test_transcribe_then_free_memory_from_the_panel(
    server: Server, page: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from playwright.sync_api import expect

    app = App(page, tmp_path)

    # 1. An uploaded WAV goes through ASR -> LM -> TTS.
    expect(page.locator("#asr-notice")).to_contain_text("random-weight stand-ins")
    app.upload(1.5, seed=3)
    page.click("#asr-run")
    expect(app.textbox("asr-status")).to_have_value(re.compile(r"^request 1 done: asr "))
    assert app.textbox("asr-transcript").input_value().strip()
    assert app.textbox("asr-summary").input_value().strip()
    read_back = page.locator("#asr-tts [data-testid=download-link]")
    expect(read_back).to_have_attribute("href", re.compile(r"\.wav$"))

    # 2. The panel: the memory line, the pool's line, a row per model.
    app.tab("Memory")
    expect(page.locator("#vramkit-memory .vramkit-line").first).to_have_text(
        re.compile(r"^(RAM|GPU \d+ Memory): [\d.]+ / [\d.]+ [KMGT]iB \(\d+%\)$")
    )
    expect(app.pool_line()).to_contain_text(re.compile(r"pool demo on \w+: .* charged"))
    for name in ("asr", "llm", "tts"):
        expect(app.row(name)).to_have_attribute(
            "data-state", re.compile(r"^(READY|OFFLOADED|UNLOADED)$")
        )

    # 3. Wake the ASR model, then unload it: its state and the memory lines follow.
    page.click("#vramkit-asr-wake")
    expect(app.textbox("vramkit-result")).to_have_value(re.compile(r"^(✅ (loaded|woke)|💤) .*asr"))
    expect(app.row("asr")).to_have_attribute("data-state", "READY")
    asr_bytes = app.number(app.row("asr"), "data-device-bytes")
    charged = app.number(app.pool_line(), "data-charged-bytes")
    text = app.pool_line().inner_text()
    assert asr_bytes > 0
    page.click("#vramkit-asr-unload")
    expect(app.textbox("vramkit-result")).to_have_value(re.compile(r"^✅ unloaded asr: .* back "))
    expect(app.row("asr")).to_have_attribute("data-state", "UNLOADED")
    expect(app.pool_line()).to_have_attribute("data-charged-bytes", str(charged - asr_bytes))
    expect(app.pool_line()).not_to_have_text(text)
    expect(page.locator("#vramkit-log tr[data-action=unload][data-outcome=ok]")).to_have_count(1)

    # 4. Unload during a running transcription: busy, the holder named, nothing done;
    #    the page keeps refreshing meanwhile, and the transcription ends undisturbed.
    server.send("hold", "holding")
    app.tab("Transcribe")
    app.upload(1.0, seed=5)
    page.click("#asr-run")
    server.wait_for("held")
    app.tab("Memory")
    expect(app.row("asr")).to_have_attribute("data-leases", "1")
    page.click("#vramkit-asr-unload")
    expect(app.textbox("vramkit-result")).to_have_value(
        re.compile(r"^⏳ asr has 1 lease out .*'transcription_\d+'.*\(nothing was done\)$", re.S)
    )
    expect(app.row("asr")).to_have_attribute("data-state", "READY")
    expect(page.locator("#vramkit-log tr[data-action=unload][data-outcome=busy]")).to_have_count(1)
    shot = _artifacts(tmp_path_factory) / "memory-panel.png"
    page.locator("#memory-tab").screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    server.send("release", "released")
    expect(app.row("asr")).to_have_attribute("data-leases", "0")
    app.tab("Transcribe")
    expect(app.textbox("asr-status")).to_have_value(re.compile(r"^request 2 done: asr "))
    assert app.textbox("asr-transcript").input_value().strip()
