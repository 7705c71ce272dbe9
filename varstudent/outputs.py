"""Safe output folders: one run at a time per artifacts root, and each stage's folder appears whole.

- `out_lock(root)`: an exclusive `flock` on ROOT/.varstudent.lock, held for the whole command. The kernel
  drops it when the holder exits, however it dies (kill -9 included), so a lock left by a dead process is
  simply taken over; the file records the holder's PID and command for the message a second run prints.
- `staged(final)`: the stage writes into a fresh sibling folder, which replaces `final` only when the stage
  has succeeded. A failed or killed stage leaves the previous complete outputs (or none), never a mix.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from varstudent.errors import VarstudentError

log = logging.getLogger("varstudent")

LOCK_FILE = ".varstudent.lock"
_held: dict[Path, int] = {}  # root -> nesting depth, so `run` can hold the lock across its stages


class LockedError(VarstudentError):
    """Another varstudent process is writing into the same artifacts root."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


@contextmanager
def out_lock(root: Path) -> Iterator[None]:
    """Hold the artifacts root for this process; a second process gets a LockedError naming the holder."""
    root = Path(root).absolute()
    if root in _held:
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    if root.exists() and not root.is_dir():
        raise VarstudentError(f"--out {root} is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{root} is in use by another varstudent run ({_holder(path)}); wait for it to "
                              "finish or pass another --out") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:  # the last holder exited without tidying up (e.g. it was killed): its lock is free now
            log.info("taking over the lock of a finished or dead run (%s)", previous)
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        command = command if len(command) <= 200 else command[:199] + "…"  # cut: say so, it names options
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `{command}`, since {time.strftime('%H:%M:%S')}".encode(), 0)
        _held[root] = 1
        try:
            yield
        finally:
            del _held[root]
            os.ftruncate(fd, 0)  # an empty lock file = released cleanly
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _sweep(final: Path) -> None:
    """Remove staging and retired folders that a killed earlier run of this stage left behind."""
    for leftover in final.parent.glob(f".{final.name}.*"):
        if leftover.is_dir() and leftover.name.rsplit(".", 1)[-1] in ("staging", "retired"):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield an empty folder to write the stage's outputs into; on success it becomes `final`.

    Two renames swap it in (old -> retired, staging -> final): a reader in between sees no folder
    (a clear "run the stage first" error), never half of one. Call under `out_lock`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    staging = final.parent / f".{final.name}.{os.getpid()}.staging"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.parent / f".{final.name}.{os.getpid()}.retired"
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
