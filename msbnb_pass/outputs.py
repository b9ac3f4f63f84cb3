"""Writing output files safely: the one place msbnb_pass writes files a user names.

* ``check_output_file`` / ``check_output_dir`` run *before* any work: the target must be a regular file
  (or a directory) or absent, and its directory must exist and be writable. A device node, FIFO, socket or
  symbolic link is refused, so ``-o /dev/null`` can never replace ``/dev/null``.
* ``write_atomic`` writes to a temporary file beside the target and moves it into place, checking the
  target again just before; a failed write leaves an existing file intact.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MsbnbError

__all__ = ["OutputError", "check_output_dir", "check_output_file", "write_atomic", "write_text_atomic"]


class OutputError(MsbnbError):
    """An output path cannot be written safely."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def _check_parent(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{what} {str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(path)!r}: the directory {str(parent)!r} is not writable")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse a target that is not a regular file (device, FIFO, socket, directory, symlink) or whose
    directory is missing or not writable. Returns the path."""
    p = Path(path)
    if not str(path):
        raise OutputError(f"{what}: the path is empty")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{what} {str(path)!r}: cannot inspect it ({exc.strerror or exc})") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(
                f"{what} {str(path)!r} is a {_kind(st.st_mode)}, not a regular file; refusing to replace it "
                "(give a regular file path, or one that does not exist yet)"
            )
        if not os.access(p, os.W_OK):
            raise OutputError(f"{what} {str(path)!r}: the file exists and is not writable")
    _check_parent(p, what)
    return p


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Refuse a target that exists and is not a directory, or a missing one whose parent is not writable."""
    p = Path(path)
    if not str(path):
        raise OutputError(f"{what}: the path is empty")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {str(path)!r} is a {_kind(st.st_mode)}, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {str(path)!r} is not writable")
        return p
    _check_parent(p, what)
    return p


def _new_file_mode(target: Path) -> int:
    """The mode a plain ``open()`` would give: the existing file's, else 0666 less the umask."""
    if target.is_file():
        return target.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], what: str = "output") -> Path:
    """``write(tmp_path)`` into a temporary file beside ``path``, fsync it, then move it into place: a crash
    never leaves a truncated file where a good one was. The target is checked (regular file or absent)
    before and again right before the move; on any error the temporary file is removed and the target is
    untouched."""
    target = check_output_file(path, what)
    mode = _new_file_mode(target)
    # keep the target's suffix: writers such as mindspore.save_checkpoint append ".ckpt" to a path without it
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=str(target.parent))
    os.close(fd)
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 == 0o600:  # still mkstemp's private mode: give it the usual one
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        check_output_file(target, what)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "output") -> Path:
    """``write_atomic`` for UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write_atomic(path, write, what)
