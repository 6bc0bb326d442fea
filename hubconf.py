"""torch.hub entrypoints of mochi_hub: MoCHi-pretrained backbones as timm or torchvision models.

Examples::

    import torch

    # timm models with weights from the Hugging Face Hub (feature backbones unless num_classes=N)
    model = torch.hub.load("mochi-hub/mochi_hub", "resnet50_mochi", pretrained=True)
    model = torch.hub.load("mochi-hub/mochi_hub", "resnet50_mochi",
                           pretrained=True, tag="in100_200ep")
    model = torch.hub.load("mochi-hub/mochi_hub", "from_hub", "my-lab/resnet50_mochi.my_run")

    # torchvision models and their weights enum
    model = torch.hub.load("mochi-hub/mochi_hub", "resnet50_tv", weights="DEFAULT")
    weights = torch.hub.load("mochi-hub/mochi_hub", "get_model_weights", "resnet50_tv")

Only functions are public here: ``torch.hub.list`` reports every public callable as an entrypoint.
"""

from __future__ import annotations

import typing

import torch
import torchvision

import mochi_hub  # noqa: F401  (registers the *_mochi timm models and their pretrained configs)
from mochi_hub import torchvision as _mochi_tv
from mochi_hub.hub import parse_hub_ref as _parse_hub_ref
from mochi_hub.registry import create_model as _create_model

if typing.TYPE_CHECKING:  # a class imported here would be listed as an entrypoint
    from collections.abc import Callable
    from typing import Any

    from torchvision.models import WeightsEnum

dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]

_HF_HUB_PREFIX = "hf-hub:"


def _create(
    name: str, pretrained: bool, tag: str | None, kwargs: dict[str, Any]
) -> torch.nn.Module:
    return _create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)


def resnet18_mochi(
    pretrained: bool = False, tag: str | None = None, **kwargs: Any
) -> torch.nn.Module:
    """ResNet-18 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028), as a timm model.

    Args:
        pretrained: Load the weights of ``tag`` from the Hugging Face Hub (organisation
            ``MOCHI_HUB_ORG``, default ``mochi-hub``).
        tag: The pretrained config: ``cifar10`` (the default).
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``features_only``, ...).

    Returns:
        A timm ResNet: a 512-d feature backbone unless ``num_classes`` is given.
    """
    return _create("resnet18_mochi", pretrained, tag, kwargs)


def resnet50_mochi(
    pretrained: bool = False, tag: str | None = None, **kwargs: Any
) -> torch.nn.Module:
    """ResNet-50 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028), as a timm model.

    Args:
        pretrained: Load the weights of ``tag`` from the Hugging Face Hub (organisation
            ``MOCHI_HUB_ORG``, default ``mochi-hub``).
        tag: The pretrained config: ``in1k_200ep`` (the default), ``in1k_800ep`` or
            ``in100_200ep``.
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``features_only``, ...).

    Returns:
        A timm ResNet: a 2048-d feature backbone unless ``num_classes`` is given.
    """
    return _create("resnet50_mochi", pretrained, tag, kwargs)


def vit_small_patch16_224_mochi(
    pretrained: bool = False, tag: str | None = None, **kwargs: Any
) -> torch.nn.Module:
    """ViT-S/16 pretrained with MoCo-v3 + MoCHi (arXiv:2010.01028), as a timm model.

    Args:
        pretrained: Load the weights of ``tag`` from the Hugging Face Hub (organisation
            ``MOCHI_HUB_ORG``, default ``mochi-hub``).
        tag: The pretrained config: ``in1k_300ep`` (the default).
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).

    Returns:
        A timm VisionTransformer: a 384-d feature backbone unless ``num_classes`` is given.
    """
    return _create("vit_small_patch16_224_mochi", pretrained, tag, kwargs)


def vit_base_patch16_224_mochi(
    pretrained: bool = False, tag: str | None = None, **kwargs: Any
) -> torch.nn.Module:
    """ViT-B/16 pretrained with MoCo-v3 + MoCHi (arXiv:2010.01028), as a timm model.

    Args:
        pretrained: Load the weights of ``tag`` from the Hugging Face Hub (organisation
            ``MOCHI_HUB_ORG``, default ``mochi-hub``).
        tag: The pretrained config: ``in1k_300ep`` (the default).
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).

    Returns:
        A timm VisionTransformer: a 768-d feature backbone unless ``num_classes`` is given.
    """
    return _create("vit_base_patch16_224_mochi", pretrained, tag, kwargs)


def from_hub(repo_id: str, pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """Any Hugging Face Hub repository exported by mochi_hub, as a timm model.

    The repository's ``config.json`` names the stock timm architecture, so runs published under
    other names or organisations load as well.

    Args:
        repo_id: ``<org>/<name>`` (or ``hf-hub:<org>/<name>``), optionally ``@<revision>``.
        pretrained: Load the repository's ``model.safetensors``.
        **kwargs: Passed to ``timm.create_model`` (``num_classes``, ``features_only``, ...).

    Returns:
        The timm model: a feature backbone unless ``num_classes`` is given.

    Raises:
        ValueError: If ``repo_id`` or the revision is invalid, or the repository's weights are
            not a readable safetensors file or do not fit its ``config.json``.
    """
    repo_id, revision = _parse_hub_ref(repo_id)
    ref = f"{repo_id}@{revision}" if revision else repo_id
    return _create_model(_HF_HUB_PREFIX + ref, pretrained=pretrained, **kwargs)


# torchvision builders: weights= a ResNet*_MoCHi_Weights member or name, or "hf-hub:<org>/<name>"
resnet18_tv = _mochi_tv.resnet18
resnet50_tv = _mochi_tv.resnet50
_TV_BUILDERS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18_tv": resnet18_tv,
    "resnet50_tv": resnet50_tv,
}


def get_model_weights(name: str | Callable[..., Any]) -> type[WeightsEnum]:
    """The weights enum of a torchvision builder of this hubconf, as torchvision's function.

    Args:
        name: ``"resnet18_tv"``, ``"resnet50_tv"``, or a builder
            (``mochi_hub.torchvision.resnet50``).

    Returns:
        The ``WeightsEnum`` class (``ResNet50_MoCHi_Weights``): its members' ``transforms()`` and
        ``meta``.

    Raises:
        ValueError: If ``name`` is not a torchvision builder of this hubconf.
    """
    if isinstance(name, str):
        if name not in _TV_BUILDERS:
            raise ValueError(f"unknown builder {name!r}: expected one of {sorted(_TV_BUILDERS)}")
        name = _TV_BUILDERS[name]
    return torchvision.models.get_model_weights(name)
