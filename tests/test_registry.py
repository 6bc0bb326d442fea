"""The registered ``*_mochi`` models pass the checks timm applies to its own models."""

import warnings

import pytest
import timm
import torch

import mochi_hub  # noqa: F401  (registers the entrypoints)

MODELS = [
    "resnet18_mochi",
    "resnet50_mochi",
    "vit_small_patch16_224_mochi",
    "vit_base_patch16_224_mochi",
]
PRETRAINED = {
    "resnet18_mochi.cifar10",
    "resnet50_mochi.in1k_200ep",
    "resnet50_mochi.in1k_800ep",
    "resnet50_mochi.in100_200ep",
    "vit_small_patch16_224_mochi.in1k_300ep",
    "vit_base_patch16_224_mochi.in1k_300ep",
}


def _small(name: str) -> tuple[dict, int]:
    """Keyword arguments and an input side small enough for CPU tests (ViTs take img_size)."""
    return ({"img_size": 64}, 64) if name.startswith("vit") else ({}, 64)


def test_entrypoints_and_pretrained_configs_list_cleanly():
    assert set(timm.list_models("*_mochi")) == set(MODELS)
    assert set(timm.list_pretrained("*_mochi*")) == PRETRAINED
    tagged = timm.list_models("*_mochi", pretrained=True)
    assert {n.split(".")[0] for n in tagged} == set(MODELS)
    for name in PRETRAINED:
        cfg = timm.models.get_pretrained_cfg(name)
        arch, tag = name.split(".")
        assert cfg.hf_hub_id == f"{mochi_hub.hub_org()}/{name}"
        assert cfg.num_classes == 0 and cfg.license == "mit"
        assert cfg.paper_ids == "arXiv:2010.01028"
        assert len(cfg.mean) == len(cfg.std) == 3 and cfg.input_size[0] == 3
        assert 0 < cfg.crop_pct <= 1 and cfg.interpolation in ("bilinear", "bicubic")
        assert cfg.first_conv and cfg.classifier
        assert timm.is_model(arch) and tag


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward_at_small_sizes(name):
    kwargs, side = _small(name)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs)
    x = torch.randn(2, 3, side, side)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params), "every parameter receives a gradient"
    state = dict(model.named_parameters())
    cfg = model.pretrained_cfg
    for key in (cfg["first_conv"] + ".weight", cfg["classifier"] + ".weight"):
        assert state[key].grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_is_consistent_with_the_model(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 0
    assert isinstance(model.get_classifier(), torch.nn.Identity)  # feature backbone
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        out = model(x)
    assert pooled.shape == out.shape == (1, model.num_features)
    if cfg.get("pool_size"):  # CNN: the final feature map has the configured size
        assert feats.shape[1] == model.num_features
        assert tuple(feats.shape[-2:]) == tuple(cfg["pool_size"])
    else:  # ViT: one token per patch plus the class token
        patches = (cfg["input_size"][1] // 16) ** 2
        assert feats.shape == (1, patches + 1, model.num_features)
    state = model.state_dict()
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    with_head = timm.create_model(name, num_classes=10).eval()
    assert with_head.state_dict()[cfg["classifier"] + ".weight"].shape == (10, model.num_features)
    with_head.reset_classifier(0)
    assert with_head(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_matches_feature_info(name):
    kwargs, side = _small(name)
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    info = model.feature_info
    with torch.no_grad():
        outs = model(torch.randn(1, 3, side, side))
    assert len(outs) == len(info.channels()) == len(info.reduction())
    for out, channels, reduction in zip(outs, info.channels(), info.reduction(), strict=True):
        assert out.shape[1] == channels
        assert tuple(out.shape[-2:]) == (side // reduction, side // reduction)
    if name.startswith("resnet"):
        assert info.reduction() == [2, 4, 8, 16, 32]
    picked = timm.create_model(name, features_only=True, out_indices=(1, 2), **kwargs)
    assert picked.feature_info.channels() == [info.channels()[1], info.channels()[2]]


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager(name):
    kwargs, side = _small(name)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
