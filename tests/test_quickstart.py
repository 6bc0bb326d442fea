"""The quickstart pipeline (CLI, config, Accelerate engine, checkpoint, kNN) in a few steps."""

import json
import subprocess
import sys

import pytest
import yaml
from safetensors import safe_open

from mochi_hub.cli import main

FAST = [
    "train.max_steps=4",
    "train.log_every=2",
    "train.log_with=none",
    "mixing.start_epoch=0",
    "data.batch_size=32",
    "data.num_workers=0",
    "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
    "model.queue_size=64",
    "mixing.num_hard=16",
    "mixing.num_synthetic=8",
    "mixing.num_synthetic_query=4",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    assert main(["pretrain", "recipes/quickstart.yaml", f"train.output_dir={out}", *FAST]) == 0
    return out


def test_writes_resolved_config(run_dir):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["name"] == "quickstart"
    assert cfg["mixing"]["num_hard"] == 16 and cfg["model"]["arch"] == "resnet18"


def test_logs_mochi_diagnostics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for key in (
        "train/proxy_acc",
        "train/proxy_acc_real",
        "train/hardest_neg_sim",
        "train/syn_share_topn",
        "train/max_syn_minus_max_real",
        "train/images_per_s",
        "train/lr",
    ):
        assert key in train[-1], key
    assert all(r["train/mixing_active"] == 1.0 for r in train)
    # with synthetic negatives the proxy task can only get harder
    assert all(r["train/proxy_acc"] <= r["train/proxy_acc_real"] for r in train)
    assert any("knn/top1" in r for r in rows)


def test_checkpoint_is_complete_and_holds_queue_and_momentum_encoder(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000004"]
    ckpt = ckpts[0]
    assert (ckpt / "COMPLETE").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert not list((run_dir / "checkpoints").glob(".tmp*"))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"queue.keys", "queue.ptr"} <= keys
        assert f.get_tensor("queue.ptr").item() == (4 * 32) % 64
    assert any(k.startswith("momentum_backbone.") for k in keys)


def test_reports_knn_before_and_after(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    assert res["steps"] == 4
    for key in ("knn_init", "knn_final"):
        assert 0.0 <= res[key]["top1"] <= 100.0 and res[key]["top5"] >= res[key]["top1"]


def test_python_dash_m_entry_point_and_config_errors(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "mochi_hub", "pretrain", "quickstart", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(ok.stdout)["name"] == "quickstart"
    bad = subprocess.run(
        [sys.executable, "-m", "mochi_hub", "pretrain", "quickstart", "mixing.num_hrad=3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "mixing.num_hrad" in bad.stderr and "mixing.num_hard" in bad.stderr
