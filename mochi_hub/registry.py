"""timm entrypoints of MoCHi-pretrained backbones: ``import mochi_hub`` registers them.

timm has no plugin discovery, so the registration happens when this module is imported (the
package imports it). Pretrained configs are named ``<arch>_mochi.<data>_<epochs>ep``; their weights
live on the Hugging Face Hub under :func:`hub_org` (``MOCHI_HUB_ORG`` in the environment, or
:func:`set_hub_org`). The architectures are timm's own ResNet and ViT, so the exported
``config.json`` names the stock architecture and loads without this package as well.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["DEFAULT_HUB_ORG", "create_model", "hub_org", "set_hub_org"]

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

    Raises:
        ValueError: If ``org`` is not a valid Hub user or organisation name.
    """
    global _ORG
    if not isinstance(org, str) or not org or "/" in org:
        raise ValueError(f"a Hub organisation is a single name without '/', got {org!r}")
    from mochi_hub.hub import check_repo_id

    try:
        check_repo_id(f"{org}/model")
    except ValueError as e:
        raise ValueError(f"invalid Hub organisation {org!r}: {e}") from None
    _ORG = org
    # timm keeps its own copies of the registered configs (and offers no setter): update both
    from timm.models import _registry

    for arch, default in default_cfgs.items():
        for tag, cfg in default.cfgs.items():
            cfg.hf_hub_id = f"{org}/{arch}.{tag}"
            registered = _registry._model_pretrained_cfgs.get(f"{arch}.{tag}")
            if registered is not None:
                registered.hf_hub_id = cfg.hf_hub_id


def _weights_file(name: str) -> str | None:
    """The local ``model.safetensors`` timm reads for ``name``, where it can be told."""
    from huggingface_hub import try_to_load_from_cache

    from mochi_hub.hub import HF_HUB_PREFIXES, parse_hub_ref

    if name.startswith("local-dir:"):
        return os.path.join(name.removeprefix("local-dir:"), "model.safetensors")
    if name.startswith(HF_HUB_PREFIXES):
        repo_id, revision = parse_hub_ref(name)
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        if cfg is None or not cfg.hf_hub_id:
            return None
        repo_id, revision = cfg.hf_hub_id, None
    found = try_to_load_from_cache(repo_id, "model.safetensors", revision=revision)
    return found if isinstance(found, str) else None


def _unreadable(name: str, error: Exception, directory: bool = False) -> ValueError:
    """The ValueError for weights of ``name`` that safetensors could not read."""
    from mochi_hub.convert import read_safetensors

    try:
        path = _weights_file(name)
    except Exception:  # the path only words the message
        path = None
    if path is not None and os.path.lexists(path):
        try:
            read_safetensors(path)
        except ValueError as e:  # names the file and what it holds
            return ValueError(f"cannot load the weights of {name!r}: {e}")
    detail = " ".join(str(error).split())
    if directory:
        return ValueError(
            f"cannot load the weights of {name!r}: its model.safetensors is a directory, not a "
            f"safetensors weights file ({detail})"
        )
    return ValueError(
        f"cannot load the weights of {name!r}: not a valid safetensors file (empty, truncated, "
        f"a pickle or another format): {detail}"
    )


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """``timm.create_model``, with errors that name the problem for bad Hub ids and weights.

    An ``hf-hub:`` name is checked first (:func:`mochi_hub.hub.parse_hub_ref`). A weights file
    that safetensors cannot read (empty, truncated, a pickle or text under a ``.safetensors``
    name, a directory) and weights that do not fit the architecture are reported as ValueError
    naming the model, instead of the errors safetensors and torch raise deep inside timm.

    Args:
        name: A timm model name, ``hf-hub:<org>/<name>[@revision]`` or ``local-dir:<path>``.
        pretrained: Load the pretrained weights.
        **kwargs: Passed to ``timm.create_model``.

    Returns:
        The model.

    Raises:
        ValueError: For an invalid Hub reference, or unreadable or unfitting weights.
    """
    import timm
    from safetensors import SafetensorError

    from mochi_hub.hub import HF_HUB_PREFIXES, parse_hub_ref

    if name.startswith(HF_HUB_PREFIXES):
        parse_hub_ref(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except SafetensorError as e:
        raise _unreadable(name, e) from e
    except OSError as e:
        codes = (errno.ENODEV, errno.EISDIR)  # safetensors opening a directory (a Rust error)
        if e.errno not in codes and not any(f"(os error {c})" in str(e) for c in codes):
            raise
        raise _unreadable(name, e, directory=True) from e
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        # torch lists every key: keep the start of each section (missing, unexpected, sizes)
        parts = [" ".join(p.split()) for p in str(e).split("\n\t")[1:]]
        shown = [p if len(p) <= 300 else p[:300] + " ..." for p in parts[:6]]
        more = f"; and {len(parts) - 6} more" if len(parts) > 6 else ""
        args = f" {kwargs}" if kwargs else ""
        raise ValueError(
            f"the weights of {name!r} do not fit the architecture{args}: " + "; ".join(shown) + more
        ) from e


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
