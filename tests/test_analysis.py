"""The paper's training analysis: hardness profile, class-oracle share and oracle training mode."""

import json

import pytest
import torch
import torch.nn.functional as F

from mochi_hub import engine
from mochi_hub.config import ConfigError, load_config
from mochi_hub.engine import pretrain
from mochi_hub.losses import (
    MixingSpec,
    false_negative_mask,
    false_negative_share,
    hardness_profile,
    moco_v2_loss,
    moco_v3_loss,
)
from mochi_hub.queue import MemoryQueue

TINY = ["train.log_with=none", "eval.at_start=false", "eval.at_end=false", "data.num_workers=0",
        "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}", "train.log_every=1",
        "model.queue_size=64", "mixing.num_hard=16", "mixing.start_epoch=0",
        "data.batch_size=32"]  # fmt: skip


def _unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _reference_profile(logits, labels, n_syn, top):
    rows = []
    for i in range(logits.shape[0]):
        real = logits[i, : logits.shape[1] - n_syn]
        p = torch.softmax(real, 0).tolist()
        negs = sorted((v for j, v in enumerate(p) if j != labels[i]), reverse=True)
        rows.append(negs[:top])
    return torch.tensor(rows, dtype=torch.float64).mean(0)


@pytest.mark.parametrize("mixing", [None, MixingSpec(8, 6, 3)])
def test_hardness_profile_matches_a_loop_reference_for_moco_v2(mixing, gen):
    q, k, queue = _unit(5, 16, gen=gen), _unit(5, 16, gen=gen), _unit(40, 16, gen=gen)
    out = moco_v2_loss(q, k, queue, temperature=0.2, mixing=mixing, generator=gen)
    prof = hardness_profile(out, top=12)
    ref = _reference_profile(out.logits.double(), out.labels.tolist(), out.num_synthetic, 12)
    torch.testing.assert_close(prof.double(), ref, rtol=1e-5, atol=1e-7)
    assert (prof[:-1] >= prof[1:]).all()  # sorted, hardest first
    full = hardness_profile(out, top=10_000)  # a window larger than the queue: all K negatives
    assert full.shape == (40,) and full.sum() < 1


def test_hardness_profile_skips_moco_v3_positives_off_the_diagonal(gen):
    q, k_all = _unit(4, 8, gen=gen), _unit(12, 8, gen=gen)  # rank 1 of a 3-process batch
    out = moco_v3_loss(q, k_all, temperature=0.2, rank=1)
    assert out.labels.tolist() == [4, 5, 6, 7]
    ref = _reference_profile(out.logits.double(), out.labels.tolist(), 0, 5)
    torch.testing.assert_close(hardness_profile(out, top=5).double(), ref, rtol=1e-5, atol=1e-7)


def test_false_negative_share_matches_a_loop_reference(gen):
    q, k, queue = _unit(6, 16, gen=gen), _unit(6, 16, gen=gen), _unit(30, 16, gen=gen)
    labels = torch.randint(0, 3, (6,), generator=gen)
    queue_labels = torch.randint(-1, 3, (30,), generator=gen)  # -1: unknown (initial keys)
    same = false_negative_mask(labels, queue_labels)
    assert same.shape == (6, 30)
    assert not same[:, queue_labels < 0].any()
    assert torch.equal(same[2], (queue_labels == labels[2]) & (queue_labels >= 0))
    out = moco_v2_loss(q, k, queue, temperature=0.2, mixing=MixingSpec(8, 4, 4), generator=gen)
    aligned = torch.cat([torch.zeros(6, 1, dtype=torch.bool), same], 1)
    share = false_negative_share(out, aligned, top=7)
    real = out.logits[:, 1:31]
    expected = [
        sum(bool(same[i, j]) for j in real[i].argsort(descending=True)[:7].tolist()) / 7
        for i in range(6)
    ]
    assert share.item() == pytest.approx(100 * sum(expected) / 6)
    with pytest.raises(ValueError, match="shape of the real logits"):
        false_negative_share(out, same, top=7)  # not aligned with the positive column


def _keys_for(labels):
    """Keys that encode their label: normalize([label, 1, 0, 0])."""
    raw = torch.zeros(len(labels), 4)
    raw[:, 0], raw[:, 1] = labels.float(), 1.0
    return F.normalize(raw, dim=1)


def test_queue_keeps_labels_aligned_with_keys_through_wraparound():
    queue = MemoryQueue(5, 4, track_labels=True)
    assert queue.labels.tolist() == [-1] * 5 and "labels" in queue.state_dict()
    assert "labels" not in MemoryQueue(5, 4).state_dict()
    for step in range(4):  # 3 keys per step into 5 slots: wraps
        labels = torch.arange(3) + 10 * step
        queue.enqueue(_keys_for(labels), labels)
        known = queue.labels >= 0
        torch.testing.assert_close(queue.keys[known], _keys_for(queue.labels[known]))
    assert sorted(queue.labels.tolist()) == [20, 21, 22, 30, 31, 32][1:]  # the 5 newest
    ptr = int(queue.ptr)
    queue.enqueue(F.normalize(torch.ones(2, 4), dim=1))  # no labels given: unknown
    assert queue.labels[[ptr % 5, (ptr + 1) % 5]].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="labels must have shape"):
        queue.enqueue(F.normalize(torch.ones(2, 4), dim=1), torch.zeros(3, dtype=torch.long))


