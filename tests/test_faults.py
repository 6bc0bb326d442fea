"""Fault injection: a full disk or a denied write while saving, and a rank dying mid-run.

Tests run as root, so read-only permissions stop nothing: the faults are injected at the
boundary that writes (safetensors, ``Path.write_text``, ``os.replace``) instead.
"""

import errno
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import accelerate.utils.other as accelerate_other
import pytest

from mochi_hub import export as export_mod
from mochi_hub import fsutil
from mochi_hub.config import load_config
from mochi_hub.engine import COMPLETE_MARKER, find_checkpoint, pretrain
from mochi_hub.export import export_backbone

ROOT = Path(__file__).parents[1]
TINY = [
    "train.log_with=none",
    "train.log_every=1",
    "eval.at_start=false",
    "eval.at_end=false",
    "data.num_workers=0",
    "data.batch_size=32",
    "mixing.start_epoch=1",
    "model.queue_size=64",
    "mixing.num_hard=16",
    "mixing.num_synthetic=8",
    "mixing.num_synthetic_query=4",
    "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name) with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _eacces(path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


# ------------------------------------------------------------------ checkpoint saves


def _half_written_model(monkeypatch, make_error, seen: dict):
    """safetensors writes half of step 2's model file, then fails with ``make_error``."""
    real = accelerate_other.safe_save_file

    def failing(tensors, filename, *args, **kwargs):
        if ".tmp_step_00000002" in str(filename):
            seen["before"] = _snapshot(seen["run"] / "checkpoints" / "step_00000001")
            Path(filename).write_bytes(b"\x00" * 17)  # a truncated file is left behind
            raise make_error(filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(accelerate_other, "safe_save_file", failing)


def _denied_rename(monkeypatch, make_error, seen: dict):
    """The fully written, marked step-2 directory cannot be renamed into place."""
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(src).name == ".tmp_step_00000002":
            seen["before"] = _snapshot(seen["run"] / "checkpoints" / "step_00000001")
            raise make_error(dst)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize(
    "inject, make_error, message",
    [
        (_half_written_model, _enospc, "No space left on device"),
        (_half_written_model, _eacces, "Permission denied"),
        (_denied_rename, _enospc, "No space left on device"),
        (_denied_rename, _eacces, "Permission denied"),
    ],
    ids=["enospc-model-file", "eacces-model-file", "enospc-rename", "eacces-rename"],
)
def test_failed_checkpoint_save_keeps_the_previous_checkpoint(
    inject, make_error, message, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    cfg = load_config(
        "quickstart",
        [*TINY, f"train.output_dir={run}", "train.max_steps=3", "train.checkpoint_every_steps=1"],
    )
    seen = {"run": run}
    with monkeypatch.context() as m:
        inject(m, make_error, seen)
        with pytest.raises(OSError, match=message) as info:
            pretrain(cfg)
    # the error is the OS's own, naming the path that could not be written
    assert info.value.errno == make_error("x").errno
    assert ".tmp_step_00000002" in str(info.value) or "step_00000002" in str(info.value)
    if make_error is _eacces:
        assert isinstance(info.value, PermissionError)

    ckpts = run / "checkpoints"
    previous = ckpts / "step_00000001"
    assert find_checkpoint(run) == previous  # still the newest complete checkpoint
    assert _snapshot(previous) == seen["before"]  # same files, same bytes
    assert not (ckpts / "step_00000002").exists()
    # the failed save removed its temporary directory (half a file, no marker)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]

    # The next run resumes from step 1, replaces the leftover and finishes.
    result = pretrain(cfg)
    assert result.resumed_from == previous and result.steps == 3
    assert not list(ckpts.glob(".tmp*"))
    assert find_checkpoint(run).name == "step_00000003"
    assert (find_checkpoint(run) / COMPLETE_MARKER).is_file()


# ------------------------------------------------------------------ exports


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_export")
    pretrain(load_config("quickstart", [*TINY, f"train.output_dir={root / 'run'}",
                                        "train.max_steps=1"]))  # fmt: skip
    return root / "run"


@pytest.mark.parametrize("make_error, message", [(_enospc, "No space"), (_eacces, "Permission")])
def test_export_weights_write_fails_leaves_no_destination(
    trained_run, make_error, message, tmp_path, monkeypatch
):
    def failing(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 17)
        raise make_error(filename)

    monkeypatch.setattr(export_mod, "save_file", failing)
    out = tmp_path / "resnet18_mochi.digits"
    with pytest.raises(OSError, match=message) as info:
        export_backbone(trained_run, out)
    assert info.value.errno == make_error("x").errno and "model.safetensors" in str(info.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


@pytest.mark.parametrize("make_error, message", [(_enospc, "No space"), (_eacces, "Permission")])
@pytest.mark.parametrize("fault", ["weights", "card"])
def test_failed_overwrite_keeps_the_old_export_byte_for_byte(
    trained_run, fault, make_error, message, tmp_path, monkeypatch
):
    out = export_backbone(trained_run, tmp_path / "resnet18_mochi.digits")
    before = _snapshot(out)
    if fault == "weights":

        def failing_save(tensors, filename, *args, **kwargs):
            raise make_error(filename)

        monkeypatch.setattr(export_mod, "save_file", failing_save)
    else:
        real_write = Path.write_text

        def failing_write(self, *args, **kwargs):
            if self.name == "README.md":
                real_write(self, "half a ca")  # partially written, then the disk fills
                raise make_error(self)
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match=message):
        export_backbone(trained_run, out, overwrite=True)
    assert _snapshot(out) == before  # the old export is untouched
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary folder


@pytest.mark.parametrize("swap", ["exchange", "rename-aside"])
def test_failed_rename_during_overwrite_keeps_the_old_export(
    swap, trained_run, tmp_path, monkeypatch
):
    out = export_backbone(trained_run, tmp_path / "resnet18_mochi.digits")
    before = _snapshot(out)
    if swap == "exchange":  # Linux: renameat2(RENAME_EXCHANGE) itself is refused

        def failing_exchange(a, b):
            raise _eacces(b)

        monkeypatch.setattr(fsutil, "exchange_dirs", failing_exchange)
    else:  # no atomic exchange: the old folder is renamed aside, the new one cannot move in
        monkeypatch.setattr(fsutil, "exchange_dirs", lambda a, b: False)
        real = os.replace

        def failing(src, dst, *args, **kwargs):
            if Path(dst) == out:
                raise _eacces(dst)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError):
        export_backbone(trained_run, out, overwrite=True)
    assert out.is_dir() and _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # nothing renamed aside is left


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("new")
    (b / "old").write_text("old")
    swapped = fsutil.exchange_dirs(a, b)
    if sys.platform.startswith("linux"):
        assert swapped  # the file systems CI runs on (ext4, tmpfs, overlayfs) support it
    if swapped:
        assert [p.name for p in b.iterdir()] == ["new"] and [p.name for p in a.iterdir()] == ["old"]
    fsutil.replace_dir(a, b)  # a (now "old") replaces b (now "new")
    assert not a.exists() and [p.name for p in b.iterdir()] == ["old"]
    with pytest.raises(FileNotFoundError):
        fsutil.exchange_dirs(tmp_path / "missing", b)


# ------------------------------------------------------------------ a rank dies

WORKER = """
import os, sys, time
from mochi_hub import engine
from mochi_hub.config import load_config

assert engine.COLLECTIVE_TIMEOUT_S == 10, engine.COLLECTIVE_TIMEOUT_S
rank = int(os.environ["RANK"])
real_loss = engine.moco_v2_loss
calls = {"n": 0}

def loss(*args, **kwargs):
    calls["n"] += 1
    if rank == 1 and calls["n"] == 3:  # after two full steps
        print("rank 1 fails now", flush=True)
        if sys.argv[2] == "die":
            os._exit(1)
        time.sleep(300)  # hangs: rank 0 waits in the gradient all-reduce
    return real_loss(*args, **kwargs)

engine.moco_v2_loss = loss
cfg = load_config("quickstart", [*sys.argv[3:], f"train.output_dir={sys.argv[1]}",
                                 "train.max_steps=50", "train.checkpoint_every_steps=0"])
engine.pretrain(cfg)
print("rank", rank, "finished", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_failing_rank_ends_the_whole_launch(mode, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "MOCHI_HUB_COLLECTIVE_TIMEOUT": "10", "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "run"), mode, *TINY]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "rank 1 fails now" in log, log[-3000:]
    assert "finished" not in proc.stdout
    assert wall < 60, f"the launch took {wall:.0f} s to fail"
    if mode == "hang":
        # rank 1 is alive but silent: only the 10 s collective timeout can end rank 0's wait
        assert wall > 10
        assert re.search(r"Timed out waiting 10000 ?ms", log), log[-3000:]
