"""torchvision-style builders and multi-weight enums for the MoCHi ResNet backbones.

``from mochi_hub.torchvision import resnet50, ResNet50_MoCHi_Weights`` gives the weights that
:mod:`mochi_hub.registry` registers for timm, as torchvision models::

    weights = ResNet50_MoCHi_Weights.DEFAULT
    model = resnet50(weights=weights).eval()  # torchvision.models.ResNet, fc = nn.Identity()
    features = model(weights.transforms()(image).unsqueeze(0))  # (1, 2048)

The published files are feature backbones (timm ``num_classes=0``, no ``fc.*`` keys) stored as
``model.safetensors`` on the Hugging Face Hub; timm's and torchvision's ResNets share their
state-dict keys, so one file serves both. The Hub repository is looked up in timm's registry each
time weights are fetched, so :func:`mochi_hub.set_hub_org` and ``MOCHI_HUB_ORG`` apply here too.
ViTs are timm-only: torchvision's ViT has other keys and no ViT-S.

This module must keep real (not string) annotations: ``torchvision.models.get_model_weights``
reads the enum off the ``weights`` annotation of a builder.
"""

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torchvision
from huggingface_hub import hf_hub_download
from huggingface_hub import utils as hf_utils
from torch import Tensor, nn
from torchvision.models import Weights, WeightsEnum
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from mochi_hub import __version__
from mochi_hub import registry as _registry  # registers the timm pretrained configs read below
from mochi_hub.convert import read_safetensors
from mochi_hub.hub import parse_hub_ref

__all__ = ["ResNet18_MoCHi_Weights", "ResNet50_MoCHi_Weights", "resnet18", "resnet50"]

HF_HUB_PREFIX = "hf-hub:"
_FILENAME = "model.safetensors"
_HEAD_KEYS = frozenset({"fc.weight", "fc.bias"})
_RECIPES = _registry._PAPER["origin_url"] + "/blob/main/recipes/"


def _url(repo: str) -> str:
    repo_id, _, revision = repo.partition("@")
    return f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{_FILENAME}"


def _weights(timm_name: str, *, num_params: int, recipe: str, docs: str) -> Weights:
    """A torchvision ``Weights`` entry derived from the registered timm pretrained config."""
    cfg = timm.models.get_pretrained_cfg(timm_name, allow_unregistered=False)
    crop = cfg.input_size[-1]
    transforms = partial(
        ImageClassification,
        crop_size=crop,
        resize_size=math.floor(crop / cfg.crop_pct),  # as timm's eval transform
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=InterpolationMode(cfg.interpolation),
    )
    meta = {
        "timm_name": timm_name,
        "hf_hub_id": cfg.hf_hub_id,  # at import; the ``meta`` property gives the current one
        "num_params": num_params,
        "min_size": (1, 1),
        "categories": None,  # a feature backbone: the classifier is the user's
        "recipe": _RECIPES + recipe,
        "paper": f"{cfg.paper_name} ({cfg.paper_ids})",
        "license": cfg.license,
        "_metrics": {},
        "_docs": docs,
    }
    return Weights(url=_url(cfg.hf_hub_id), transforms=transforms, meta=meta)


