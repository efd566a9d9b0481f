"""The disk tier against a hostile neighbour and a careless user.

- Weight edits the old "unchanged" stamp could not see (a row written through
  ``.data``, a write through a numpy view) survive a re-offload, also when the
  pool evicts without being asked.
- The cache directory is private (0700, files 0600, unpredictable names), a
  directory owned by someone else or writable by others is refused, and a
  planted symlink or FIFO is never followed or opened blocking.
- A file changed between offload and wake (swapped, reshaped, bytes flipped)
  is not trusted: the model reloads through its loader, with a warning.
- The leftover sweep removes only what vramkit wrote, in its own
  subdirectory, and only when the writer is gone (also when it was PID 1 of a
  container).
- A full disk's ``OffloadError`` carries the OS's errno.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vramkit import ManagedModel, ModelPool, ModelState
from vramkit.errors import OffloadError

from ..helpers import run_python
from .conftest import Record

ROWS, DIM = 1000, 64


def embedding(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Embedding(ROWS, DIM)


def managed(tmp_path: Path, seed: int = 0, **options: Any) -> ManagedModel[torch.nn.Module]:
    options.setdefault("offload_dir", tmp_path / "cache")
    return ManagedModel.from_torch(
        lambda: embedding(seed), device="cpu", name=f"emb{seed}", inference_mode=False, **options
    )


IDS = torch.arange(ROWS)


# ---------------------------------------------------------------------- edits


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.weight.data.__setitem__(3, 7.0), id="row-through-data"),
        pytest.param(lambda m: m.weight.detach().numpy().__setitem__((500, 5), 7.0), id="numpy"),
        pytest.param(
            lambda m: m.weight.data[500].copy_(torch.full((DIM,), 7.0)), id="copy-into-a-row"
        ),
    ],
)
def test_an_edit_the_stamp_cannot_see_survives_a_re_offload(edit: Any, tmp_path: Path) -> None:
    mm = managed(tmp_path)
    mm.load()
    mm.offload("disk")
    mm.wake()
    with mm.use() as module, torch.no_grad():
        edit(module)
        expected = module.weight.detach().clone()
    del module
    report = mm.offload("disk")
    assert not report.reused_file
    with mm.use() as module:
        assert torch.equal(module.weight, expected), "the edit was reverted by the wake"


def test_pool_eviction_keeps_an_edit_made_after_a_disk_wake(tmp_path: Path) -> None:
    size = ROWS * DIM * 4
    with ModelPool("cpu", budget=int(1.5 * size), headroom=0, evict_to="disk") as pool:
        a = pool.register("a", embedding, size_hint=size, offload_dir=tmp_path)
        pool.register("b", lambda: embedding(1), size_hint=size, offload_dir=tmp_path)
        for name in ("a", "b", "a"):  # a: loaded, evicted to disk, woken from disk
            with pool.use(name):
                pass
        with pool.use("a") as module, torch.no_grad():
            module.weight.data[3] = 7.0  # the add-a-token idiom
        with pool.use("b"):
            pass  # evicts a to disk, without being asked
        assert a.tier == "disk"
        with pool.use("a") as module:
            assert torch.all(module.weight[3] == 7.0)


def test_an_unchanged_model_still_reuses_its_file(tmp_path: Path) -> None:
    mm = managed(tmp_path)
    mm.load()
    first = mm.offload("disk")
    mm.wake()
    again = mm.offload("disk")
    assert again.reused_file
    assert again.path == first.path


# ---------------------------------------------------------------------- directory trust


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("where", ["default", "given"])
def test_the_cache_directory_is_private_and_its_files_too(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("VRAMKIT_CACHE_DIR", raising=False)
    options = {} if where == "default" else {"offload_dir": tmp_path / "given"}
    mm = ManagedModel.from_torch(embedding, device="cpu", name="private", **options)
    mm.load()
    path = Path(mm.offload("disk").path or "")
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert path.parent.stat().st_uid == os.geteuid()
    mm.unload()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_directory_writable_by_others_is_refused(mode: int, tmp_path: Path) -> None:
    mm = managed(tmp_path)
    mm.load()
    mm.offload("disk")  # makes vramkit's own directory
    mm.wake()
    private = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    private.chmod(mode)
    other = managed(tmp_path, seed=1)
    other.load()
    with pytest.raises(OffloadError, match="writable by others"):
        other.offload("disk")
    assert other.state is ModelState.READY


def test_a_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    mm = managed(tmp_path)
    mm.load()
    mm.offload("disk")
    mm.wake()
    private = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    os.chown(private, 65534, 65534)  # nobody
    other = managed(tmp_path, seed=1)
    other.load()
    with pytest.raises(OffloadError, match="owned by"):
        other.offload("disk")
    assert other.state is ModelState.READY


def test_a_planted_symlink_at_the_old_predictable_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    mm = managed(tmp_path)
    mm.load()
    # The name the old code wrote its partial file under, planted in advance:
    for suffix in (".partial", ".safetensors"):
        planted = cache / f"{mm.name}-{os.getpid()}-{id(mm):x}{suffix}"
        planted.symlink_to(victim)
    report = mm.offload("disk")
    assert victim.read_text() == "precious"
    assert Path(report.path or "").is_file()
    assert not Path(report.path or "").is_symlink()


def test_temporary_names_are_unpredictable(tmp_path: Path) -> None:
    names = set()
    for _ in range(2):
        mm = managed(tmp_path)
        mm.load()
        names.add(Path(mm.offload("disk").path or "").name)
        mm.unload()
    assert len(names) == 2
    assert not any(str(os.getpid()) in name for name in names)


# ---------------------------------------------------------------------- what a wake trusts


_FIFO_OPENER = """
import os, sys, time
path, first = sys.argv[1], float(sys.argv[2])
time.sleep(first)
for _ in range(600):  # open the writing end whenever a reader waits, for a minute
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader waiting right now
        pass
    time.sleep(0.1)
