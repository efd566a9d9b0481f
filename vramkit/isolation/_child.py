"""The worker process: build the model, answer calls, exit with (or without) its parent.

This module runs in the spawned worker. It keeps its imports light: torch,
the model's framework and vramkit's model code load when the spec is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import multiprocessing.spawn
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from vramkit.isolation._spec import WorkerSpec
from vramkit.isolation._transport import Channel, ChannelClosedError

__all__ = ["ROOT", "Remote", "RemoteError", "main"]

_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
PARENT_GONE: Final = 70  # exit status of a worker whose parent died


class _Root:
    """Stands for the worker's model object itself in a reply (``model.eval()`` returns it)."""

    def __reduce__(self) -> str:
        return "ROOT"


ROOT: Final = _Root()


@dataclass(frozen=True, slots=True)
class Remote:
    """A reply's stand-in for an attribute that stays in the worker (a method, a submodule).

    Attributes:
        callable: Whether calling it makes sense.
    """

    callable: bool


@dataclass(frozen=True, slots=True)
class RemoteError:
    """An exception raised in the worker, as it travels back.

    Attributes:
        type_name: ``module.QualName`` of the exception's type.
        message: ``str()`` of it.
        traceback: The worker's formatted traceback.
        pickled: The exception itself, pickled, when it could be (and unpickled
            back in the worker, so its constructor round-trips).
    """

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None

    @classmethod
    def of(cls, exc: BaseException) -> RemoteError:
        """Describe ``exc`` for the caller."""
        kind = type(exc)
        text = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
        pickled: bytes | None
        try:
            pickled = pickle.dumps(exc)
            pickle.loads(pickled)
        except Exception:
            pickled = None  # the caller raises a RuntimeError with the same text
        return cls(f"{kind.__module__}.{kind.__qualname__}", str(exc), text, pickled)


