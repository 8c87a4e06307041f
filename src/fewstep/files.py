"""Writing output files safely.

`atomic_write` writes a temporary file in the target's folder and renames it over the target, so a crash, a full disk
or Ctrl-C never leaves half a file (the temporary file is removed on any failure). It never replaces something that
is not a regular file (a FIFO, /dev/null, a directory, a socket: the rename would swap the special file for a plain
one, even as root) and never overwrites a read-only file. `check_output` makes the same checks without writing, so
that a command can refuse a bad output path before it starts computing. Every refusal is an `InputFileError` whose
message names the file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from fewstep.errors import InputFileError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_output(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise `InputFileError` (message starts with `what` and the path) if `atomic_write(path, ...)` would refuse or
    fail to write: the target exists and is not a regular file, or is read-only, or its folder cannot be created or
    written (probed with a nameless temporary file). Creates nothing. Returns the path with symlinks resolved (the
    file that will be written)."""
    shown = f"{what} {os.fspath(path)}"
    try:
        real = Path(os.path.realpath(path))
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        if st is None and os.path.islink(path):
            # Writing through a link to nothing would create the file, and its folders, wherever the link points.
            raise InputFileError(f"{shown} is a symbolic link to {os.readlink(path)}, which does not exist; fewstep "
                                 "writes through a link only to an existing file")
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise InputFileError(f"{shown} is {_kind(st.st_mode)}; fewstep writes regular files only and never "
                                     "replaces anything else")
            if not st.st_mode & 0o222 or not os.access(real, os.W_OK):
                raise InputFileError(f"{shown} is read-only; fewstep does not overwrite it (make it writable or "
                                     "choose another path)")
        folder = real.parent
        while not os.path.lexists(folder):
            folder = folder.parent
        if not folder.is_dir():
            raise InputFileError(f"{shown}: {folder} is not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputFileError(f"{shown}: cannot create files in {folder} (permission denied or read-only)")
        with tempfile.TemporaryFile(dir=folder):  # try it: root passes os.access everywhere, /proc does not
            pass
    except (OSError, ValueError) as err:  # ENAMETOOLONG, ELOOP, EACCES on stat; ValueError: a NUL in the path
        if isinstance(err, InputFileError):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise InputFileError(f"{shown}: cannot write there ({reason})") from None
    return real


def atomic_write(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    """Write `data` to `path` all at once: temporary file in the same folder, flushed to disk, then renamed over the
    target (a symlink's target is written, the link is kept). Refuses what `check_output` refuses; any failure
    (Ctrl-C included) removes the temporary file and leaves the target as it was. Missing folders are created."""
    path = Path(path)
    real = check_output(path, what)
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        mode = 0o644
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    except OSError as err:
        raise InputFileError(f"{what} {path}: cannot write ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, InputFileError):
            raise InputFileError(f"{what} {path}: cannot write ({err.strerror or err})") from None
        raise
    return path
