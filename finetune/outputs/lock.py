"""One writer per run directory: `RUN/.finetune-lock`, held with `flock` for the life of a run, resume or evaluation.

The kernel drops an flock when its holder exits, however it exits (kill -9 included), so a lock file left
behind by a dead process is stale by definition: the next writer takes it over with no clean-up. The file
also names its holder (pid, host, start time, command) so that a refused writer can say who holds it.

Limits, kept simple on purpose:
- Local filesystems and NFS (Linux emulates flock with NFS byte-range locks) exclude across processes and
  hosts. Where the filesystem has no locking at all (some FUSE or Lustre mounts: ENOLCK, EOPNOTSUPP) or on a
  platform without `fcntl`, the run goes on unlocked with a warning: one writer at a time is then the user's
  to ensure.
- A child forked without exec inherits the open file and with it the lock, which lasts until the last of
  them exits (exec'd children do not: the descriptor is close-on-exec).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from finetune.errors import RecipeError
from finetune.secrets import redact

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("finetune")

# Starts with `.finetune-` like the run marker: bookkeeping, never user content.
LOCK_NAME = ".finetune-lock"
# Errors that mean "this filesystem cannot lock", as opposed to "someone holds it".
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_BUSY_TRIES, _BUSY_WAIT = 4, 0.05


class RunLock:
    """Exclusive, non-blocking hold on a run directory; a second holder gets a RecipeError naming the first.

    `with RunLock(path):` or `lock = RunLock(path).acquire()` ... `lock.release()`. The directory is created
    when missing (`created_directory` says so). Release removes only the lock file; a lock never released
    holds until its process exits.
    """

    def __init__(self, directory: str | Path, *, label: str = "output.dir", command: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.label = label
        self.command = redact(command if command is not None else command_line())
        self.created_directory = False
        self._fd: int | None = None
        self._unlocked = False  # held without a real lock (the filesystem cannot lock)

    @property
    def held(self) -> bool:
        return self._fd is not None or self._unlocked

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self._make_directory()
        if fcntl is None:
            log.warning("%s: no file locking on this platform; make sure no other process writes here", self.directory)
            self._unlocked = True
            return self
        busy = 0
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in _BUSY:
                    busy += 1
                    if busy >= _BUSY_TRIES:
                        raise self._refusal() from None
                    time.sleep(_BUSY_WAIT)  # a `refuse_if_held` look holds it for an instant: try again
                    continue
                if exc.errno in _NO_LOCKING:
                    log.warning(
                        "%s: the filesystem does not support locks (%s); make sure no other process writes here",
                        self.directory,
                        exc.strerror,
                    )
                    self._unlocked = True
                    return self
                raise RecipeError(f"{self.label}: {self.directory}: cannot lock {self.path.name}: {exc}") from exc
            # The holder before us may have removed the file between our open and our flock: then we hold a
            # lock on a file nobody else can see, so start again on the one at the path now.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        self._write_holder()
        return self

    def refuse_if_held(self) -> None:
        """Raise the refusal now if another process holds the directory; takes nothing and creates nothing.

        For a clear message before other checks look at the directory (a running run otherwise reads as "an
        unfinished run"); `acquire` is still what excludes."""
        if fcntl is None or self.held:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return  # no lock file (or not one we can read): nobody to name
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                raise self._refusal() from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the directory back; a no-op when not held. Removes the lock file (unlinked while still locked,
        so a process that opened it meanwhile sees it is gone and starts again)."""
        fd, self._fd, self._unlocked = self._fd, None, False
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock file that stays behind is stale, not harmful
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def holder(self) -> dict:
        """What the lock file says about its holder ({} when it says nothing readable yet)."""
        return read_holder(self.path)

    # ----------------------------------------------------------------------- internals

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True)
            self.created_directory = True
        except FileExistsError:
            if not self.directory.is_dir():
                raise RecipeError(f"{self.label}: {self.directory} is a file, not a directory") from None
        except OSError as exc:
            raise RecipeError(f"{self.label}: {self.directory} is not writable: {exc.strerror or exc}") from exc

    def _open(self) -> int:
        # os.open descriptors are close-on-exec; a symlink in place of the lock file is never followed (the
        # holder's note would truncate whatever it points to).
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise RecipeError(f"{self.label}: {self.path} is a symbolic link; remove it") from exc
            raise RecipeError(f"{self.label}: {self.directory} is not writable: {exc.strerror or exc}") from exc

    def _write_holder(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command,
        }
        data = (json.dumps(info) + "\n").encode()
        assert self._fd is not None, "written only while held"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as exc:  # the lock holds without its note; a refusal then names no holder
            log.warning("%s: could not record the lock holder: %s", self.path, exc)

    def _refusal(self) -> RecipeError:
        info = {}
        # The holder writes its details right after taking the lock: give it a moment.
        for _ in range(20):
            info = read_holder(self.path)
            if info:
                break
            time.sleep(0.05)
        return RecipeError(
            f"{self.label}: {self.directory} is in use by another finetune process ({describe_holder(info)}); "
            "wait for it to finish or stop it"
        )


def read_holder(path: Path) -> dict:
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """ "pid 1234 on host h, since 2026-12-05T22:01:00Z, running `finetune run r.yaml`" (what is known of it)."""
    if not info.get("pid"):
        return "its details are not recorded"
    text = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("since"):
        text += f", since {info['since']}"
    if info.get("command"):
        text += f", running `{info['command']}`"
    return text


# The command line as the user typed it: a launcher of several processes puts its own here for them (each runs
# `python -m finetune run ...`, without the --num-processes that started them).
COMMAND_ENV = "FINETUNE_COMMAND"


def command_line() -> str:
    """What was run, for the lock's holder and manifest.json: the launcher's command in a launched process."""
    given = os.environ.get(COMMAND_ENV)
    if given:
        return given
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "-c", "-m"):
        argv[0] = "finetune" if argv[0].endswith("__main__.py") else "python"
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