class _MoCHiWeightsEnum(WeightsEnum):
    """A ``WeightsEnum`` whose members are safetensors files on the Hugging Face Hub.

    ``url``, ``meta["hf_hub_id"]`` and :meth:`get_state_dict` follow the Hub organisation current
    at the time of the call (:func:`mochi_hub.set_hub_org`, ``MOCHI_HUB_ORG``).
    """

    @property
    def timm_name(self) -> str:
        """The timm model name of these weights (``resnet50_mochi.in1k_200ep``)."""
        return self.value.meta["timm_name"]

    @property
    def hf_hub_id(self) -> str:
        """The Hub repository holding ``model.safetensors``, as the timm registry has it now."""
        return timm.models.get_pretrained_cfg(self.timm_name, allow_unregistered=False).hf_hub_id

    @property
    def url(self) -> str:
        """The download address of ``model.safetensors`` in the current Hub repository."""
        return _url(self.hf_hub_id)

    @property
    def meta(self) -> dict[str, Any]:
        """The meta-data of torchvision's ``Weights``, with the current ``hf_hub_id``."""
        return {**self.value.meta, "hf_hub_id": self.hf_hub_id}

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Download ``model.safetensors`` with huggingface_hub and load it (never pickle).

        Args:
            *args: Accepted for torchvision's signature; ignored.
            **kwargs: ``progress`` (bool) shows the download bar; others (``check_hash``) are
                ignored: the Hub checks the file's hash itself.

        Returns:
            The backbone's state dict (no ``fc.*`` keys).

        Raises:
            ValueError: If the file is not a readable safetensors file.
        """
        repo = self.hf_hub_id
        return _read_state(_fetch(repo, kwargs.get("progress", True)), f"hf-hub:{repo}")[0]


class ResNet50_MoCHi_Weights(_MoCHiWeightsEnum):
    """ResNet-50 backbones pretrained with MoCo-v2 + MoCHi (feature extractors, 2048-d)."""

    IN1K_200EP = _weights(
        "resnet50_mochi.in1k_200ep",
        num_params=23508032,
        recipe="in1k_resnet50_mochi_1024_512_256_ep200.yaml",
        docs="ResNet-50 pretrained on ImageNet-1k for 200 epochs with MoCo-v2 and MoCHi hard "
        "negative mixing. A feature backbone: ``fc`` is ``nn.Identity()`` unless ``num_classes`` "
        "is given; evaluate with a linear probe or k-NN.",
    )
    IN1K_800EP = _weights(
        "resnet50_mochi.in1k_800ep",
        num_params=23508032,
        recipe="in1k_resnet50_mochi_1024_512_256_ep800.yaml",
        docs="ResNet-50 pretrained on ImageNet-1k for 800 epochs with MoCo-v2 and MoCHi hard "
        "negative mixing. A feature backbone: ``fc`` is ``nn.Identity()`` unless ``num_classes`` "
        "is given; evaluate with a linear probe or k-NN.",
    )
    IN100_200EP = _weights(
        "resnet50_mochi.in100_200ep",
        num_params=23508032,
        recipe="in100_resnet50_mochi_1024_512_256_ep200.yaml",
        docs="ResNet-50 pretrained on ImageNet-100 for 200 epochs with MoCo-v2 and MoCHi hard "
        "negative mixing. A feature backbone: ``fc`` is ``nn.Identity()`` unless ``num_classes`` "
        "is given; evaluate with a linear probe or k-NN.",
    )
    DEFAULT = IN1K_200EP


class ResNet18_MoCHi_Weights(_MoCHiWeightsEnum):
    """ResNet-18 backbones pretrained with MoCo-v2 + MoCHi (feature extractors, 512-d)."""

    CIFAR10 = _weights(
        "resnet18_mochi.cifar10",
        num_params=11176512,
        recipe="cifar10_resnet18_mochi.yaml",
        docs="ResNet-18 pretrained on CIFAR-10 (32 px) with MoCo-v2 and MoCHi hard negative "
        "mixing. A feature backbone: ``fc`` is ``nn.Identity()`` unless ``num_classes`` is given.",
    )
    DEFAULT = CIFAR10


def _fetch(repo: str, progress: bool = True) -> str:
    """The local path of ``model.safetensors`` in Hub repository ``org/name[@revision]``."""
    repo_id, revision = parse_hub_ref(repo)
    kwargs: dict[str, Any] = {}
    silent = getattr(hf_utils, "silent_tqdm", None)  # absent from old huggingface_hub
    if not progress and silent and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = silent
    return hf_hub_download(
        repo_id,
        _FILENAME,
        revision=revision or None,
        library_name="mochi_hub",
        library_version=__version__,
        **kwargs,
    )


def _read_state(path: str, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors and its metadata (``{}`` when it has none).

    Raises:
        ValueError: If it is not a readable safetensors file; the message names ``source``.
    """
    try:
        return read_safetensors(path)
    except ValueError as e:
        raise ValueError(f"cannot load the weights of {source}: {e}") from e


def _resolve(
    enum: type[_MoCHiWeightsEnum], weights: Any
) -> tuple[_MoCHiWeightsEnum | None, str | None]:
    """``weights`` as (member, None), (None, ``org/name``) for ``hf-hub:`` or (None, None)."""
    if weights is None:
        return None, None
    if isinstance(weights, str) and weights.startswith(HF_HUB_PREFIX):
        try:
            parse_hub_ref(weights)
        except ValueError as e:
            raise ValueError(f"{e} (expected 'hf-hub:<org>/<name>[@revision]')") from None
        return None, weights[len(HF_HUB_PREFIX) :]
    try:
        return enum.verify(weights), None
    except KeyError:
        names = ", ".join(enum.__members__)
        raise ValueError(
            f"unknown weights {weights!r}: expected one of {names}, a {enum.__name__} member, "
            f"or 'hf-hub:<org>/<name>'"
        ) from None


