"""Atomic replacement of a directory (checkpoints, exports)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory ``new`` to ``final``, replacing what is there only at the end.

    An existing ``final`` is first renamed aside, then ``new`` is moved in, and only then is the
    old one deleted. If moving ``new`` in fails, the old directory is put back, so at every
    moment either the old or the new directory is complete under ``final`` (or, between two
    renames, under a hidden ``.<name>.old-*`` name next to it).

    Args:
        new: A fully written directory on the same file system as ``final``.
        final: The destination.
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
