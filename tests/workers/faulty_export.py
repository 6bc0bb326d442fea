"""``mochi-hub export`` with a failpoint: SIGKILL at one named point of writing the folder.

Used by tests/test_kill_resume.py. ``MOCHI_TEST_FAILPOINT=<point>`` (no variable: plain
``mochi-hub export``). Points (each wraps the real function):

- ``weights``: half of ``model.safetensors`` is written in the temporary folder.
- ``card``: every file is written and fsynced, the folder is not yet in place.
- ``swapped``: the new folder is in place, the old one (now under the temporary name) is not
  yet deleted.
- ``cleanup``: while the old folder is being deleted.
"""

import os
import sys
from pathlib import Path

from _kill import die as _die
from _kill import shutil_with_rmtree


def install(point: str) -> None:
    """Wrap the function behind ``point`` so that reaching it kills this process."""
    from mochi_hub import export, fsutil

    if point == "weights":
        real_save = export.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            _die()

        export.save_file = save_file
    elif point == "card":
        real_replace = export.replace_dir

        def replace_dir(new, final):
            _die()
            real_replace(new, final)

        export.replace_dir = replace_dir
    elif point == "swapped":
        real_exchange = fsutil.exchange_dirs

        def exchange_dirs(a, b):
            if not real_exchange(a, b):
                raise SystemExit("no atomic exchange on this file system")
            _die()

        fsutil.exchange_dirs = exchange_dirs
    elif point == "cleanup":
        real_rmtree = fsutil.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            (Path(path) / "model.safetensors").unlink()  # part of the old folder is gone
            _die()
            real_rmtree(path, *args, **kwargs)

        fsutil.shutil = shutil_with_rmtree(rmtree)
    else:
        raise SystemExit(f"unknown failpoint {point!r}")


if __name__ == "__main__":
    if os.environ.get("MOCHI_TEST_FAILPOINT"):
        install(os.environ["MOCHI_TEST_FAILPOINT"])
    from mochi_hub.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
