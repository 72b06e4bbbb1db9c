"""One rule for every file the package loads from disk: written atomically, checked before use, a bad one named.

Why: a file on disk can be short (a full disk, a killed copy), empty, foreign (another version wrote it), random
bytes, unreadable, a directory, or a FIFO. ``dlopen`` of a short shared library kills the process with SIGBUS on
first call; ``read_text`` of a FIFO blocks forever; a half-parsed JSON file is a wrong answer. So:

* :func:`atomic_write`: a temporary file in the same folder, renamed into place (a reader sees the old file or the
  new one, never half); permissions per umask (a shared cache stays readable); the temporary file is removed when
  the write fails (``ENOSPC``, ``EFBIG``), so nothing torn is left behind.
* :func:`write_with_digest`: the same, then a small JSON file beside it (``<name>.verify.json``) with the file's
  size and sha256, written *after* the file: for files handed to ``dlopen`` that no other key file describes.
* :func:`check`: is this a regular file of the recorded size and sha256? (never opens a FIFO or a directory).
* :func:`read_text`: the text of a regular file, or :class:`BadFileError` naming the file and why (directory, FIFO,
  unreadable, not UTF-8); :func:`read_json` also parses it (a parse cannot half-succeed).
* :func:`warn_bad`: the one warning (:class:`BadFileWarning`) that names a bad file and what is done about it.

This module imports nothing else of the package (every writer and reader may use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

#: Suffix of the digest file :func:`write_with_digest` writes beside a file.
DIGEST_SUFFIX = ".verify.json"
#: How :func:`verify_with_digest` starts its answer when the digest file is absent (not corrupt: simply not there).
NO_DIGEST = "no digest file"


class BadFileError(OSError):
    """A file that cannot be used as it is (the message names it and says why)."""


class BadFileWarning(UserWarning):
    """A file on disk was bad (named in the message) and was rebuilt, rewritten or ignored."""


def warn_bad(path: str | os.PathLike, why: str, action: str, stacklevel: int = 3) -> None:
    """Warn that ``path`` is bad (``why``) and what is done instead (``action``)."""
    warnings.warn(f"WindowQuant: {path}: {why}; {action}", BadFileWarning, stacklevel=stacklevel)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``data`` (bytes, text, or a writer called with the temporary path) goes to a
    temporary file in the same folder, which is synced and renamed into place. On any failure the temporary file is
    removed and the error raised (a directory in the way raises :class:`BadFileError` naming it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise BadFileError(f"{path}: a directory is in the place of this file; remove it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
        else:
            payload = data.encode() if isinstance(data, str) else data
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: a shared cache must stay readable
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _regular(path: Path) -> str | None:
    """Why ``path`` is not a regular file one can read (None when it is); never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def check(path: str | os.PathLike, size: Any, sha256: Any) -> str | None:
    """Why ``path`` is not the recorded file (None when it is a regular file of ``size`` bytes and ``sha256``)."""
    path = Path(path)
    why = _regular(path)
    if why is not None:
        return why
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes, {size} recorded (truncated or replaced)"
    try:
        if file_sha256(path) != sha256:
            return "sha256 differs from the recorded one (corrupt or replaced)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file; :class:`BadFileError` naming it when it is missing, a directory, a FIFO or
    unreadable (``FileNotFoundError`` stays itself: absence is often normal)."""
    path = Path(path)
    why = _regular(path)
    if why == "missing":
        raise FileNotFoundError(f"{path}: missing")
    if why is not None:
        raise BadFileError(f"{path}: {why}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadFileError(f"{path}: unreadable ({exc.strerror or exc})") from exc


def read_text(path: str | os.PathLike) -> str:
    """:func:`read_bytes` decoded as UTF-8 (:class:`BadFileError` when it is not)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFileError(f"{path}: not UTF-8 text (random bytes?): {exc}") from exc


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a regular file; :class:`BadFileError` naming it for any reason it cannot be had
    (``FileNotFoundError`` when missing)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadFileError(f"{path}: not valid JSON ({exc}; empty or truncated?)") from exc


def digest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_with_digest(path: str | os.PathLike, data: bytes | str | Callable[[str], None],
                      extra: Mapping[str, Any] | None = None) -> None:
    """:func:`atomic_write`, then ``<name>.verify.json`` with its size and sha256 (and ``extra``), written after
    it: a reader that finds both in agreement has the whole file."""
    path = Path(path)
    atomic_write(path, data)
    record = {**(extra or {}), "size": path.stat().st_size, "sha256": file_sha256(path)}
    atomic_write(digest_path(path), json.dumps(record, indent=1, sort_keys=True) + "\n")


def verify_with_digest(path: str | os.PathLike) -> str | None:
    """Why ``path`` does not match the digest file beside it (None when it does; "missing" when the file is)."""
    path = Path(path)
    if not os.path.lexists(path):
        return "missing"
    try:
        record = read_json(digest_path(path))
    except FileNotFoundError:
        return f"{NO_DIGEST} {digest_path(path).name} beside it (written by an older version, or the write was cut)"
    except BadFileError as exc:
        return f"its digest file is bad ({exc})"
    if not isinstance(record, dict):
        return f"its digest file {digest_path(path).name} is not a JSON object"
    return check(path, record.get("size"), record.get("sha256"))
