"""One writer per run folder: ``with RunLock(out, what="unclutter eval"): ...``.

Two identical ``unclutter eval`` (or ``unclutter train``) commands started into one folder would both
resume from the same state and both append every remaining answer, so each question got recorded
twice. The lock makes the second one fail at once with a message naming the first (PID, host, start
time, command line).

Why an OS advisory lock (``fcntl.flock``) on ``.unclutter-lock`` rather than a PID file: the kernel
holds the lock for the open file and drops it when the process dies, however it dies. A PID file
outlives a ``kill -9``, so the next run has to guess whether that PID is still the writer (it may have
been reused, be on another host, or be starting up right now), and two runs that both judge a file
stale race to delete and recreate it. With flock there is nothing to guess: whoever gets the lock is
the only writer, and a lock file whose owner line is still there but which nobody holds is simply the
leftover of a killed run, taken over with a one-line warning. The file is never deleted (deleting it
would let a waiting opener lock the old inode while a newcomer locks a new one); a clean exit empties
it instead, so "non-empty and unlocked" means "its writer was killed".

On Windows ``msvcrt.locking`` gives the same kernel-released lock on one byte far past the owner line
(so the line stays readable). Under torchrun / DeepSpeed only global rank 0 locks (`main_process_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

if sys.platform == "win32":  # pragma: no cover - not tested on Windows
    import msvcrt

    _WIN_OFFSET = 1 << 20  # lock a byte past the owner line: locked bytes cannot be read by others

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


LOCK_NAME = ".unclutter-lock"
log = logging.getLogger(__name__)


class RunLocked(ValueError):
    """Another live process writes this folder. A ValueError so that the CLIs report it as a usage error."""


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _parse(raw: bytes) -> dict:
    try:
        owner = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


class RunLock:
    """Exclusive, process-lifetime lock on ``folder`` (created if missing); a context manager."""

    def __init__(self, folder: str | Path, what: str = "unclutter eval", option: str = "--out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.option = option  # the command-line option that names the folder, for the error message
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a file where the folder should be, a read-only file system, ...
            raise ValueError(f"{self.option} {self.folder}: cannot create its lock file ({exc.strerror}).") from None
        try:
            locked = _try_lock(fd)
        except OSError as exc:  # e.g. ENOLCK: a network file system without locks
            os.close(fd)
            raise ValueError(
                f"{self.option} {self.folder}: its file system cannot lock files ({exc.strerror}); use a local folder."
            ) from None
        if not locked:
            os.close(fd)
            owner = self._read_owner()
            cmd = f"; command: {owner['command']}" if owner.get("command") else ""
            who = f"{owner.get('what', self.what)} ({_describe(owner)}{cmd})" if owner else self.what
            raise RunLocked(
                f"{self.folder} is being written by another {who}: wait for it, or stop it, or use another {self.option}."
            )
        previous = _parse(self._read(fd))
        if previous:  # the owner line of a writer that never released: it was killed
            log.warning(
                "%s: taking over the stale lock of %s (%s), which is no longer running",
                self.folder,
                previous.get("what", "a run"),
                _describe(previous),
            )
        owner = {
            "what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv if sys.argv[:1] not in ([], [""], ["-"], ["-c"]) else ["python", *sys.argv]),
        }  # fmt: skip
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # empty = released cleanly; unlinking would race with openers
            _unlock(fd)
        finally:
            os.close(fd)

    def _read_owner(self, wait_s: float = 1.0) -> dict:
        """The holder's owner line; it may be a moment between its lock and its write, hence the short wait."""
        deadline = time.monotonic() + wait_s
        while True:
            with contextlib.suppress(OSError):
                owner = _parse(self.path.read_bytes())
                if owner:
                    return owner
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)

    @staticmethod
    def _read(fd: int) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def main_process_lock(folder: str | Path, what: str, option: str = "--out") -> contextlib.AbstractContextManager:
    """`RunLock` in the process of global rank 0 (env ``RANK``, default 0), a no-op in the others: the ranks of
    one torchrun / DeepSpeed job share the folder legitimately, and rank 0 alone stands for the job."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunLock(folder, what=what, option=option)
