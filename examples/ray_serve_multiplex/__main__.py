"""``python -m examples.ray_serve_multiplex``: a local Ray cluster, one deployment, a request mix.

Writes six checkpoints to a temporary model store, starts Ray and Serve on
127.0.0.1, deploys two replicas with 128 MiB each, sends requests for the six
model ids and prints where each went and what each replica held; then shuts
everything down. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramkit import format_bytes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.ray_serve_multiplex",
        description="Ray Serve model multiplexing with a memory budget per replica.",
    )
    parser.add_argument("--requests", type=int, default=36, help="how many requests (36)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (0)")
    return parser


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ask(url: str, model_id: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"serve_multiplexed_model_id": model_id})
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.load(response))


def _summary(status: dict[str, Any]) -> str:
    pool = status["pool"]
    evictions = ", ".join(f"{n} to {tier}" for tier, n in status["evictions"].items()) or "none"
    held = ", ".join(
        f"{m['name']} ({m['state'].lower()}{', ' + m['tier'] if m['tier'] else ''})"
        for m in pool["models"]
        if m["state"] != "UNLOADED"
    )
    return (
        f"replica {status['replica']}: peak {format_bytes(pool['peak_charged_bytes'])} of "
        f"{format_bytes(pool['budget_bytes'])}; {status['loads']} loads, {status['wakes']} "
        f"wakes, evictions: {evictions}\n    holds {held}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the exit status."""
    args = _parser().parse_args(argv)
    import ray
    import ray.cloudpickle
    from ray import serve

    from . import app

    ray.cloudpickle.register_pickle_by_value(app)  # replicas need not find this directory
    store = app.write_store(Path(tempfile.mkdtemp(prefix="vramkit-model-store-")))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app.Models.bind(str(store)), route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        rng = random.Random(args.seed)
        ids = list(app.MODELS)
        latest: dict[str, dict[str, Any]] = {}
        for model_id in [rng.choice(ids) for _ in range(args.requests)]:
            started = time.perf_counter()
            answer = _ask(url, model_id)
            took = time.perf_counter() - started
            latest[answer["replica"]] = answer
            print(
                f"{model_id:>7} -> replica {answer['replica']}  {took * 1e3:7.1f} ms  "
                f"{format_bytes(answer['pool']['charged_bytes']):>10} of "
                f"{format_bytes(answer['pool']['budget_bytes'])} in use"
            )
        print()
        for status in latest.values():
            print(_summary(status))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
