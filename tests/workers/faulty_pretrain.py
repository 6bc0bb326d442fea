"""``mochi-hub pretrain`` with a failpoint: SIGKILL at one named point of the engine's work.

Started once per rank by ``accelerate launch`` (tests/test_kill_resume.py). The failpoint comes
from ``MOCHI_TEST_FAILPOINT=<point>:<rank>:<n>``: on process ``<rank>``, the ``<n>``-th time
the run reaches ``<point>``, the process kills itself with SIGKILL (no clean-up, no atexit, no
flushing), exactly as the kernel's OOM killer or a lost node would. The launcher then tears
down the other rank. Without the variable this is plain ``python -m mochi_hub``.

Points (each wraps the real function; nothing else is changed):

- ``mid_step``: inside a training step, after the optimiser step, before the momentum update
  and the enqueue (weights updated, key encoder and queue not yet).
- ``model_file``: while ``save_state`` writes the model: half the file is on disk.
- ``rng_file``: after this rank wrote its generator state, before the others finished.
- ``marker``: the checkpoint is complete and marked, not yet renamed into place.
- ``renamed``: the new checkpoint is in place, older ones not yet pruned.
- ``prune``: while the oldest checkpoint is being deleted.
"""

import os
import sys
from pathlib import Path

from _kill import die as _die
from _kill import shutil_with_rmtree


def install(point: str, rank: int, nth: int) -> None:
    """Wrap the function behind ``point`` so that its ``nth`` hit on ``rank`` kills."""
    import accelerate.utils.other as acc_other
    import torch.distributed as dist

    from mochi_hub import engine
    from mochi_hub.moco import MoCoV2

    hits = {"n": 0}

    def mine() -> bool:
        me = dist.get_rank() if dist.is_initialized() else 0
        return me == rank

    def hit() -> bool:
        if not mine():
            return False
        hits["n"] += 1
        return hits["n"] == nth

    if point == "mid_step":
        real_update = MoCoV2.momentum_update

        def momentum_update(self, m):
            if hit():
                _die()
            return real_update(self, m)

        MoCoV2.momentum_update = momentum_update
    elif point == "model_file":
        real_save = acc_other.safe_save_file

        def safe_save_file(tensors, filename, *args, **kwargs):
            if Path(filename).name == "model.safetensors" and hit():
                real_save(tensors, filename, *args, **kwargs)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                _die()
            return real_save(tensors, filename, *args, **kwargs)

        acc_other.safe_save_file = safe_save_file
    elif point == "rng_file":
        real_save = engine.save_file

        def save_file(tensors, filename, *args, **kwargs):
            out = real_save(tensors, filename, *args, **kwargs)
            if hit():
                _die()
            return out

        engine.save_file = save_file
    elif point == "marker":
        real_fsync = engine._fsync_tree

        def fsync_tree(path, recursive=True):
            out = real_fsync(path, recursive)
            if Path(path).name == engine.COMPLETE_MARKER and hit():
                _die()
            return out

        engine._fsync_tree = fsync_tree
    elif point == "renamed":
        real_replace = engine.replace_dir

        def replace_dir(new, final):
            real_replace(new, final)
            if hit():
                _die()

        engine.replace_dir = replace_dir
    elif point == "prune":
        real_rmtree = engine.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith("step_") and hit():
                # delete part of the checkpoint, as an interrupted rmtree would
                for f in sorted(Path(path).iterdir())[:2]:
                    f.unlink()
                _die()
            return real_rmtree(path, *args, **kwargs)

        engine.shutil = shutil_with_rmtree(rmtree)
    else:
        raise SystemExit(f"unknown failpoint {point!r}")


if __name__ == "__main__":
    spec = os.environ.get("MOCHI_TEST_FAILPOINT")
    if spec:
        point, rank, nth = spec.split(":")
        install(point, int(rank), int(nth))
    from mochi_hub.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
