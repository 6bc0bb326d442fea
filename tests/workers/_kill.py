"""What the failpoint workers share: dying like a killed process, and an rmtree to wrap."""

import os
import shutil
import signal
import sys
import types
from collections.abc import Callable


def die() -> None:
    """SIGKILL this process: no clean-up, no atexit, no flushing but stdout's."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def shutil_with_rmtree(rmtree: Callable) -> types.SimpleNamespace:
    """A stand-in for a module's ``shutil``: ``rmtree`` replaced, the rest the real one."""
    names = {n: getattr(shutil, n) for n in dir(shutil) if not n.startswith("__")}
    return types.SimpleNamespace(**{**names, "rmtree": rmtree})