def _check_and_load(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    allow_missing: frozenset[str],
    source: str,
    arch: str,
    metadata: dict[str, str],
) -> None:
    """Load ``state`` into ``model``; any key or shape difference besides ``allow_missing`` raises.

    timm and torchvision ResNets share their state-dict keys (``conv1``, ``bn1``, ``layerN.M.*``,
    ``downsample.0/1``), so a timm export loads without renaming; this check is where a file of
    another architecture (or a timm variant such as ``resnet50d``) is caught.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in allow_missing]
    unexpected = sorted(k for k in state if k not in own)
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        said = metadata.get("architecture")
        origin = f" (the file was exported from {said!r})" if said else ""
        problems = [
            f"{len(items)} {what}: {items[:6]}{' ...' if len(items) > 6 else ''}"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise ValueError(
            f"the weights of {source}{origin} do not fit torchvision's {arch}: "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=not allow_missing)


def _build(
    builder: Callable[..., torchvision.models.ResNet],
    enum: type[_MoCHiWeightsEnum],
    weights: Any,
    progress: bool,
    kwargs: dict[str, Any],
) -> torchvision.models.ResNet:
    member, repo = _resolve(enum, weights)
    num_classes = kwargs.pop("num_classes", None)
    if num_classes:  # a fresh classifier, initialised by torchvision's ResNet
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    else:
        model = builder(weights=None, **kwargs)
        model.fc = nn.Identity()  # the published backbones have no classifier
    if member is None and repo is None:
        return model
    if member is not None:
        repo = member.hf_hub_id
        source = f"{enum.__name__}.{member.name} (hf-hub:{repo})"
    else:
        source = f"hf-hub:{repo}"
    state, metadata = _read_state(_fetch(repo, progress), source)
    _check_and_load(
        model,
        state,
        allow_missing=_HEAD_KEYS if num_classes else frozenset(),
        source=source,
        arch=builder.__name__,
        metadata=metadata,
    )
    return model


def resnet50(
    *, weights: ResNet50_MoCHi_Weights | None = None, progress: bool = True, **kwargs: Any
) -> torchvision.models.ResNet:
    """ResNet-50 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028), as a torchvision model.

    The model is ``torchvision.models.resnet50`` with ``fc = nn.Identity()``: it returns the
    2048-d pooled features. Pass ``num_classes`` for a freshly initialised linear classifier on
    top of the pretrained backbone.

    Args:
        weights: A :class:`ResNet50_MoCHi_Weights` member, its name (``"IN1K_200EP"``,
            ``"ResNet50_MoCHi_Weights.DEFAULT"``), ``"hf-hub:<org>/<name>"`` for any ResNet-50
            exported by mochi_hub, or None for random weights.
        progress: Show the download progress bar.
        **kwargs: Passed to ``torchvision.models.resnet50`` (``num_classes``,
            ``zero_init_residual``, ``norm_layer``, ...).

    Returns:
        A ``torchvision.models.ResNet`` (in training mode, as torchvision returns it).

    Raises:
        ValueError: If ``weights`` is unknown or an invalid Hub reference, the file is not a
            readable safetensors file, or it does not fit the model (the message names the
            missing, unexpected and mis-shaped keys).
    """
    return _build(torchvision.models.resnet50, ResNet50_MoCHi_Weights, weights, progress, kwargs)


def resnet18(
    *, weights: ResNet18_MoCHi_Weights | None = None, progress: bool = True, **kwargs: Any
) -> torchvision.models.ResNet:
    """ResNet-18 pretrained with MoCo-v2 + MoCHi (arXiv:2010.01028), as a torchvision model.

    The model is ``torchvision.models.resnet18`` with ``fc = nn.Identity()``: it returns the
    512-d pooled features. Pass ``num_classes`` for a freshly initialised linear classifier on
    top of the pretrained backbone.

    Args:
        weights: A :class:`ResNet18_MoCHi_Weights` member, its name (``"CIFAR10"``,
            ``"ResNet18_MoCHi_Weights.DEFAULT"``), ``"hf-hub:<org>/<name>"`` for any ResNet-18
            exported by mochi_hub, or None for random weights.
        progress: Show the download progress bar.
        **kwargs: Passed to ``torchvision.models.resnet18`` (``num_classes``, ...).

    Returns:
        A ``torchvision.models.ResNet`` (in training mode, as torchvision returns it).

    Raises:
        ValueError: If ``weights`` is unknown or an invalid Hub reference, the file is not a
            readable safetensors file, or it does not fit the model (the message names the
            missing, unexpected and mis-shaped keys).
    """
    return _build(torchvision.models.resnet18, ResNet18_MoCHi_Weights, weights, progress, kwargs)
