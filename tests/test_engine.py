"""The training engine: exact resume after SIGKILL, atomic checkpoints, NaN stop, shuffle-BN."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mochi_hub import engine
from mochi_hub.config import ConfigError, load_config
from mochi_hub.engine import COMPLETE_MARKER, find_checkpoint, pretrain
from mochi_hub.moco import MoCoV2, create_backbone

TINY = [
    "train.log_with=none",
    "train.log_every=1",
    "eval.at_start=false",
    "eval.at_end=false",
    "data.num_workers=0",
    "mixing.start_epoch=1",
    "model.queue_size=256",
    "mixing.num_hard=16",
    "mixing.num_synthetic=8",
    "mixing.num_synthetic_query=4",
    "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mochi_hub", "pretrain", "quickstart", f"train.output_dir={out}",
            *TINY, *extra]  # fmt: skip


def _final_state(run: Path) -> tuple[dict, dict, dict]:
    ckpt = find_checkpoint(run)
    model = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return model, optim, json.loads((ckpt / "trainer_state.json").read_text())


@pytest.mark.slow
def test_sigkill_then_resume_continues_bit_for_bit(tmp_path):
    # 1437 digits / batch 128 = 11 steps per epoch. The kill comes after step 12, in epoch 1,
    # once the mixing warm-up (epoch 0) is over and MoCHi's generator has been used, so the
    # resumed run must restore the data order, the generators and every state mid-epoch.
    common = ["data.batch_size=128", "train.max_steps=16", "train.checkpoint_every_steps=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight, *common), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        _cmd(killed, *common), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000012" / COMPLETE_MARKER).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no clean exit, possibly in the middle of a save
    proc.wait()
    killed_at = _final_state(killed)[2]["step"]
    assert 12 <= killed_at < 16
    resumed = subprocess.run(_cmd(killed, *common), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints'}" in resumed.stdout

    model_a, optim_a, state_a = _final_state(straight)
    model_b, optim_b, state_b = _final_state(killed)
    assert state_a == state_b and state_a["step"] == 16 and state_a["epoch"] == 1
    assert model_a.keys() == model_b.keys()
    for name in model_a:  # weights, momentum encoder, BN statistics, queue and its pointer
        assert torch.equal(model_a[name], model_b[name]), name
    assert optim_a["param_groups"] == optim_b["param_groups"]
    for pid, st in optim_a["state"].items():
        for key, value in st.items():
            assert torch.equal(value, optim_b["state"][pid][key]), (pid, key)
    results = json.loads((killed / "results.json").read_text())
    assert results["steps"] == 16 and results["resumed_from"] is not None


def _cfg(tmp_path, *extra):
    return load_config(
        "quickstart",
        [*TINY, f"train.output_dir={tmp_path / 'run'}", "data.batch_size=32", *extra],
    )


def test_interrupted_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "train.max_steps=3", "train.checkpoint_every_steps=1")
    real_save = engine.save_checkpoint
    calls = {"n": 0}

    def dying_save(accelerator, run_dir, state, keep, generators=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die half way through the second save
            tmp = run_dir / "checkpoints" / f".tmp_step_{state['step']:08d}"
            tmp.mkdir(parents=True)
            (tmp / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated
            raise KeyboardInterrupt("killed during checkpoint write")
        return real_save(accelerator, run_dir, state, keep, generators)

    monkeypatch.setattr(engine, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    run = tmp_path / "run"
    assert find_checkpoint(run).name == "step_00000001"  # the partial one is ignored
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    result = pretrain(cfg)  # resume=auto picks step 1, finishes at step 3
    assert result.resumed_from.name == "step_00000001" and result.steps == 3
    assert not list((run / "checkpoints").glob(".tmp*"))


def test_resume_reads_every_pickle_with_weights_only(tmp_path, monkeypatch):
    # Accelerate reads optimizer.bin and random_states_*.pkl with weights_only=True but custom
    # objects with weights_only=False: the engine registers none (its generators are saved as
    # safetensors, one file per rank), so no checkpoint file can run code when resumed.
    cfg = _cfg(tmp_path, "train.max_steps=2", "train.checkpoint_every_steps=1")
    pretrain(cfg)
    ckpt = find_checkpoint(tmp_path / "run")
    assert not list(ckpt.glob("custom_checkpoint_*"))
    assert set(load_file(str(ckpt / "rng_state_0.safetensors"))) == {"mixing", "shuffle_bn"}
    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append((str(args[0]), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    cfg = _cfg(tmp_path, "train.max_steps=3", "train.checkpoint_every_steps=1")
    assert pretrain(cfg).resumed_from == ckpt
    assert {Path(f).name for f, _ in calls} >= {"optimizer.bin", "random_states_0.pkl"}
    assert all(weights_only is True for _, weights_only in calls), calls


def test_keeps_only_the_last_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every_steps=1",
               "train.keep_checkpoints=2")  # fmt: skip
    pretrain(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "train.max_steps=5", "train.checkpoint_every_steps=1")
    real_loss = engine.moco_v2_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(engine, "moco_v2_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 3"):
        pretrain(cfg)
    assert find_checkpoint(tmp_path / "run").name == "step_00000002"


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    pretrain(_cfg(tmp_path, "train.max_steps=1"))
    other = _cfg(tmp_path, "train.max_steps=2", "model.backbone_kwargs={channels: [8, 8, 8, 8]}")
    with pytest.raises(RuntimeError, match="does not match this run's model"):
        pretrain(other)


def test_mocov3_trains_with_mochi_on_in_batch_negatives(tmp_path):
    cfg = _cfg(
        tmp_path,
        "train.max_steps=2",
        "model.method=mocov3",
        "model.proj_dim=16",
        "model.hidden_dim=32",
        "model.momentum_schedule=cosine",
        "mixing.start_epoch=0",
        "mixing.num_hard=8",
        "optim.name=adamw",
        "optim.base_lr=1.0e-3",
        "optim.schedule_unit=step",
        "optim.warmup_epochs=0.1",
        "optim.exclude_bias_and_norm=true",
    )
    result = pretrain(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/syn_share_topn"] >= 0 and rows[-1]["train/momentum"] > 0.99
    assert "queue.keys" not in load_file(str(result.checkpoint / "model.safetensors"))


def test_split_bn_keys_match_their_images():
    torch.manual_seed(0)
    model = MoCoV2(create_backbone("resnet18", channels=(8, 8, 8, 8), stem_width=8), proj_dim=8,
                   queue_size=16).eval()  # fmt: skip
    x = torch.randn(8, 3, 32, 32)
    perm = torch.randperm(8)
    # in eval mode BatchNorm uses running statistics, so shuffling and splitting must give
    # exactly the unshuffled keys back, each at its own image's position
    assert torch.allclose(model.embed_key(x, perm, splits=4), model.embed_key(x), atol=1e-6)
    model.train()
    split = model.embed_key(x, perm, splits=4)
    assert not torch.allclose(split, model.embed_key(x), atol=1e-4)  # train mode: own statistics
    with pytest.raises(ValueError, match="perm"):
        model.embed_key(x, torch.randperm(6))


def test_each_process_gets_a_distinct_shard_of_every_epoch():
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from mochi_hub.data.sampling import EpochSampler

    size, per_process = 40, 4
    seen = {}
    for rank in range(2):
        sampler = EpochSampler(size, seed=3)
        loader = prepare_data_loader(
            DataLoader(list(range(size * 3)), batch_size=per_process, sampler=sampler,
                       drop_last=True),
            num_processes=2, process_index=rank, put_on_device=False,
        )  # fmt: skip
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen[rank, epoch] = [i for batch in loader for i in batch.tolist()]
    for epoch in (0, 1):
        a, b = set(seen[0, epoch]), set(seen[1, epoch])
        assert not a & b, "two processes saw the same image in one epoch"
        assert len(a) == len(b) == size // 2  # fixed global batch: 5 steps of 2 x 4 images
        assert all(i // size == epoch for i in a | b)  # items carry their epoch
    assert seen[0, 0] != [i - size for i in seen[0, 1]]  # a new order every epoch


@pytest.fixture
def folder_with_corrupt_images(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 10), ("test", 3)):
        for label in ("a", "b"):
            d = tmp_path / "images" / split / label
            d.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (36, 36, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"{i}.jpg")
    bad = tmp_path / "images" / "train" / "a"
    (bad / "zero_bytes.jpg").write_bytes(b"")
    good = (bad / "0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return tmp_path / "images"


def test_corrupt_images_are_skipped_counted_and_bounded(folder_with_corrupt_images, tmp_path):
    common = [f"data.source={folder_with_corrupt_images}", "data.batch_size=11",
              "model.queue_size=33", "data.image_size=32", "train.max_steps=2"]  # fmt: skip
    result = pretrain(_cfg(tmp_path, *common))  # 22 images = 2 batches: every image once
    assert result.corrupt_images >= 2 and result.steps == 2
    with pytest.raises(RuntimeError, match="data.max_corrupt=0"):
        pretrain(_cfg(tmp_path / "strict", *common, "data.max_corrupt=0"))


def test_empty_or_missing_data_fails_before_training(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="data source"):
        pretrain(_cfg(tmp_path, f"data.source={tmp_path / 'empty'}"))
    with pytest.raises(ConfigError, match="larger than the training set"):
        pretrain(_cfg(tmp_path, "data.batch_size=2048", "model.queue_size=4096"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bf16_autocast_training_on_cpu(tmp_path):
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}  # what `accelerate launch` sets
    out = tmp_path / "bf16"
    proc = subprocess.run(
        _cmd(out, "data.batch_size=32", "train.max_steps=2", "mixing.start_epoch=0",
             "optim.clip_grad=1.0"),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_each_optimizer_takes_a_step_and_changes_only_the_query_encoder(name, tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=1", f"optim.name={name}", "optim.base_lr=0.1",
               "optim.exclude_bias_and_norm=true")  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    init = engine.build_model(cfg).state_dict()  # the engine seeds the same way
    result = pretrain(cfg)
    after = load_file(str(result.checkpoint / "model.safetensors"))
    assert not torch.equal(after["backbone.conv1.weight"], init["backbone.conv1.weight"])
    # the momentum encoder only moves by the EMA (m = 0.99): a hundredth of the query's step
    dq = after["backbone.conv1.weight"] - init["backbone.conv1.weight"]
    dk = after["momentum_backbone.conv1.weight"] - init["momentum_backbone.conv1.weight"]
    torch.testing.assert_close(dk, 0.01 * dq, rtol=1e-3, atol=1e-7)


def test_streaming_source_trains_counts_corrupt_images_and_resumes_exactly(
    folder_with_corrupt_images, tmp_path, monkeypatch
):
    # 22 files stream (2 of them corrupt): an epoch is 22 // 10 = 2 steps; 5 steps span 3 epochs
    common = [f"data.source={folder_with_corrupt_images}", "data.streaming=true",
              "data.streaming_size=22", "data.shuffle_buffer=8", "data.batch_size=10",
              "model.queue_size=40", "data.image_size=32", "train.max_steps=5",
              "train.checkpoint_every_steps=1", "mixing.start_epoch=1"]  # fmt: skip
    straight = pretrain(_cfg(tmp_path / "a", *common))
    assert straight.steps == 5 and straight.corrupt_images >= 2  # each epoch meets both

    real_save, calls = engine.save_checkpoint, {"n": 0}

    def dying_save(accelerator, run_dir, state, keep, generators=None):
        calls["n"] += 1
        if calls["n"] == 4:  # die while saving step 4, in the middle of epoch 1
            raise KeyboardInterrupt("killed")
        return real_save(accelerator, run_dir, state, keep, generators)

    monkeypatch.setattr(engine, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tmp_path / "b", *common))
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    resumed = pretrain(_cfg(tmp_path / "b", *common))
    assert resumed.resumed_from.name == "step_00000003" and resumed.steps == 5
    a = load_file(str(straight.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_streaming_needs_its_size(folder_with_corrupt_images, tmp_path):
    cfg = _cfg(tmp_path, f"data.source={folder_with_corrupt_images}", "data.streaming=true",
               "data.batch_size=10", "model.queue_size=40")  # fmt: skip
    with pytest.raises(ConfigError, match="data.streaming_size is needed"):
        pretrain(cfg)
    too_big = _cfg(tmp_path, f"data.source={folder_with_corrupt_images}", "data.streaming=true",
                   "data.streaming_size=60", "data.batch_size=10", "model.queue_size=40",
                   "train.max_steps=4")  # fmt: skip
    with pytest.raises(RuntimeError, match="ran out of streamed data"):
        pretrain(too_big)


def test_knn_monitor_runs_every_n_epochs(tmp_path):
    cfg = _cfg(tmp_path, "data.batch_size=128", "train.max_steps=22", "eval.every_epochs=1",
               "eval.knn_k=20", "train.log_every=11")  # fmt: skip
    result = pretrain(cfg)  # 1437 digits / 128 = 11 steps per epoch: 2 epochs
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn/top1" in r]
    assert [r["step"] for r in knn] == [11]  # after epoch 1; the last epoch ends the run
    assert 0.0 < knn[0]["knn/top1"] <= 100.0 and knn[0]["knn/top5"] >= knn[0]["knn/top1"]


@pytest.mark.slow
def test_torch_compile_trains_and_keeps_the_checkpoint_layout(tmp_path):
    out = tmp_path / "compiled"
    proc = subprocess.run(
        _cmd(out, "model.compile=true", "data.batch_size=32", "train.max_steps=2",
             "model.backbone_kwargs={channels: [8, 8, 8, 8], stem_width: 8}"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    keys = load_file(str(find_checkpoint(out) / "model.safetensors")).keys()
    assert "queue.keys" in keys and not any("_orig_mod" in k for k in keys)
