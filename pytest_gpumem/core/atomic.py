"""Files written whole: every file the plugin and its command line write goes through here.

:func:`write_atomic` writes a temp file beside the target, flushes it to disk
and renames it over the target, so a reader (or a run interrupted at any
moment) sees the old file or the complete new one, never a part, and no temp
file is left behind. The new file gets the permissions ``open(path, "w")``
would give it (``0666`` less the umask), or the replaced file's own, so a
baseline committed from one checkout reaches the others readable.
:func:`locked` serializes the read-modify-write of files that several runs
share (baselines, a history table).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a file was written; says whether the file is still the old one or already the new one."""

    def __init__(self, path: Path, replaced: bool) -> None:
        self.path = path
        self.replaced = replaced
        state = "the new file was already complete" if replaced else "it was left as it was"
        super().__init__(f"interrupted while writing {path}: {state}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) as the whole of ``path``: readers see the old file or the new one.

    Whatever is raised (KeyboardInterrupt included: as :class:`Interrupted`), ``path``
    is the old file or the complete new one, and the temp file is gone.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp: str | None = None
    renaming = False
    try:
        try:
            keep: int | None = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its permissions
        except FileNotFoundError:
            keep = None
        while True:
            # Named before it is made, so that an interrupt right after os.open still finds it to remove.
            tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
            try:
                # Created as open(path, "w") creates a file: 0666 less the umask (mkstemp would make it 0600).
                fd = os.open(tmp, _CREATE, 0o666)
                break
            except FileExistsError:
                tmp = None  # another's: not ours to remove
        try:
            if keep is not None:
                _chmod(fd, tmp, keep)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        renaming = True
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except BaseException as error:
        # Once renaming, the temp file is gone only because it became the file.
        replaced = renaming and tmp is not None and not os.path.lexists(tmp)
        if tmp is not None and not replaced:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise Interrupted(path, replaced) from None
        raise


def _chmod(fd: int, tmp: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows before Python 3.13
        os.chmod(tmp, mode)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable; where a directory cannot be opened or synced (Windows), skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive POSIX advisory lock on ``directory`` itself (no lock file to commit)."""
    try:
        import fcntl
    except ImportError:  # Windows: runs there are not expected to share a checkout
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
