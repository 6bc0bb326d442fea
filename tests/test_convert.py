"""``mochi-hub convert``: released MoCo / MoCHi / MoCo-v3 checkpoints to Hub folders and detectron2.

The checkpoints are built here from real torchvision / timm modules with seeded random weights, in
the layouts the MoCo, MoCHi and MoCo-v3 code bases save, then converted and loaded back.
"""

import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
import timm
import torch
import torchvision
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mochi_hub.cli import main
from mochi_hub.convert import convert_checkpoint, detectron2_name, infer_architecture


def _randomized(module, seed):
    """Fill every parameter and buffer (BN statistics too) with seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point():
                value.fill_(seed + 7)  # num_batches_tracked
            elif key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=g))
    return module


def _mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """MoCo-v3's ``_build_mlp``: Linear(no bias) / BN / ReLU stacks, last BN without affine."""
    layers = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


def _prefixed(prefix, module, offset=0.0):
    sd = module.state_dict()
    return {f"{prefix}{k}": v + offset if v.is_floating_point() else v for k, v in sd.items()}


def _sgd_state(module):
    return torch.optim.SGD(module.parameters(), lr=0.03, momentum=0.9).state_dict()


def _moco_v2_encoder(arch, seed, mlp=True):
    """MoCo's ``encoder_q``: a torchvision ResNet with a 128-d fc (an MLP for v2 / MoCHi)."""
    encoder = torchvision.models.__dict__[arch](num_classes=128)
    if mlp:
        hidden = encoder.fc.weight.shape[1]
        encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    return _randomized(encoder, seed)


def _moco_state(q, k, prefix, queue=256):
    """MoCo's state dict; ``k`` is the key encoder, or a float offset from ``q`` (cheaper)."""
    enc_k = _prefixed(f"{prefix}encoder_k.", q, k) if isinstance(k, float) else None
    enc_k = enc_k or _prefixed(f"{prefix}encoder_k.", k)
    sd = {**_prefixed(f"{prefix}encoder_q.", q), **enc_k}
    sd[f"{prefix}queue"] = nn.functional.normalize(torch.randn(128, queue), dim=0)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return sd


def _backbone(module, head="fc"):
    return {k: v.clone() for k, v in module.state_dict().items() if not k.startswith(f"{head}.")}


