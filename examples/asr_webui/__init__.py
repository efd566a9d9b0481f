"""An offline ASR -> LLM -> TTS web app with vramkit's memory panel.

Run it with ``python -m examples.asr_webui`` from the repository's root.
"""
