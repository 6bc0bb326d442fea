"""Export to a Hub folder, and loading it back through timm: plain, hf-hub cache and registry."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

import mochi_hub
from mochi_hub import export as export_mod
from mochi_hub.config import load_config
from mochi_hub.engine import pretrain
from mochi_hub.export import export_backbone

TINY = ["train.max_steps=2", "train.log_with=none", "eval.at_start=false", "eval.at_end=false",
        "data.num_workers=0", "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
        "model.queue_size=64", "mixing.num_hard=16"]  # fmt: skip
ROWS = [{"dataset": "digits", "split": "test", "protocol": "knn", "metric": "top1", "value": 92.5}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    result = pretrain(load_config("quickstart", [f"train.output_dir={root / 'run'}", *TINY]))
    out = export_backbone(root / "run", root / "resnet18_mochi.digits", eval_results=ROWS)
    backbone = {
        k.removeprefix("backbone."): v
        for k, v in load_file(str(result.checkpoint / "model.safetensors")).items()
        if k.startswith("backbone.")
    }
    return out, backbone


def test_folder_holds_only_the_query_backbone_with_provenance(exported):
    out, backbone = exported
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors", "config.json", "README.md", "training_config.yaml",
        "eval_results.json",
    }  # fmt: skip
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(backbone)  # no momentum encoder, projector or queue
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), backbone[k])
    assert meta["format"] == "pt" and meta["architecture"] == "resnet18"
    assert meta["recipe"] == "quickstart" and json.loads(meta["mixing"]) == [16, 64, 32]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]


def test_card_front_matter_and_model_index(exported):
    out, _ = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert {"self-supervised", "mochi"} <= set(card.data.tags)
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_value) == ("digits", 92.5)
    text = (out / "README.md").read_text()
    assert "(16, 64, 32)" in text and "@inproceedings{kalantidis2020hard" in text


def test_plain_timm_loads_the_folder_without_mochi_hub(exported):
    out, backbone = exported
    script = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        "assert 'mochi_hub' not in sys.modules\n"
        "torch.manual_seed(0)\n"
        "print(m(torch.randn(2, 3, 32, 32)).sum().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = timm.create_model("resnet18", num_classes=0, channels=(8, 16, 16, 16), stem_width=8)
    ref.load_state_dict(backbone)
    torch.manual_seed(0)
    expected = ref.eval()(torch.randn(2, 3, 32, 32)).sum().item()
    assert float(proc.stdout.strip()) == pytest.approx(expected, rel=1e-5)


def test_registered_name_and_hf_hub_prefix_load_from_an_offline_hub_cache(
    exported, tmp_path, monkeypatch
):
    import huggingface_hub.constants as hub_constants

    out, backbone = exported
    repo = tmp_path / "hub" / "models--my-lab--resnet18_mochi.cifar10"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snap / name).write_bytes((out / name).read_bytes())
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    mochi_hub.set_hub_org("my-lab")
    try:
        m = timm.create_model(
            "resnet18_mochi.cifar10", pretrained=True, channels=(8, 16, 16, 16), stem_width=8
        )
        for k, v in m.state_dict().items():
            assert torch.equal(v, backbone[k]), k
        head = timm.create_model(
            "resnet18_mochi.cifar10", pretrained=True, num_classes=10,
            channels=(8, 16, 16, 16), stem_width=8,
        )  # fmt: skip
        assert head.get_classifier().out_features == 10  # fresh head on pretrained features
        hub = timm.create_model("hf-hub:my-lab/resnet18_mochi.cifar10", pretrained=True)
        assert torch.equal(hub.state_dict()["conv1.weight"], backbone["conv1.weight"])
    finally:
        mochi_hub.set_hub_org(mochi_hub.registry.DEFAULT_HUB_ORG)


def test_export_refuses_to_overwrite_and_leaves_nothing_behind_on_failure(
    exported, tmp_path, monkeypatch
):
    out, _ = exported
    run = out.parent / "run"
    with pytest.raises(FileExistsError, match="overwrite"):
        export_backbone(run, out)

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(export_mod, "render_card", broken_card)
    target = tmp_path / "half"
    with pytest.raises(RuntimeError, match="disk full"):
        export_backbone(run, target)
    assert not target.exists() and not list(tmp_path.glob(".half.tmp-*"))


def test_export_rejects_a_checkpoint_of_another_architecture(exported, tmp_path):
    out, _ = exported
    run = out.parent / "run"
    text = (run / "config.yaml").read_text().replace("    - 8\n", "    - 16\n")  # channels
    other = tmp_path / "run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text(text)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    (other / "checkpoints" / ckpt.name).symlink_to(ckpt)
    with pytest.raises(ValueError, match="does not match architecture 'resnet18'"):
        export_backbone(other, tmp_path / "x")


def test_registry_lists_pretrained_configs_and_switches_org():
    names = timm.list_pretrained("*_mochi*")
    assert (
        "resnet50_mochi.in1k_200ep" in names and "vit_small_patch16_224_mochi.in1k_300ep" in names
    )
    cfg = timm.models.get_pretrained_cfg("resnet50_mochi.in100_200ep")
    assert cfg.num_classes == 0 and cfg.paper_ids == "arXiv:2010.01028"
    assert cfg.hf_hub_id == f"{mochi_hub.hub_org()}/resnet50_mochi.in100_200ep"
    with pytest.raises(ValueError, match="organisation"):
        mochi_hub.set_hub_org("a/b")
    feats = timm.create_model("resnet18_mochi", features_only=True)
    assert feats.feature_info.reduction() == [2, 4, 8, 16, 32]
    outs = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()


def test_export_command_line(exported, tmp_path, capsys):
    from mochi_hub.cli import main

    out, _ = exported
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))
    target = tmp_path / "resnet18_mochi.cli"
    args = ["export", str(out.parent / "run"), "--out", str(target), "--eval-results", str(rows)]
    assert main(args) == 0 and (target / "model.safetensors").exists()
    assert main(args) == 2  # exists: refused, named
    assert "overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
