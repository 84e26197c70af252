"""Bytes on disk: checksums, atomic writes (temporary file beside the target, then rename), JSON and JSON Lines."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A write to a terminal that hung up (EIO), or whose device is gone (ENXIO): nothing shown there reaches anyone.
TERMINAL_GONE = frozenset({errno.EIO, errno.ENXIO})


def quiet_stdout() -> None:
    """After the reader closed our output pipe (`| head`): standard output goes to /dev/null from here on, so later
    writes and the flush at exit do not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file (a test runner's buffer)
        pass


def shell_word(value: str | Path) -> str:
    """A path as a command printed for a user to paste: quoted where a shell would split or expand it, and a
    relative one starting with `-` written `./-name`, which no command reads as an option."""
    text = str(value)
    return shlex.quote("./" + text if text.startswith("-") else text)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    The file gets the user's umask (mkstemp alone would leave it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename == tmp:  # name the path the user knows, not the hidden temporary file
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_with_umask(path: Path) -> None:
    """The safetensors files under `path` (or `path` itself) readable as the user's umask says: safetensors writes
    them 0600 whatever it is, so a merged model or adapter was unreadable to the user's group. Only weights: a
    watermark key stays 0600 on purpose."""
    files = [path] if path.is_file() else [p for p in path.rglob("*.safetensors") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, 0o666 & ~_umask())


def replace_directory(staging: Path, target: Path, aside: Path) -> None:
    """Rename a finished `staging` folder onto `target`. An earlier `target` is first renamed to `aside` and
    removed only once the new one is in place, so a kill at any point leaves a whole folder (the new one at
    `target`, or the old one at `target` or at `aside`), never a half-removed one. Its weights files get the
    user's umask first (`weights_with_umask`)."""
    weights_with_umask(staging)
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        target.rename(aside)
    staging.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def json_text(data: Any, indent: int | None = None) -> str:
    """Strict JSON, as every reader parses it: a NaN or infinite number is written null (Python's json writes a
    bare NaN, which JSON.parse refuses and jq reads as null without a word). The values are walked in Python only
    where one is not finite: a file of token ids or ranked passages is written by the C encoder as before."""
    try:
        return json.dumps(data, indent=indent, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere
        return json.dumps(_finite(data), indent=indent, ensure_ascii=False, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json_text(data, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    write_text_atomic(path, "".join(json_text(r) + "\n" for r in rows))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_json_input(path: Path) -> Any:
    """A JSON file finetune wrote and now reads back (a checkpoint's, an adapter's): one that is damaged or gone is
    a DataError naming it (exit 3), not an internal error."""
    from finetune.errors import DataError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
