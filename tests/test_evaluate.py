"""`mochi-hub eval`: backbone specs, feature cache, kNN and the logistic-regression probe."""

import json

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

import mochi_hub
from mochi_hub import evaluate as evaluate_mod
from mochi_hub.cli import main
from mochi_hub.config import load_config
from mochi_hub.engine import pretrain
from mochi_hub.evaluate import (
    backbone_name,
    default_output_dir,
    evaluate,
    extract_cached,
    linear_probe,
    load_backbone,
    make_accelerator,
)
from mochi_hub.export import export_backbone
from mochi_hub.knn import knn_accuracy

TINY = ["train.max_steps=2", "train.log_with=none", "eval.at_start=false", "eval.at_end=false",
        "data.num_workers=0", "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
        "model.queue_size=64", "mixing.num_hard=16"]  # fmt: skip
DIGITS_32 = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
             "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-step pretraining run, its backbone weights, and its export."""
    root = tmp_path_factory.mktemp("eval")
    result = pretrain(load_config("quickstart", [f"train.output_dir={root / 'run'}", *TINY]))
    export = export_backbone(root / "run", root / "resnet18_mochi.digits")
    state = load_file(str(result.checkpoint / "model.safetensors"))
    backbone = {
        k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
    }
    return root / "run", result.checkpoint, export, backbone


def _random_backbone():
    """A fixed, seeded random-feature ResNet (64 features) for 32-px digits.

    ``zero_init_last=False``: with timm's default zero-initialised residual branches a random
    network is little more than its stem and gives chance-level features.
    """
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet18", num_classes=0, channels=(8, 16, 32, 64), stem_width=8, zero_init_last=False
    )
    return model.eval()


def _separable(n, seed, num_classes=10, dim=16, margin=2.0):
    """Gaussian points labelled by the argmax of a fixed linear map, kept if the margin is wide."""
    w = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, dim, generator=g)
    top2 = (x @ w.T).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1] > margin).nonzero().squeeze(1)[:n]
    return x[keep], top2.indices[keep, 0]


# --------------------------------------------------------------------------- protocols on features


def test_probe_and_knn_on_linearly_separable_features():
    train_x, train_y = _separable(1000, seed=0)
    val_x, val_y = _separable(300, seed=1)
    res = linear_probe(train_x, train_y, val_x, val_y, num_classes=10)
    # separable with a margin: the probe classifies every held-out point
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["l2"] in evaluate_mod.PROBE_L2_GRID and len(res["holdout_top1"]) == 5
    assert res["weight"].shape == (10, 16) and res["bias"].shape == (10,)
    # the classes are cones through the origin: cosine kNN does well, not perfectly (86.7%)
    knn = knn_accuracy(train_x, train_y, val_x, val_y, k=20)
    assert 80.0 < knn["top1"] < 100.0
    # standardisation makes the probe blind to the scale of single features
    scale = torch.logspace(-3, 3, 16)
    scaled = linear_probe(train_x * scale, train_y, val_x * scale, val_y, num_classes=10)
    assert scaled["top1"] == 100.0 and scaled["l2"] == res["l2"]


def test_probe_rejects_bad_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe(x, y, x, y, num_classes=2, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        linear_probe(x[:1], y[:1], x, y, num_classes=2)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(x, y, x, y, num_classes=2, l2_grid=())


# --------------------------------------------------------------------------- digits, cache, rows


def test_digits_knn_and_probe_with_random_backbone_then_cache_hit(tmp_path):
    model = _random_backbone()
    kw = dict(backbone=(model, DIGITS_32), output_dir=tmp_path, workers=0)
    knn = evaluate("random-resnet18", "digits", protocol="knn", knn_k=20, **kw)
    # 10 balanced classes: chance is 10% top-1 and 50% top-5. A seeded random ResNet's
    # features already separate the digits (measured: kNN 78.6% / 98.9%, probe 84.4% / 98.1%
    # top-1 / top-5); the thresholds leave room for other BLAS builds, far above chance.
    assert [r["metric"] for r in knn] == ["top1", "top5"]
    assert knn[0]["value"] > 65.0 and knn[1]["value"] > 90.0
    correct = knn[0]["value"] * 360 / 100  # the held-out split has 360 images
    assert abs(correct - round(correct)) < 1e-3
    for row in knn:
        assert set(row) == {"dataset", "split", "protocol", "metric", "value", "settings"}
        assert (row["dataset"], row["split"], row["protocol"]) == ("digits", "test", "knn")
        s = row["settings"]
        assert (s["k"], s["temperature"], s["image_size"], s["crop_pct"]) == (20, 0.07, 32, 1.0)
        assert (s["train_images"], s["val_images"]) == (1437, 360)
    assert json.loads((tmp_path / "eval_knn.json").read_text()) == knn
    cached = sorted((tmp_path / "features").glob("*.safetensors"))
    assert len(cached) == 2  # train and held-out features
    with safe_open(str(cached[0]), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        assert meta["weights_sha256"] == knn[0]["settings"]["weights_sha256"]
        assert f.get_tensor("features").shape[1] == 64

    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    probe = evaluate("random-resnet18", "digits", protocol="probe", **kw)
    assert not calls, "the probe re-extracted features despite the cache"
    assert probe[0]["value"] > 70.0 and probe[1]["value"] > 90.0
    assert probe[0]["settings"]["l2"] in probe[0]["settings"]["l2_grid"]
    assert json.loads((tmp_path / "eval_probe.json").read_text()) == probe
    again = evaluate("random-resnet18", "digits", protocol="knn", knn_k=20, **kw)
    assert not calls and again == knn


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


def test_feature_cache_is_keyed_and_survives_a_broken_file(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    acc = make_accelerator()
    kw = dict(cache_dir=tmp_path, accelerator=acc, batch_size=4)
    feats, labels, hit = extract_cached(model, _Images(10), key={"a": 1}, **kw)
    assert not hit and feats.shape == (10, 4) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))  # L2-normalised
    n = len(calls)
    again, _, hit = extract_cached(model, _Images(10), key={"a": 1}, **kw)
    assert hit and len(calls) == n and torch.equal(again, feats)
    _, _, hit = extract_cached(model, _Images(10), key={"a": 2}, **kw)  # another key: a miss
    assert not hit and len(calls) > n
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:40])  # truncated: recomputed, not trusted
    _, _, hit = extract_cached(model, _Images(10), key={"a": 1}, **kw)
    assert not hit
    _, _, hit = extract_cached(model, _Images(10), key={"a": 1}, **kw)
    assert hit


