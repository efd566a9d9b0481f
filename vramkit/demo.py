"""``vramkit demo``: a walkthrough that needs no download and no GPU.

It builds a real torch model, reads memory before and after, frees the model
and cleans up, printing what each step cost and gave back.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["add_arguments", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--device", default=None, help="where the model goes (default: best)")
    parser.add_argument("--mib", type=float, default=256.0, help="model size in MiB (256)")


def run_demo(args: argparse.Namespace) -> int:
    """Run the walkthrough; returns the exit status."""
    import gc

    import torch

    import vramkit
    from vramkit.devices import resolve_device

    device = resolve_device(args.device)
    print(f"vramkit {vramkit.__version__} demo on {device}")
    baseline = vramkit.snapshot(device)
    print(f"  baseline   {baseline[str(device)]}")

    started = time.perf_counter()
    width = 1024
    layers = max(1, round(args.mib * 1024**2 / (width * width * 4)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    model = model.to(device.torch).eval()
    with torch.inference_mode():
        model(torch.randn(8, width, device=device.torch))
    loaded = vramkit.snapshot(device)
    print(f"  loaded     {loaded[str(device)]}  ({time.perf_counter() - started:.2f} s)")
    print(f"             {(loaded - baseline)[str(device)]}")

    del model
    gc.collect()
    report = vramkit.cleanup(device)
    print(f"  unloaded   {report.after[str(device)]}")
    print(f"             {(report.after - loaded)[str(device)]}")
    print(f"  vs start   {(report.after - baseline)[str(device)]}")
    return 0
