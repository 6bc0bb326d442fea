"""Atomic replacement of a directory (checkpoints, exports)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

__all__ = ["exchange_dirs", "replace_dir"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_dirs(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Args:
        a: An existing path.
        b: An existing path on the same file system.

    Returns:
        True if the two were swapped; False if this platform or file system cannot swap
        atomically (nothing was changed then).

    Raises:
        OSError: Any other failure of the system call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory ``new`` to ``final``, replacing what is there in one step.

    Where the kernel can swap two directories atomically (Linux ``renameat2``), ``new`` and an
    existing ``final`` are exchanged and the old one, now under ``new``'s name, is deleted: a
    process killed at any moment leaves either the old or the new directory complete under
    ``final``. Elsewhere the old ``final`` is renamed aside to a hidden ``.<name>.old-*`` name,
    ``new`` is moved in, and only then is the old one deleted; if moving ``new`` in fails, the
    old directory is put back.

    Args:
        new: A fully written directory on the same file system as ``final``.
        final: The destination.
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    if exchange_dirs(new, final):
        shutil.rmtree(new, ignore_errors=True)  # the old directory, now under the temporary name
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