"""


def _never_blocks(call: Any, fifo: Path, *, within: float = 10.0) -> tuple[bool, Any]:
    """Run ``call`` with a watchdog; True if it returned within ``within`` seconds.

    A reader blocked in ``open()`` on a FIFO may hold the GIL (the old wake
    did), so nothing in this process could free it: a helper process opens the
    writing end once ``within`` has passed, which lets the test end either way.
    """
    helper = subprocess.Popen([sys.executable, "-c", _FIFO_OPENER, str(fifo), str(within)])
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(call())
        except BaseException as exc:
            box.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within * 6)
    took = time.monotonic() - started
    helper.kill()
    helper.wait(10)
    return (not thread.is_alive() and took < within, box[0] if box else None)


def test_a_fifo_at_the_cache_path_never_blocks_a_wake(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reliability: Record
) -> None:
    mm = managed(tmp_path)
    before = mm(IDS)
    path = Path(mm.offload("disk").path or "")
    path.unlink()
    os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        done, report = _never_blocks(mm.wake, path)
    assert done, "opening the FIFO blocked the wake"
    assert not isinstance(report, BaseException), repr(report)
    assert report.fallback is not None
    assert "reloading with the loader" in caplog.text
    assert torch.equal(mm(IDS), before)
    reliability.area = "faults"
    reliability.load = "one model offloaded to disk"
    reliability.faults = "its cache file replaced by a FIFO"
    reliability.figures = {"wake": "fell back to the loader", "blocked": False}


def _replace_with_other_weights(target: Path, source: Path) -> None:
    os.replace(source, target)


def _reshape_file(target: Path, _: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(ROWS // 2, DIM * 2)}, str(target))


def _flip_bytes(target: Path, _: Path) -> None:
    with open(target, "r+b") as fh:
        fh.seek(-64, os.SEEK_END)
        fh.write(b"\xff" * 8)  # a NaN pattern in the last row


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_replace_with_other_weights, id="swapped"),
        pytest.param(_reshape_file, id="reshaped"),
        pytest.param(_flip_bytes, id="flipped-bytes"),
    ],
)
def test_a_file_changed_between_offload_and_wake_is_not_trusted(
    tamper: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, reliability: Record
) -> None:
    mm, other = managed(tmp_path), managed(tmp_path, seed=1)
    before = mm(IDS)
    other.load()
    path = Path(mm.offload("disk").path or "")
    other_path = Path(other.offload("disk").path or "")
    tamper(path, other_path)
    with caplog.at_level(logging.WARNING, logger="vramkit"):
        report = mm.wake()
    assert report is not None
    assert report.fallback is not None, "the changed file was trusted"
    assert "reloading with the loader" in caplog.text
    assert torch.equal(mm(IDS), before)
    reliability.area = "faults"
    reliability.load = "two models offloaded to disk"
    reliability.faults = f"the cache file {tamper.__name__.strip('_').replace('_', ' ')}"
    reliability.figures = {"wake": "fell back to the loader", "output": "unchanged"}


# ---------------------------------------------------------------------- the leftover sweep

USER_FILES = (
    "ckpt-20240101-1.safetensors",
    "model-step-5000-0.safetensors",
    "run-77777777-ab12.partial",
)


def test_the_sweep_never_touches_user_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in USER_FILES:
        (cache / name).write_bytes(b"mine")
    mm = managed(tmp_path)
    mm.load()
    mm.offload("disk")
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == sorted(USER_FILES)


def test_an_empty_offload_dir_is_refused() -> None:
    from vramkit.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="offload_dir"):
        ManagedModel(embedding, offload_dir="")


_KILLED_WRITER = """
    import os, sys, time
    from vramkit import ManagedModel
    from vramkit.testing.models import TinyMLP
    mm = ManagedModel.from_torch(lambda: TinyMLP(256), device="cpu", offload_dir=sys.argv[1])
    mm.load()
    print(mm.offload("disk").path, os.getpid(), flush=True)
    time.sleep(600)  # killed from outside: a PID 1 ignores a SIGKILL it sends itself