def _counts(module, head="fc"):
    sd = module.state_dict()
    return len(sd) - sum(k.startswith(f"{head}.") for k in sd), sum(
        k.startswith(f"{head}.") for k in sd
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The released layouts as files, with the tensors each conversion must keep."""
    root = tmp_path_factory.mktemp("released")
    made = {}

    # MoCo v2 / MoCHi (.pth.tar of main_moco.py under DDP): module.encoder_q/k, queue, queue_ptr
    for arch in ("resnet18", "resnet50"):
        q = _moco_v2_encoder(arch, 1)
        k = _moco_v2_encoder(arch, 2) if arch == "resnet18" else 0.5  # a distinct encoder_k
        path = root / f"moco_v2_{arch}.pth.tar"
        ckpt = {"epoch": 200, "arch": arch, "state_dict": _moco_state(q, k, "module.")}
        torch.save({**ckpt, "optimizer": _sgd_state(q)}, path)
        made[f"v2_{arch}"] = (path, q, len(q.state_dict()))

    # MoCo v1, saved on one GPU as a bare state dict: no module. prefix, no arch entry, linear fc
    q, k = _moco_v2_encoder("resnet18", 3, mlp=False), _moco_v2_encoder("resnet18", 4, mlp=False)
    path = root / "moco_v1_single_gpu.pth"
    torch.save(_moco_state(q, k, ""), path)
    made["v1"] = (path, q, len(k.state_dict()))

    # MoCo v3 ResNet: base_encoder with an MLP fc projector (BN layers), momentum_encoder, predictor
    def v3_resnet(seed):
        encoder = torchvision.models.resnet18(zero_init_residual=True)
        encoder.fc = _mlp(2, encoder.fc.weight.shape[1], 64, 32)
        return _randomized(encoder, seed)

    base, momentum, predictor = v3_resnet(5), v3_resnet(6), _randomized(_mlp(2, 32, 64, 32), 7)
    sd = {
        **_prefixed("module.base_encoder.", base),
        **_prefixed("module.momentum_encoder.", momentum),
        **_prefixed("module.predictor.", predictor),
    }
    path = root / "mocov3_r18.pth.tar"
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "_growth_tracker": 3}
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "scaler": scaler}, path)
    made["v3_resnet"] = (path, base, len(predictor.state_dict()))

    # MoCo v3 ViT-S: timm VisionTransformer with 12 heads, head = 3-layer MLP projector
    vit = timm.create_model("vit_small_patch16_224", num_heads=12, weight_init="skip")
    vit.head = _mlp(3, 384, 64, 32)
    _randomized(vit, 8)
    predictor = _randomized(_mlp(2, 32, 64, 32, last_bn=False), 9)
    sd = {
        **_prefixed("module.base_encoder.", vit),
        **_prefixed("module.momentum_encoder.", vit, 0.5),
        **_prefixed("module.predictor.", predictor),
    }
    path = root / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, path)
    made["v3_vit"] = (path, vit, len(predictor.state_dict()))

    # main_lincls.py: the frozen backbone plus a trained 1000-class fc, module. prefix only
    lin = _randomized(torchvision.models.resnet18(), 10)
    path = root / "moco_v2_lincls.pth.tar"
    ckpt = {"epoch": 100, "arch": "resnet18", "state_dict": _prefixed("module.", lin)}
    torch.save({**ckpt, "best_acc1": torch.tensor(61.9), "optimizer": _sgd_state(lin)}, path)
    made["linear"] = (path, lin, 0)
    return made


def _load_folder(out, **kwargs):
    return timm.create_model(f"local-dir:{out}", pretrained=True, **kwargs).eval()


def _assert_same(model, expected):
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key


def test_moco_v2_mochi_checkpoint_round_trips_through_timm(files, tmp_path):
    path, q, n_k = files["v2_resnet18"]
    out = tmp_path / "resnet18_mochi.converted"
    report = convert_checkpoint(path, out, mixing=(128, 512, 256), repo_id="lab/r18")
    n_kept, n_head = _counts(q)
    assert (report.layout, report.architecture, report.kept) == ("mocov2", "resnet18", n_kept)
    assert report.dropped == {"encoder_q.fc": n_head, "encoder_k": n_k, "queue": 1, "queue_ptr": 1}
    assert n_head == 4  # fc.0 and fc.2, weight and bias
    model = _load_folder(out)
    _assert_same(model, _backbone(q))
    ref = copy.deepcopy(q)
    ref.fc = nn.Identity()  # the stock torchvision network computes the same features
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), ref.eval()(x))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["converted_from"] == path.name and "/" not in meta["converted_from"]
    assert meta["source_layout"] == "mocov2" and meta["epochs"] == "200"
    assert json.loads(meta["mixing"]) == [128, 512, 256]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm"
    assert "(128, 512, 256)" in card.text and path.name in card.text
    assert str(path.parent) not in (out / "README.md").read_text()


def test_moco_v2_resnet50_round_trip(files, tmp_path):
    path, q, n_k = files["v2_resnet50"]
    report = convert_checkpoint(path, tmp_path / "r50")
    assert (report.architecture, report.dropped["encoder_k"]) == ("resnet50", n_k)
    _assert_same(_load_folder(tmp_path / "r50"), _backbone(q))


def test_single_gpu_moco_v1_bare_state_dict_infers_the_architecture(files, tmp_path):
    path, q, n_k = files["v1"]
    report = convert_checkpoint(path, tmp_path / "v1")
    assert (report.layout, report.architecture) == ("mocov1", "resnet18")
    assert report.dropped == {"encoder_q.fc": 2, "encoder_k": n_k, "queue": 1, "queue_ptr": 1}
    _assert_same(_load_folder(tmp_path / "v1"), _backbone(q))


def test_moco_v3_resnet_drops_projector_momentum_encoder_and_predictor(files, tmp_path):
    path, base, n_pred = files["v3_resnet"]
    report = convert_checkpoint(path, tmp_path / "v3")
    n_kept, n_proj = _counts(base)
    assert (report.layout, report.architecture, report.kept) == ("mocov3", "resnet18", n_kept)
    assert report.dropped == {
        "base_encoder.fc": n_proj,
        "momentum_encoder": len(base.state_dict()),
        "predictor": n_pred,
    }
    _assert_same(_load_folder(tmp_path / "v3"), _backbone(base))
    assert "MoCo-v3" in (tmp_path / "v3" / "README.md").read_text()


def test_moco_v3_vit_small_keeps_its_twelve_heads(files, tmp_path):
    path, vit, n_pred = files["v3_vit"]
    report = convert_checkpoint(path, tmp_path / "vits")
    n_kept, n_proj = _counts(vit, "head")
    assert (report.architecture, report.model_args, report.kept) == (
        "vit_small_patch16_224", {"num_heads": 12}, n_kept
    )  # fmt: skip
    assert report.dropped == {
        "base_encoder.head": n_proj,
        "momentum_encoder": len(vit.state_dict()),
        "predictor": n_pred,
    }
    model = _load_folder(tmp_path / "vits")
    assert model.blocks[0].attn.num_heads == 12 and model.pos_embed.shape == (1, 197, 384)
    _assert_same(model, _backbone(vit, "head"))
    ref = copy.deepcopy(vit)
    ref.head = nn.Identity()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), ref.eval()(x))


def test_linear_classification_checkpoint_keeps_or_drops_the_classifier(files, tmp_path):
    path, lin, _ = files["linear"]
    dropped = convert_checkpoint(path, tmp_path / "features")
    assert (dropped.layout, dropped.dropped) == ("linear", {"fc": 2})
    _assert_same(_load_folder(tmp_path / "features"), _backbone(lin))

    kept = convert_checkpoint(path, tmp_path / "classifier", keep_classifier=True)
    assert (kept.dropped, kept.kept) == ({}, len(lin.state_dict()))
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["num_classes"] == 1000
    model = _load_folder(tmp_path / "classifier")
    _assert_same(model, dict(lin.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), lin.eval()(x))  # classifies out of the box


def test_keep_classifier_refuses_a_pretraining_checkpoint(files, tmp_path):
    with pytest.raises(ValueError, match="linear-classification"):
        convert_checkpoint(files["v2_resnet18"][0], tmp_path / "x", keep_classifier=True)
    assert not (tmp_path / "x").exists()


def test_safetensors_backbone_without_step_counters(files, tmp_path):
    _, lin, _ = files["linear"]
    path = tmp_path / "backbone.safetensors"
    counters = [k for k in _backbone(lin) if k.endswith("num_batches_tracked")]
    save_file({k: v for k, v in _backbone(lin).items() if k not in counters}, str(path))
    report = convert_checkpoint(path, tmp_path / "out")
    assert (report.layout, report.architecture, report.dropped) == ("backbone", "resnet18", {})
    assert report.kept == len(_backbone(lin)) - len(counters) and counters
    model = _load_folder(tmp_path / "out")
    expected = {**_backbone(lin), **{k: torch.tensor(0) for k in counters}}  # restarted at 0
    _assert_same(model, expected)


@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2",
     "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_384"],
)  # fmt: skip
def test_infer_architecture_from_keys_and_shapes(name):
    with torch.device("meta"):
        sd = timm.create_model(name, num_classes=0).state_dict()
    assert infer_architecture(sd) == name


class _Payload:
    """Pickles as a call to os.system: loading it unsafely would run a shell command."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_refuses_a_pickle_that_carries_code_without_running_it(tmp_path, writer):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    if writer == "torch.save":
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": _Payload(target)}, path)
    else:
        path.write_bytes(pickle.dumps({"epoch": 1, "hook": _Payload(target)}, protocol=2))
    with pytest.raises(ValueError, match="never executes pickled code") as err:
        convert_checkpoint(path, tmp_path / "out")
    assert "not a plain-tensor checkpoint" in str(err.value) and "system" in str(err.value)
    assert not target.exists() and not (tmp_path / "out").exists()
    if writer == "pickle.dump":  # the trap was armed: an unsafe load does run it
        pickle.loads(path.read_bytes())
        assert target.exists()


def test_unknown_layout_lists_keys_and_known_layouts(tmp_path):
    path = tmp_path / "other.pth"
    sd = {"encoder.layers.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)}
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="unknown checkpoint layout") as err:
        convert_checkpoint(path, tmp_path / "out")
    assert "encoder.layers.0.weight" in str(err.value)
    assert all(name in str(err.value) for name in ("mocov2", "mocov3", "linear"))


def test_wrong_arch_names_the_mismatch(files, tmp_path):
    with pytest.raises(ValueError, match="does not match architecture 'resnet18'") as err:
        convert_checkpoint(files["v2_resnet50"][0], tmp_path / "out", arch="resnet18")
    assert "layer1.0.conv3.weight" in str(err.value) and "shape" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet_9000'"):
        convert_checkpoint(files["v1"][0], tmp_path / "out", arch="resnet_9000")


# Truncated, empty, text and pickled weight files: the matrix in tests/test_bad_inputs.py.


def test_existing_output_needs_overwrite(files, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(files["v1"][0], out)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(files["v1"][0], out)
    convert_checkpoint(files["v3_resnet"][0], out, overwrite=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["source_layout"] == "mocov3"


def test_detectron2_pickle_has_moco_renaming(files, tmp_path):
    path, q, _ = files["v2_resnet50"]
    out = tmp_path / "r50_moco.pkl"
    report = convert_checkpoint(path, out, to="detectron2")
    with open(out, "rb") as f:
        blob = pickle.load(f)
    assert blob["__author__"] == "MOCO" and blob["matching_heuristics"] is True
    weights = blob["model"]
    source = {k: v for k, v in _backbone(q).items() if not k.endswith("num_batches_tracked")}
    assert len(weights) == len(source) == report.kept == 265
    assert report.dropped["num_batches_tracked"] == 53
    for name in (
        "stem.conv1.weight", "stem.conv1.norm.running_mean", "res2.0.conv1.weight",
        "res2.0.conv1.norm.weight", "res2.0.shortcut.weight", "res2.0.shortcut.norm.bias",
        "res5.2.conv3.norm.running_var",
    ):  # fmt: skip
        assert name in weights, name
    assert not any("fc" in k or "layer" in k or "bn" in k or "downsample" in k for k in weights)
    for key, value in source.items():
        array = weights[detectron2_name(key)]
        assert isinstance(array, np.ndarray) and np.array_equal(array, value.numpy()), key
    assert [p.name for p in tmp_path.iterdir()] == ["r50_moco.pkl"]  # no temp file left


def test_detectron2_refuses_a_vit(files, tmp_path):
    with pytest.raises(ValueError, match="ResNets only"):
        convert_checkpoint(files["v3_vit"][0], tmp_path / "vit.pkl", to="detectron2")
    assert not (tmp_path / "vit.pkl").exists()


def test_cli_convert_prints_the_report(files, tmp_path, capsys):
    path, q, n_k = files["v2_resnet18"]
    out = tmp_path / "cli_out"
    argv = ["convert", str(path), "--out", str(out), "--mixing", "16", "64", "32"]
    assert main([*argv, "--mixing-start-epoch", "15", "--repo-id", "lab/r18"]) == 0
    printed = capsys.readouterr().out
    assert "layout: mocov2" in printed and "architecture: resnet18" in printed
    assert f"kept {_counts(q)[0]} tensors" in printed
    assert re.search(rf"encoder_k +{n_k} +momentum encoder", printed) and "queue_ptr" in printed
    assert f"wrote {out}" in printed
    assert "warm-up 15 epochs" in (out / "README.md").read_text()


@pytest.mark.parametrize("case", ["missing", "evil", "exists", "unknown-arch"])
def test_cli_convert_errors_exit_2_with_one_line(files, tmp_path, capsys, case):
    path, out, extra = files["v1"][0], tmp_path / "out", []
    if case == "missing":
        path = tmp_path / "nope.pth.tar"
    elif case == "evil":
        path = tmp_path / "evil.pth"
        torch.save({"x": _Payload(tmp_path / "pwned")}, path)
    elif case == "exists":
        out.mkdir()
    else:
        extra = ["--arch", "resnet_9000"]
    assert main(["convert", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mochi-hub convert: ") and err.count("\n") == 1, err
    assert not (tmp_path / "pwned").exists()
