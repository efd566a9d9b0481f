"""Process isolation: a model in a worker process of its own.

``ManagedModel(..., isolate=True)`` runs the loader in a worker process
(a fresh interpreter, never a fork: no inherited CUDA state or locked
mutexes) and lends
a :class:`WorkerProxy` that forwards calls and attribute access to it.
Unloading ends the process, which returns what no in-process unload can: the
CUDA context, cuBLAS and cuDNN workspaces, ONNX Runtime's arena, native
buffers, and memory leaked by code you cannot fix. A crash in the model (a
segfault, ``os._exit``, an out-of-memory kill) fails the calls in flight with
:class:`~vramkit.WorkerCrashedError` instead of taking the caller down, and
the next use starts a new worker. POSIX systems only (Linux, macOS): the
transport passes file descriptors over a Unix socket.
"""

from __future__ import annotations

from vramkit.isolation._proxy import WorkerProxy, call_timeout, worker_pid
from vramkit.isolation._spec import Isolation

__all__ = ["Isolation", "WorkerProxy", "call_timeout", "worker_pid"]