"""


def _killed_writer(directory: Path, *, pid_namespace: bool) -> tuple[Path, int]:
    """A process that writes a disk-tier file and is killed with SIGKILL: (its file, its pid)."""
    command = [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(directory)]
    if pid_namespace:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as writer:
        try:
            assert writer.stdout is not None
            path, pid = writer.stdout.readline().split()
            target = writer.pid
            if pid_namespace:  # unshare's child is the namespace's PID 1
                children = Path(f"/proc/{writer.pid}/task/{writer.pid}/children").read_text()
                target = int(children.split()[0])
            os.kill(target, signal.SIGKILL)
            writer.wait(60)
        finally:
            if writer.poll() is None:
                writer.kill()
    return Path(path), int(pid)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.parametrize("pid_namespace", [False, True], ids=["plain", "pid-1-in-a-container"])
def test_files_of_a_killed_process_are_swept(
    pid_namespace: bool, tmp_path: Path, reliability: Record
) -> None:
    if pid_namespace and not _can_unshare():
        pytest.skip("cannot make a PID namespace here (unshare)")
    cache = tmp_path / "cache"
    leftovers = []
    for _ in range(2):  # (the second writer already sweeps the first one's file)
        path, pid = _killed_writer(cache, pid_namespace=pid_namespace)
        assert path.exists()
        leftovers.append((path, pid))
    mm = managed(tmp_path)
    mm.load()
    mm.offload("disk")
    assert not any(path.exists() for path, _ in leftovers)
    reliability.area = "process exit"
    reliability.load = "2 processes offloading to disk" + (
        ", each PID 1 of its own PID namespace" if pid_namespace else ""
    )
    reliability.faults = "SIGKILL right after writing the disk tier"
    reliability.figures = {
        "writer pids": [pid for _, pid in leftovers],
        "leftovers after the next offload": 0,
    }


_LIVE_WRITER = """
    import sys
    from vramkit import ManagedModel
    from vramkit.testing.models import TinyMLP
    mm = ManagedModel.from_torch(lambda: TinyMLP(64), device="cpu", offload_dir=sys.argv[1])
    mm.load()
    print(mm.offload("disk").path, flush=True)
    sys.stdin.read()
"""


def test_files_of_a_live_process_are_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_LIVE_WRITER), str(cache)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        theirs = Path(writer.stdout.readline().strip())
        mm = managed(tmp_path)
        mm.load()
        mm.offload("disk")
        assert theirs.exists()
    finally:
        writer.communicate("", timeout=60)
    assert not theirs.exists()  # removed by its own process at exit


# ---------------------------------------------------------------------- errno


def test_a_full_disk_error_carries_the_os_errno(tmp_path: Path) -> None:
    out = run_python(
        f"""
        import json, resource, signal
        from vramkit import ManagedModel, OffloadError
        from vramkit.testing.models import TinyMLP
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mm = ManagedModel.from_torch(lambda: TinyMLP(512), device="cpu",
                                     offload_dir={str(tmp_path)!r})
        mm.load()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            mm.offload("disk")
        except OffloadError as exc:
            print(json.dumps({{"errno": exc.errno, "message": str(exc)}}))
        """
    )
    result = json.loads(out)
    assert result["errno"] == errno.EFBIG
    assert "nothing was lost" in result["message"]


def test_offload_error_keeps_its_errno_through_pickling() -> None:
    import pickle

    error = OffloadError("disk full", errno=errno.ENOSPC)
    assert error.errno == errno.ENOSPC
    assert str(error) == "disk full"
    copy = pickle.loads(pickle.dumps(error))
    assert copy.errno == errno.ENOSPC
    assert str(copy) == "disk full"
    assert OffloadError("no errno").errno is None


def test_the_numpy_edit_really_writes_into_the_weight() -> None:
    weight = torch.zeros(2, 2)
    view = weight.detach().numpy()
    view[0, 0] = 1.0
    assert isinstance(view, np.ndarray)
    assert weight[0, 0] == 1.0
