"""ONNX files for ONNX Runtime, built with the ``onnx`` helper: an MLP and a chain sized in MiB."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from vramkit._optional import require
from vramkit.errors import InvalidArgumentError

__all__ = [
    "build_onnx_matmul_chain",
    "build_onnx_mlp",
]

_MIB = 1 << 20


_ONNX_OPSET = 17  # ONNX Runtime >= 1.14 runs it
_ONNX_IR_VERSION = 8


def _save_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    onnx = require("onnx", "build_onnx_*")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp_name)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return target


def _onnx_model(graph: Any) -> Any:
    onnx = require("onnx", "build_onnx_*")
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="vramkit.testing",
    )
    model.ir_version = _ONNX_IR_VERSION
    return model


def build_onnx_mlp(
    path: str | os.PathLike[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    in_features: int = 16,
    out_features: int = 4,
    seed: int = 0,
) -> Path:
    """Write a small MLP as an ONNX file (MatMul + Add, Relu between layers).

    Input ``x``: float32 ``[batch, in_features]``; output ``y``: float32
    ``[batch, out_features]``. ``layers`` counts the weight matrices
    (``layers - 1`` hidden layers of width ``hidden``).

    Args:
        path: File to write (replaced atomically if it exists).
        hidden: Width of the hidden layers.
        layers: Number of linear layers (>= 1).
        in_features: Width of the input.
        out_features: Width of the output.
        seed: Seed of the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidArgumentError: A size is not positive.
    """
    if min(hidden, layers, in_features, out_features) < 1:
        raise InvalidArgumentError(
            "build_onnx_mlp needs hidden, layers, in_features and out_features >= 1, got "
            f"{hidden=}, {layers=}, {in_features=}, {out_features=}"
        )
    onnx = require("onnx", "build_onnx_mlp")
    np = require("numpy", "build_onnx_mlp", extra="onnx")  # onnx brings it
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(seed)
    widths = [in_features] + [hidden] * (layers - 1) + [out_features]
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        weight = (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)
        bias = (0.01 * rng.standard_normal(n_out)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(widths) - 2
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["y" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "vramkit_tiny_mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", out_features])],
        initializer=inits,
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)
    return _save_onnx(model, path)


def build_onnx_matmul_chain(
    path: str | os.PathLike[str], *, mib: float = 256, n: int | None = None, seed: int = 0
) -> Path:
    """Write a chain of square MatMuls whose weights total about ``mib`` MiB.

    Input ``x``: float32 ``[batch, n]``; output ``y``: float32 ``[batch, n]``.
    Each weight is an ``n x n`` float32 initializer scaled by ``1/sqrt(n)`` so
    activations keep their size along the chain. Without ``n``, it is the
    largest power of two up to 1024 whose matrix fits in ``mib``, and the
    number of matrices is ``round(mib MiB / matrix bytes)`` (256 MiB: 64
    matrices of 1024 x 1024).

    Args:
        path: File to write (replaced atomically if it exists).
        mib: Target size of all weights in MiB (> 0).
        n: Matrix side; None to choose as above.
        seed: Seed of the weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidArgumentError: ``mib`` or ``n`` is not positive.
    """
    if not mib > 0 or (n is not None and n < 1):
        raise InvalidArgumentError(
            f"build_onnx_matmul_chain needs mib > 0 and n >= 1, got {mib=}, {n=}"
        )
    onnx = require("onnx", "build_onnx_matmul_chain")
    np = require("numpy", "build_onnx_matmul_chain", extra="onnx")  # onnx brings it
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    target_bytes = mib * _MIB
    if n is None:
        n = 1024
        while n > 8 and n * n * 4 > target_bytes:
            n //= 2
    count = max(1, round(target_bytes / (n * n * 4)))
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / math.sqrt(n))
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    for i in range(count):
        weight = rng.standard_normal((n, n), dtype=np.float32)
        weight *= scale
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        out = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "vramkit_matmul_chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", n])],
        initializer=inits,
    )
    return _save_onnx(_onnx_model(graph), path)
