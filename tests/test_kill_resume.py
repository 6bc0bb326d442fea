"""SIGKILL a two-process training run again and again; it still ends with the same weights.

One uninterrupted two-process run (``accelerate launch``, gloo on the CPU) is the reference.
A second run of the same recipe is killed over and over: at six named points inside the
engine's work (tests/workers/faulty_pretrain.py: in a step, half-way through the model file,
between ranks' writes, after the completeness marker, after the rename, during the pruning),
and twice at a random moment from outside (the whole process group, like a lost node). After
every kill the run directory must hold a complete, loadable checkpoint that the next launch
resumes from, and no directory that is taken as a checkpoint may be incomplete. The last
launch finishes; its final checkpoint must equal the reference bit for bit: weights, momentum
encoder, queue, optimiser state, every rank's generators and the trainer state.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mochi_hub.engine import COMPLETE_MARKER, find_checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "workers" / "faulty_pretrain.py"
# 1437 digits / global batch 128 = 11 steps per epoch: the run crosses an epoch boundary, and
# MoCHi's mixing is on from the first step, so its per-rank generators matter.
RECIPE = [
    "quickstart",
    "train.log_with=none",
    "train.log_every=1",
    "eval.at_start=false",
    "eval.at_end=false",
    "data.num_workers=0",
    "data.batch_size=128",
    "mixing.start_epoch=0",
    "model.queue_size=256",
    "mixing.num_hard=32",
    "mixing.num_synthetic=16",
    "mixing.num_synthetic_query=8",
    "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
    "train.max_steps=40",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=2",
]
FAILPOINTS = [  # (point, rank, n-th hit in that launch)
    ("mid_step", 1, 3),
    ("model_file", 0, 2),
    ("rng_file", 1, 2),
    ("marker", 0, 2),
    ("renamed", 0, 1),
    ("prune", 0, 2),
]
CHECKPOINT_FILES = {
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "random_states_1.pkl",
    "rng_state_0.safetensors",
    "rng_state_1.safetensors",
    "trainer_state.json",
    COMPLETE_MARKER,
}


def _launch(out: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("MOCHI_TEST_FAILPOINT", None)
    if failpoint:
        env["MOCHI_TEST_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           str(WORKER), *RECIPE, f"train.output_dir={out}"]  # fmt: skip
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once, like a lost node.

    torchrun starts its workers in sessions of their own, so killing the launcher's process
    group would leave them running: the tree is read from /proc instead.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"launch hung for {timeout} s after a kill:\n{err[-3000:]}")
    return proc.returncode, out, err


def _check_checkpoints(run: Path) -> int:
    """Every directory taken as a checkpoint is complete and loads; returns the newest step."""
    root = run / "checkpoints"
    for ckpt in root.glob("step_*"):
        if not (ckpt / COMPLETE_MARKER).is_file():
            continue  # never taken as valid (find_checkpoint ignores it)
        assert {p.name for p in ckpt.iterdir()} >= CHECKPOINT_FILES, ckpt
        load_file(str(ckpt / "model.safetensors"))  # raises on a truncated file
        load_file(str(ckpt / "rng_state_0.safetensors"))
        load_file(str(ckpt / "rng_state_1.safetensors"))
        torch.load(ckpt / "optimizer.bin", weights_only=True)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert ckpt.name == f"step_{state['step']:08d}"
    newest = find_checkpoint(run)
    assert newest is not None, "a kill left no complete checkpoint"
    return json.loads((newest / "trainer_state.json").read_text())["step"]


def _final(run: Path) -> dict[str, dict]:
    ckpt = find_checkpoint(run)
    return {
        "model": load_file(str(ckpt / "model.safetensors")),
        "optim": torch.load(ckpt / "optimizer.bin", weights_only=True),
        "rng0": load_file(str(ckpt / "rng_state_0.safetensors")),
        "rng1": load_file(str(ckpt / "rng_state_1.safetensors")),
        "state": json.loads((ckpt / "trainer_state.json").read_text()),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"] == b["state"]
    for part in ("model", "rng0", "rng1"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:  # weights, momentum encoder, BN statistics, queue, pointer, RNG
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    for pid, st in a["optim"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b["optim"]["state"][pid][key]), (pid, key)


def test_killed_again_and_again_two_process_run_ends_with_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, _, err = _finish(_launch(straight))
    assert rc == 0, err[-3000:]
    reference = _final(straight)
    assert reference["state"]["step"] == 40 and reference["state"]["epoch"] == 3
    # the two ranks really draw different mixing coefficients
    assert not torch.equal(reference["rng0"]["mixing"], reference["rng1"]["mixing"])

    steps = [0]
    for point, rank, nth in FAILPOINTS:
        rc, out, err = _finish(_launch(killed, f"{point}:{rank}:{nth}"))
        assert rc != 0, f"{point}: the launch was not killed"
        steps.append(_check_checkpoints(killed))
        assert steps[-1] >= steps[-2], f"{point}: the run lost checkpoints it had"
        assert steps[-1] < 40, f"{point}: the failpoint was never reached"
        if len(steps) > 2:
            assert "resumed from" in out, f"{point}: the launch did not resume"

    print("checkpoint steps after the failpoints:", steps)
    rng = random.Random(20201124)
    for _ in range(2):  # kill the whole launch from outside at a random moment of its work
        start = steps[-1]
        proc = _launch(killed)
        target = start + rng.randint(1, 3)
        deadline = time.time() + 300
        while _newest_step(killed) < target:  # it is training; then somewhere in a step or save
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        assert proc.poll() is None, "the run ended before the kill"
        _kill_tree(proc.pid)
        proc.communicate()
        steps.append(_check_checkpoints(killed))
        assert steps[-1] >= target

    rc, out, err = _finish(_launch(killed))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out
    print("checkpoint steps after each kill:", steps)
    _assert_same(reference, _final(killed))
    # nothing that earlier kills left half-done remains
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step_00000039",
        "step_00000040",
    ]
    print("checkpoint steps after each kill:", steps)


def _newest_step(run: Path) -> int:
    ckpt = find_checkpoint(run)
    return json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else 0


# ------------------------------------------------------------------ exports

EXPORT_WORKER = Path(__file__).parent / "workers" / "faulty_export.py"
# where the kill lands, and which folder must then be under --out, whole
EXPORT_FAILPOINTS = {"weights": "old", "card": "old", "swapped": "new", "cleanup": "new"}


def _snapshot(folder: Path) -> dict:
    """Every file's bytes; for the weights, their tensors' bytes and the metadata.

    (safetensors writes its metadata map in a per-process hash order, so the same export made
    by two processes differs in the header's byte order only.)
    """
    from safetensors import safe_open

    snap = {}
    for p in sorted(folder.rglob("*")):
        if p.name == "model.safetensors":
            with safe_open(str(p), "pt") as f:
                snap[p.name] = (
                    f.metadata(),
                    {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()},
                )
        elif p.is_file():
            snap[str(p.relative_to(folder))] = p.read_bytes()
    return snap


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    from mochi_hub.config import load_config
    from mochi_hub.engine import pretrain

    run = tmp_path_factory.mktemp("export_kill") / "run"
    overrides = [o for o in RECIPE[1:] if not o.startswith(("train.max_steps", "data.batch"))]
    pretrain(load_config("quickstart", [*overrides, "data.batch_size=32", "train.max_steps=2",
                                        f"train.output_dir={run}"]))  # fmt: skip
    return run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"


@pytest.mark.parametrize("point", EXPORT_FAILPOINTS)
def test_killed_export_leaves_the_old_or_the_new_folder_whole(point, two_checkpoints, tmp_path):
    from mochi_hub.export import export_backbone

    step1, step2 = two_checkpoints
    name = "resnet18_mochi.digits"
    old = _snapshot(export_backbone(step1, tmp_path / "ref_old" / name))
    new = _snapshot(export_backbone(step2, tmp_path / "ref_new" / name))
    assert old["model.safetensors"] != new["model.safetensors"]
    out = export_backbone(step1, tmp_path / "out" / name)  # the export being replaced
    env = {**os.environ, "MOCHI_TEST_FAILPOINT": point, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXPORT_WORKER), str(step2), "--out", str(out), "--overwrite"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # at the moment of the kill: the old export or the new one, each complete, byte for byte
    assert _snapshot(out) == (old if EXPORT_FAILPOINTS[point] == "old" else new)
    # the next export replaces it and leaves nothing of the killed one behind
    export_backbone(step2, out, overwrite=True)
    assert _snapshot(out) == new
    assert [p.name for p in out.parent.iterdir()] == [name]
