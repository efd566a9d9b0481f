"""Spawning a worker: a fresh interpreter (never a fork), given only the descriptors it needs.

A fork would copy the parent's CUDA state and any mutex another thread held,
so a worker is a new interpreter, as ``multiprocessing``'s ``spawn`` makes
one. Unlike ``multiprocessing``, it does not re-run the parent's ``__main__``
unless the model's loader lives there: a script without an
``if __name__ == "__main__":`` guard keeps working as long as its loaders come
from a module or an import path. Its stdout and stderr go to the log pipe from
the first byte, so even a failure to start shows in the crash report.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.spawn
import os
import pickle
import subprocess
import sys
from typing import Any, Final

__all__ = ["WorkerProcess", "main_preparation"]

_BOOTSTRAP: Final = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from vramkit.isolation._child import main; main(*map(int, sys.argv[2:]))"
)


def main_preparation(spec: object) -> dict[str, Any]:
    """How the worker must set up ``__main__`` before it can unpickle ``spec``.

    Empty unless something in ``spec`` is defined in ``__main__`` (a loader in
    the script being run): only then does the worker import the script, as
    ``__mp_main__``, the way ``multiprocessing`` does for every child.
    """
    if b"__main__" not in pickle.dumps(spec):
        return {}
    data = multiprocessing.spawn.get_preparation_data("vramkit-worker")
    return {k: data[k] for k in ("init_main_from_name", "init_main_from_path") if k in data}


class WorkerProcess:
    """A spawned worker: its pid, a descriptor that becomes readable when it exits, its status.

    Args:
        popen: The process.
        sentinel: A pidfd where the kernel has them, else the read end of a
            pipe whose only write end the worker holds.
    """

    def __init__(self, popen: subprocess.Popen[bytes], sentinel: int) -> None:
        self._popen = popen
        self.sentinel = sentinel
        self.pid = popen.pid

    @classmethod
    def spawn(cls, sock_fd: int, lifeline_fd: int, log_fd: int) -> WorkerProcess:
        """Start ``python -c <bootstrap>`` with this process's ``sys.path``.

        Args:
            sock_fd: The worker's end of the call socket.
            lifeline_fd: The read end of the lifeline pipe.
            log_fd: Where its stdout and stderr go.
        """
        sentinel_r, sentinel_w = os.pipe()
        path = [entry or os.getcwd() for entry in sys.path]
        try:
            popen = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOTSTRAP,
                    json.dumps(path),
                    str(sock_fd),
                    str(lifeline_fd),
                    str(sentinel_w),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(sock_fd, lifeline_fd, sentinel_w),
                # The caller's record lists the model (with this worker's pid);
                # a record of the worker's own would show it twice in `vramkit ps`.
                env={**os.environ, "VRAMKIT_PUBLISH": "0"},
            )
        except BaseException:
            os.close(sentinel_r)
            raise
        finally:
            os.close(sentinel_w)
        sentinel = sentinel_r
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            # Exact even when the model forks children that inherit the pipe.
            with contextlib.suppress(OSError):
                sentinel = pidfd_open(popen.pid)
                os.close(sentinel_r)
        return cls(popen, sentinel)

    @property
    def exitcode(self) -> int | None:
        """The exit status once it ended (negative: the signal that ended it), else ``None``."""
        return self._popen.poll()

    def join(self, timeout: float | None) -> None:
        """Wait (at most ``timeout`` seconds) for it to end, and reap it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        """Send ``SIGTERM`` (nothing once it was reaped)."""
        self._popen.terminate()

    def kill(self) -> None:
        """Send ``SIGKILL`` (nothing once it was reaped)."""
        self._popen.kill()

    def close(self) -> None:
        """Close the sentinel (the process must have ended)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
