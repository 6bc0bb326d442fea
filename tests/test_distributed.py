"""Two real CPU processes (gloo): queues stay identical across ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi_hub.distributed import gather_no_grad, gather_with_grad, rank, world_size

pytestmark = pytest.mark.multiprocess
WORKERS = Path(__file__).parent / "workers"
ROOT = Path(__file__).parents[1]


def _torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` as two fresh gloo processes (no fork of this test process)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_queues_and_weights_identical_across_two_ranks(tmp_path):
    _torchrun(WORKERS / "two_rank_training.py", str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2
        assert res["queues_equal"], "queues differ between ranks"
        assert res["ptrs"] == [(4 * 8) % 24] * 2
        assert res["params_equal"], "DDP left the ranks with different weights"
        assert res["last_keys_in_queue"]
        assert res["first_rows_from_rank0"]
        assert res["grad"] == [[2.0] * 3] * 2  # all_reduce of ones from 2 ranks
        assert res["loss_finite"]
    # the ranks encoded different images
    assert results[0]["first_key"] != results[1]["first_key"]


def test_gathers_are_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_no_grad(x) is x and gather_with_grad(x) is x
    assert world_size() == 1 and rank() == 0


def _launch_two_cpu_processes(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped two-CPU-process topology, then the quickstart."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           "-m", "mochi_hub", "pretrain", "quickstart", f"train.output_dir={out}",
           *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_accelerate_launch_two_processes_runs_the_engine(tmp_path):
    out = tmp_path / "run"
    proc = _launch_two_cpu_processes(
        out,
        "train.max_steps=60", "train.log_every=20", "train.log_with=none", "eval.at_start=true",
        "eval.at_end=true", "data.batch_size=32", "data.num_workers=0", "mixing.start_epoch=0",
        "model.queue_size=128", "mixing.num_hard=16", "mixing.num_synthetic=8",
        "mixing.num_synthetic_query=4", "train.checkpoint_every_epochs=0",
        "model.backbone_kwargs={channels: [16, 32, 32, 32], stem_width: 16}",
    )  # fmt: skip
    assert "2 process(es)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [20, 40, 60]
    assert all(math.isfinite(r["train/loss"]) for r in train)
    # No check that the loss falls: over 60 steps the queue fills with ever better keys and the
    # InfoNCE value drifts either way with float rounding; the kNN gain below is the learning test.
    ckpt = out / "checkpoints" / "step_00000060"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "model.safetensors").exists()
    # each rank saved its own RNG state
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    # the kNN monitor ran sharded over both processes and gathered every held-out image once
    res = json.loads((out / "results.json").read_text())
    assert 0.0 < res["knn_final"]["top1"] <= 100.0
    # 60 steps of MoCo-v2 + MoCHi on two processes already learn digits
    assert res["knn_final"]["top1"] > res["knn_init"]["top1"] + 10
    correct = res["knn_final"]["top1"] * 360 / 100  # digits' held-out split has 360 images
    assert abs(correct - round(correct)) < 1e-6, "padding duplicates were counted"
    assert "kNN top-1 on the held-out split" in proc.stdout


def test_two_processes_stream_their_own_parts(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        folder = tmp_path / "images" / "train" / label
        folder.mkdir(parents=True)
        for i in range(20):
            pixels = torch.randint(0, 256, (36, 36, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    out = tmp_path / "run"
    proc = _launch_two_cpu_processes(
        out,
        f"data.source={tmp_path / 'images'}", "data.streaming=true", "data.streaming_size=40",
        "data.batch_size=10", "data.num_workers=0", "data.eval_split=null", "model.queue_size=40",
        "mixing.num_hard=8", "mixing.num_synthetic=4", "mixing.num_synthetic_query=2",
        "mixing.start_epoch=0", "train.max_steps=6", "train.log_every=1", "train.log_with=none",
        "model.backbone_kwargs={channels: [8, 8, 8, 8], stem_width: 8}",
    )  # fmt: skip
    assert "2 process(es)" in proc.stdout and "4 steps/epoch" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