def main(sock_fd: int, lifeline_fd: int, sentinel_fd: int, parent_pid: int) -> None:
    """Entry point of the worker process (``python -c`` runs it; see ``_process``).

    Its stdout and stderr are already the parent's log pipe.

    Args:
        sock_fd: This end of the call channel.
        lifeline_fd: The read end of a pipe only the parent holds open: end of
            file there means the parent is gone.
        sentinel_fd: The write end of the pipe the parent watches for our
            exit: held, never written.
        parent_pid: The parent's process id, to notice it died before we watched.
    """
    _exit_with_parent(lifeline_fd, parent_pid)
    for fd in (sock_fd, lifeline_fd, sentinel_fd):
        os.set_inheritable(fd, False)  # not for the processes the model may start
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # The terminal's Ctrl-C reaches the whole process group; the parent decides
    # what it means, and ends its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a segfault prints the Python stack into the log
    channel = Channel(socket.socket(fileno=sock_fd))
    preparation = channel.recv()
    if preparation:
        multiprocessing.spawn.prepare(preparation)  # import the script as __mp_main__
    _Server(channel).serve()
    # Served its last request: leave now. Interpreter shutdown would wait for
    # any non-daemon thread the model started, and the operating system
    # returns the memory, the CUDA context and the files all the same.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_with_parent(lifeline_fd: int, parent_pid: int) -> None:
    """Die when the parent does: ``PR_SET_PDEATHSIG`` where Linux has it, and the lifeline pipe.

    The signal covers a parent killed while this process is busy in native
    code; the pipe covers everything else (and other systems). The parent
    starts workers from a thread that lives as long as it does, because the
    kernel sends the signal when the *thread* that forked exits.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(PARENT_GONE)  # it died before the signal was armed

    def watch() -> None:
        with contextlib.suppress(OSError):
            os.read(lifeline_fd, 1)  # blocks until the parent's end closes
        os._exit(PARENT_GONE)

    threading.Thread(target=watch, name="vramkit-lifeline", daemon=True).start()


class _Server:
    """Answers the parent's requests, one at a time, with the worker's ManagedModel."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._model: Any = None  # the worker's ManagedModel
        self._ops: dict[str, Callable[..., Any]] = {
            "call": self._call,
            "get": self._get,
            "set": self._set,
            "dir": self._dir,
            "len": self._len,
            "offload": self._offload,
            "wake": self._wake,
            "read": self._read,
        }

    def serve(self) -> None:
        try:
            request = self._channel.recv()
        except ChannelClosedError:
            return
        call_id, _, spec = request
        try:
            info = self._start(spec)
        except Exception as exc:
            self._channel.send((call_id, False, RemoteError.of(exc)))
            return
        self._channel.send((call_id, True, info))
        while True:
            try:
                self._channel.spin()  # calls in a loop: the next arrives on a running worker
                frame = self._channel.recv_frame()
            except ChannelClosedError:
                return  # the parent closed the channel: nothing more to do
            try:
                call_id, op, payload = self._channel.decode(frame)
            except Exception as exc:
                # An argument that cannot be rebuilt here (its class is not
                # importable in the worker): the caller, waiting in step, gets
                # the error as the answer to its request, whose id it carries.
                self._channel.send((None, False, RemoteError.of(exc)))
                continue
            if op == "stop":
                self._channel.send((call_id, True, None))
                return
            self._answer(call_id, op, payload)

    def _start(self, spec: WorkerSpec) -> dict[str, Any]:
        model = spec.build()
        report = model.load()
        self._model = model
        with model.use() as obj:
            kind = type(obj)
            return {
                "pid": os.getpid(),
                "type": f"{kind.__module__}.{kind.__qualname__}",
                "callable": callable(obj),
                "load": report,
            }

    def _answer(self, call_id: int, op: str, payload: Any) -> None:
        try:
            reply: tuple[int, bool, Any] = (call_id, True, self._ops[op](*payload))
        except Exception as exc:
            reply = (call_id, False, RemoteError.of(exc))
        try:
            self._channel.send(reply)
        except ChannelClosedError:
            raise
        except Exception as exc:
            # The result could not be pickled (a generator, a lock, a module
            # holding open files): an attribute then stays here, behind a
            # proxy; anything else is the caller's error to see.
            if op == "get" and reply[1]:
                self._channel.send((call_id, True, Remote(callable(reply[2]))))
            else:
                self._channel.send((call_id, False, RemoteError.of(exc)))

    def _call(
        self, path: tuple[tuple[str, Any], ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        with self._model.use() as obj:
            result = _resolve(obj, path)(*args, **kwargs)
            if result is obj:
                return ROOT
        if isinstance(result, types.GeneratorType):
            return list(result)  # a generator cannot travel; its items can
        return result

    def _get(self, path: tuple[tuple[str, Any], ...]) -> Any:
        with self._model.use() as obj:
            value = _resolve(obj, path)
            if value is obj:
                return ROOT
            torch = sys.modules.get("torch")
            if callable(value) or (torch is not None and isinstance(value, torch.nn.Module)):
                return Remote(callable(value))
            return value

    def _set(self, path: tuple[tuple[str, Any], ...], step: tuple[str, Any], value: Any) -> None:
        with self._model.use() as obj:
            target = _resolve(obj, path)
            kind, key = step
            if kind == "attr":
                setattr(target, key, value)
            else:
                target[key] = value

    def _dir(self, path: tuple[tuple[str, Any], ...]) -> list[str]:
        with self._model.use() as obj:
            return sorted(dir(_resolve(obj, path)))

    def _len(self, path: tuple[tuple[str, Any], ...]) -> int:
        with self._model.use() as obj:
            return len(_resolve(obj, path))

    def _offload(self, tier: str) -> Any:
        return self._model.offload(tier)

    def _wake(self) -> Any:
        return self._model.wake()

    def _read(self) -> Any:
        """The worker's reading of its device, and its model's size, both in bytes."""
        from vramkit.devices import get_backend

        device = self._model.device
        return get_backend(device.kind).read(device.index or 0), self._model.size_bytes


def _resolve(obj: Any, path: tuple[tuple[str, Any], ...]) -> Any:
    for kind, key in path:
        obj = getattr(obj, key) if kind == "attr" else obj[key]
    return obj
