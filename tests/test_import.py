from __future__ import annotations

import json

from .helpers import run_python


def test_import_is_light_and_initialises_nothing() -> None:
    out = run_python(
        """
        import json, sys
        import torch  # torch itself may import pynvml; vramkit must add nothing heavy
        before = set(sys.modules)
        import vramkit
        added = sorted(set(sys.modules) - before)
        from vramkit.devices import _nvml
        print(json.dumps({
            "heavy": [m for m in added if m.split(".")[0] in
                      {"funasr", "onnxruntime", "pynvml", "matplotlib", "safetensors", "onnx"}],
            "cuda_initialized": torch.cuda.is_initialized(),
            "nvml_started": _nvml._nvml is not None,
        }))
        """
    )
    result = json.loads(out)
    assert result == {"heavy": [], "cuda_initialized": False, "nvml_started": False}


def test_snapshot_and_cleanup_do_not_initialise_cuda() -> None:
    out = run_python(
        """
        import json, torch, vramkit
        vramkit.snapshot(); vramkit.cleanup(); vramkit.live_tensors()
        print(json.dumps(torch.cuda.is_initialized()))
        """
    )
    assert json.loads(out) is False


def test_events_and_the_cross_process_commands_import_no_framework() -> None:
    # `vramkit ps` answers in a fraction of a second because nothing it imports
    # imports torch; events (which describe readings) are part of that.
    out = run_python(
        """
        import json, sys
        import vramkit.events, vramkit._layers, vramkit._ps
        print(json.dumps(sorted(m for m in ("torch", "numpy") if m in sys.modules)))
        """
    )
    assert json.loads(out) == []