def test_training_writes_the_hardness_profile_per_epoch_and_the_false_negative_share(tmp_path):
    cfg = load_config(
        "quickstart",
        [f"train.output_dir={tmp_path}", "train.epochs=2", "train.max_steps=null",
         "eval.analysis_top=32", *TINY, "data.max_train_images=null"][:-1],
    )  # fmt: skip
    cfg.data.batch_size = 256  # 5 steps per epoch on the 1,437 training digits
    cfg.model.queue_size = 512
    pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["logged_steps"] == 5
    for r in rows:
        prof = r["hardness_profile"]
        assert len(prof) == 32 and all(a >= b for a, b in zip(prof, prof[1:], strict=False))
        assert 0 < sum(prof) < 1
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = [m["train/false_neg_share_topn"] for m in metrics if "train/false_neg_share_topn" in m]
    assert len(shares) == 10 and all(0 <= s <= 100 for s in shares)
    # 10 balanced classes: once the queue holds real keys, same-class points are found
    assert max(shares) > 0


def test_oracle_mode_masks_same_class_queue_entries_before_the_selection(tmp_path, monkeypatch):
    seen = []
    real_loss = engine.moco_v2_loss

    def spy(q, k, queue, **kw):
        seen.append((kw["mask"], engine_model[0].queue.labels.clone()))
        return real_loss(q, k, queue, **kw)

    engine_model = []
    real_build = engine.build_model

    def build(cfg, **kw):
        engine_model.append(real_build(cfg, **kw))
        return engine_model[0]

    monkeypatch.setattr(engine, "moco_v2_loss", spy)
    monkeypatch.setattr(engine, "build_model", build)
    cfg = load_config(
        "quickstart", [f"train.output_dir={tmp_path}", "train.max_steps=4", "mixing.oracle=true",
                       *TINY],
    )  # fmt: skip
    pretrain(cfg)
    assert len(seen) == 4
    assert seen[0][0] is not None and not seen[0][0].any()  # the initial keys carry no label
    mask, queue_labels = seen[-1]
    assert mask.shape == (32, 64) and mask.any()
    assert torch.equal(mask, mask & (queue_labels >= 0)[None, :])
    assert (queue_labels >= 0).sum() == 64  # 3 steps x 32 keys filled the 64 slots


def test_oracle_mode_needs_labels(tmp_path):
    with pytest.raises(ConfigError, match="mixing.oracle needs labelled training data"):
        load_config(
            "quickstart",
            [f"train.output_dir={tmp_path}", "mixing.oracle=true", "data.label_column=null"],
        )


def test_report_draws_curves_and_profiles_and_the_card_embeds_them(tmp_path):
    from huggingface_hub import ModelCard
    from PIL import Image

    from mochi_hub.cli import main
    from mochi_hub.export import export_backbone
    from mochi_hub.report import read_analysis, read_metrics

    runs = []
    for name, extra in (("moco", ["mixing.enabled=false"]), ("mochi", [])):
        run = tmp_path / name
        cfg = load_config(
            "quickstart",
            [f"train.output_dir={run}", "train.max_steps=6", "eval.analysis_top=16",
             *TINY, "eval.at_end=true", *extra],
        )  # fmt: skip
        cfg.data.batch_size = 256  # 5 steps per epoch: two epochs of analysis
        cfg.model.queue_size = 512
        pretrain(cfg)
        runs.append(run)
    metrics = read_metrics(runs[1])
    assert [s for s, _ in metrics["train/loss"]] == list(range(1, 7))
    assert "knn/top1" in metrics and "train/syn_share_topn" in metrics
    assert "train/syn_share_topn" not in read_metrics(runs[0])  # the baseline has no synthetics
    assert [r["epoch"] for r in read_analysis(runs[1])] == [0, 1]

    out = tmp_path / "report"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    for name in ("training_curves.png", "hardness_profile.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 500
            colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 20  # something was drawn, not a blank page
    assert main(["report", str(tmp_path / "nothing")]) == 2

    export = export_backbone(
        runs[1], tmp_path / "resnet18_mochi.digits", training_curves=out / "training_curves.png"
    )
    assert (export / "training_curves.png").read_bytes() == (
        out / "training_curves.png"
    ).read_bytes()
    assert (
        "![Training curves (mochi-hub report)](training_curves.png)"
        in ModelCard.load(export / "README.md").text
    )