# --------------------------------------------------------------------------- backbone specs


def test_load_backbone_from_run_checkpoint_and_export(trained):
    run, ckpt, export, weights = trained
    expected = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                "crop_pct": 1.0, "interpolation": "bilinear"}  # fmt: skip
    for spec in (run, ckpt, str(export)):
        model, data_config = load_backbone(spec)
        assert not model.training and model.num_features == 16
        assert model.get_classifier() is None or model.num_classes == 0
        assert model.state_dict().keys() == weights.keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), (spec, k)
        got = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in data_config.items()}
        assert {k: got[k] for k in expected} == expected, spec
    assert default_output_dir(run) == run and default_output_dir(ckpt) == run
    assert backbone_name(ckpt) == f"run/{ckpt.name}" and backbone_name(run) == "run"
    assert default_output_dir(export) == default_output_dir("resnet18_mochi.digits")
    assert str(default_output_dir("hf-hub:org/x")) == "runs/eval/hf-hub_org_x"


def test_load_backbone_from_timm_names(trained, hub_cache, monkeypatch):
    import huggingface_hub.constants as hub_constants

    _, _, export, weights = trained
    cache = hub_cache("my-lab/resnet18_mochi.cifar10", export)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    mochi_hub.set_hub_org("my-lab")
    try:
        tagged, cfg = load_backbone(
            "resnet18_mochi.cifar10", channels=(8, 16, 16, 16), stem_width=8
        )
        hub, hub_cfg = load_backbone("hf-hub:my-lab/resnet18_mochi.cifar10")
    finally:
        mochi_hub.set_hub_org(mochi_hub.registry.DEFAULT_HUB_ORG)
    for model in (tagged, hub):
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), k
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0  # the registered config
    assert tuple(cfg["mean"]) == (0.4914, 0.4822, 0.4465)
    assert tuple(hub_cfg["mean"]) == (0.5, 0.5, 0.5)  # the exported config.json
    plain, plain_cfg = load_backbone("resnet18")  # untagged: random weights, timm's defaults
    assert plain.num_features == 512 and plain_cfg["input_size"] == (3, 224, 224)


def test_load_backbone_errors(trained, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        load_backbone("resnett18")
    with pytest.raises(ValueError, match="no pretrained weights 'resnet18.nope'"):
        load_backbone("resnet18.nope")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        load_backbone(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_backbone(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        load_backbone("hf-hub:nobody/nothing")  # offline, not cached


# --------------------------------------------------------------------------- command line


def test_cli_knn_on_an_export_feeds_export_eval_results(trained, tmp_path, capsys):
    run, _, export, _ = trained
    out = tmp_path / "knn.json"
    args = ["eval", str(export), "--data", "digits", "--knn-k", "20", "--workers", "0",
            "--output-dir", str(tmp_path / "ev"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dataset  split  protocol  metric  value" in printed and f"results: {out}" in printed
    rows = json.loads(out.read_text())
    assert [(r["protocol"], r["metric"]) for r in rows] == [("knn", "top1"), ("knn", "top5")]
    assert all(0.0 < r["value"] <= 100.0 for r in rows)
    assert rows[0]["settings"]["backbone"] == "resnet18_mochi.digits"  # no local path in cards
    assert list((tmp_path / "ev" / "features").glob("*.safetensors"))
    # the rows, "settings" included, go straight into the model card
    card_dir = tmp_path / "card"
    assert main(["export", str(run), "--out", str(card_dir), "--eval-results", str(out)]) == 0
    results = ModelCard.load(card_dir / "README.md").data.eval_results
    assert [(r.metric_name, r.metric_value) for r in results] == [
        ("knn top1", rows[0]["value"]),
        ("knn top5", rows[1]["value"]),
    ]


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["eval", "no_such_model_xyz", "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mochi-hub eval: backbone 'no_such_model_xyz'") and "\n" not in err
    assert main(["eval", str(tmp_path / "nope"), "--data", "digits"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "resnet18", "--data", "digits", "--protocol", "svm"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'svm'" in capsys.readouterr().err
    from mochi_hub import cli, linear

    assert cli._EVAL_PROTOCOLS == evaluate_mod.PROTOCOLS
    assert set(cli._LINEAR_PRESETS) == set(linear.LINEAR_PRESETS)
