"""timm entrypoints of MoCHi-pretrained backbones: ``import mochi_hub`` registers them.

timm has no plugin discovery, so the registration happens when this module is imported (the
package imports it). Pretrained configs are named ``<arch>_mochi.<data>_<epochs>ep``; their weights
live on the Hugging Face Hub under :func:`hub_org` (``MOCHI_HUB_ORG`` in the environment, or
:func:`set_hub_org`). The architectures are timm's own ResNet and ViT, so the exported
``config.json`` names the stock architecture and loads without this package as well.
"""

from __future__ import annotations

import os
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["DEFAULT_HUB_ORG", "hub_org", "set_hub_org"]

DEFAULT_HUB_ORG = "mochi-hub"
_ORG: str | None = None
_PAPER = dict(
    paper_ids="arXiv:2010.01028",
    paper_name="Hard Negative Mixing for Contrastive Learning",
    origin_url="https://github.com/mochi-hub/mochi_hub",
)


def hub_org() -> str:
    """The Hugging Face Hub organisation holding the pretrained weights."""
    return _ORG or os.environ.get("MOCHI_HUB_ORG") or DEFAULT_HUB_ORG


def set_hub_org(org: str) -> None:
    """Point every registered pretrained config at another Hub organisation.

    Args:
        org: An organisation or user name (``my-lab``).
    """
    global _ORG
    if not org or "/" in org:
        raise ValueError(f"a Hub organisation is a single name without '/', got {org!r}")
    _ORG = org
    # timm keeps its own copies of the registered configs (and offers no setter): update both
    from timm.models import _registry

    for arch, default in default_cfgs.items():
        for tag, cfg in default.cfgs.items():
            cfg.hf_hub_id = f"{org}/{arch}.{tag}"
            registered = _registry._model_pretrained_cfgs.get(f"{arch}.{tag}")
            if registered is not None:
                registered.hf_hub_id = cfg.hf_hub_id


def _cfg(name: str, **kwargs: Any) -> dict:
    return {
        "hf_hub_id": f"{hub_org()}/{name}",
        "num_classes": 0,  # feature backbone: the linear head is the user's
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "mit",
        **_PAPER,
        **kwargs,
    }


def _resnet_cfg(name: str, **kwargs: Any) -> dict:
    return _cfg(name, **{"pool_size": (7, 7), "first_conv": "conv1", "classifier": "fc", **kwargs})


def _vit_cfg(name: str, **kwargs: Any) -> dict:
    return _cfg(
        name, first_conv="patch_embed.proj", classifier="head", interpolation="bicubic", **kwargs
    )


_NAMES = {
    "resnet50_mochi.in1k_200ep": _resnet_cfg,
    "resnet50_mochi.in1k_800ep": _resnet_cfg,
    "resnet50_mochi.in100_200ep": _resnet_cfg,
    "resnet18_mochi.cifar10": lambda n: _resnet_cfg(
        n,
        input_size=(3, 32, 32),
        pool_size=(1, 1),
        crop_pct=1.0,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),  # fmt: skip
    "vit_small_patch16_224_mochi.in1k_300ep": _vit_cfg,
    "vit_base_patch16_224_mochi.in1k_300ep": _vit_cfg,
}
default_cfgs = generate_default_cfgs({name: make(name) for name, make in _NAMES.items()})


@register_model
def resnet18_mochi(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet("resnet18_mochi", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_mochi(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet("resnet50_mochi", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_224_mochi(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 pretrained with MoCo-v3 + MoCHi (arXiv:2010.01028)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12)
    return _create_vision_transformer(
        "vit_small_patch16_224_mochi", pretrained=pretrained, **dict(model_args, **kwargs)
    )


@register_model
def vit_base_patch16_224_mochi(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 pretrained with MoCo-v3 + MoCHi (arXiv:2010.01028)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vision_transformer(
        "vit_base_patch16_224_mochi", pretrained=pretrained, **dict(model_args, **kwargs)
    )
