"""Two-view (contrastive) and evaluation image transforms on the torchvision v2 uint8 path.

Every image is decoded and converted to RGB once, turned into a uint8 CHW tensor, cropped,
resized and colour-augmented while still uint8, and converted to float32 only at the end,
right before ``Normalize``. Presets follow MoCo-v2 ``--aug-plus`` (both views alike) and
MoCo-v3 / BYOL (asymmetric views); the ``*_small`` presets are their 32-px variants without
Gaussian blur (as in the SimCLR / MoCo CIFAR set-ups).

All callables here are plain classes (no closures), so they pickle into DataLoader workers
under every start method.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "SeparableGaussianBlur",
    "EvalBatchTransform",
    "EvalTransform",
    "TwoViewBatchTransform",
    "TwoViewTransform",
    "ViewAugmentation",
    "blur_kernel_size",
    "eval_batch_transform",
    "eval_transform",
    "gaussian_blur_matrix",
    "to_rgb",
    "to_uint8_rgb_tensor",
    "two_view_batch_transform",
    "two_view_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS: Mapping[str, v2.InterpolationMode] = MappingProxyType(
    {
        "nearest": v2.InterpolationMode.NEAREST,
        "bilinear": v2.InterpolationMode.BILINEAR,
        "bicubic": v2.InterpolationMode.BICUBIC,
    }
)
_SOLARIZE_THRESHOLD_UINT8 = 128  # PIL ImageOps.solarize default, as in MoCo-v3 / BYOL
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_I16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


# --------------------------------------------------------------------------- image decoding


def _scale_to_uint8(values: np.ndarray, *, unit_range: bool) -> np.ndarray:
    """Map a 2-D integer or float array to uint8 with a documented heuristic.

    Args:
        values: Pixel values, shape (H, W).
        unit_range: Treat values in [0, 1] as the full range (float images).

    Returns:
        uint8 array of shape (H, W).
    """
    v = values.astype(np.float64)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if unit_range and lo >= 0.0 and hi <= 1.0:
        v = v * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif lo >= 0.0 and hi <= 65535.0:
        v = v / 257.0  # 16-bit range
    else:
        v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    * RGB is returned unchanged.
    * Modes with transparency (RGBA, LA, PA, premultiplied RGBa/La, and P or L/RGB images with
      a ``transparency`` entry) are alpha-composited onto a white background.
    * 16-bit greyscale (``I;16*``) keeps its full range (value / 257) instead of PIL's clipping
      at 255; 32-bit ``I`` and float ``F`` images are scaled by a range heuristic (0..1 floats
      are scaled by 255, values up to 255 are kept, up to 65535 divided by 257, anything else
      min-max normalised).
    * Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV, ...) uses ``Image.convert("RGB")``.

    Args:
        img: Any PIL image (size W x H, possibly 1 x 1).

    Returns:
        A PIL image of mode RGB and the same size.

    Raises:
        TypeError: If ``img`` is not a PIL image.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"to_rgb expects a PIL.Image.Image, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _I16_MODES or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(img), unit_range=mode == "F")
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        if mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(value: Any) -> Image.Image | Tensor:
    """Turn one data set cell into a PIL image or a tensor.

    Accepts a PIL image, a tensor, a NumPy array (H, W) / (H, W, C), or the undecoded
    ``datasets.Image(decode=False)`` form ``{"bytes": ..., "path": ...}``.
    """
    if isinstance(value, (Image.Image, Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path") is not None:
            img = Image.open(value["path"])
        else:
            raise ValueError("image entry has neither 'bytes' nor 'path'")
        img.load()
        return img
    raise TypeError(
        "expected a PIL image, a uint8 tensor, a NumPy array or a {'bytes', 'path'} dict, "
        f"got {type(value).__name__}"
    )


def to_uint8_rgb_tensor(image: Image.Image | Tensor) -> Tensor:
    """Convert a PIL image (any mode) or a uint8 CHW tensor to a uint8 RGB tensor.

    Args:
        image: A PIL image, or a uint8 tensor of shape (C, H, W) with C in {1, 3} (a single
            channel is replicated to three).

    Returns:
        A ``torchvision.tv_tensors.Image`` of dtype uint8 and shape (3, H, W).

    Raises:
        ValueError: If a tensor is not uint8 or not of shape (1 | 3, H, W).
        TypeError: If ``image`` is neither a PIL image nor a tensor.
    """
    if isinstance(image, Image.Image):
        return v2.functional.to_image(to_rgb(image))
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image tensors must be uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensors must have shape (1 | 3, H, W), got {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return v2.functional.to_image(image)


# --------------------------------------------------------------------------- augmentations


def blur_kernel_size(size: int) -> int:
    """Gaussian blur kernel size for an output side ``size``: odd, about 10% of it, >= 3.

    Args:
        size: Output image side length.

    Returns:
        The kernel size (e.g. 3 for 32 px, 23 for 224 px).
    """
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _reflect(index: Tensor, n: int) -> Tensor:
    """Map integer positions onto [0, n) by mirror reflection (edge not repeated, any range)."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index > n - 1, period - index, index)


def gaussian_blur_matrix(
    n: int, kernel_size: int, sigma: float, *, device: torch.device | None = None
) -> Tensor:
    """The (n, n) matrix of a 1-D Gaussian blur with reflection padding.

    Row i holds the weights with which input samples contribute to output sample i; the
    kernel is torchvision's (``linspace(-r, r, kernel_size)``, normalised), and reflection is
    torch's ``"reflect"`` padding, extended to kernels wider than the signal.

    Args:
        n: Signal length.
        kernel_size: Odd kernel size k.
        sigma: Standard deviation in samples (> 0).
        device: Device of the result.

    Returns:
        float32 tensor of shape (n, n) whose rows sum to 1.
    """
    r = kernel_size // 2
    x = torch.linspace(-r, r, kernel_size, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = w / w.sum()  # (k,)
    rows = torch.arange(n, device=device)[:, None].expand(n, kernel_size)  # (n, k)
    cols = _reflect(rows + torch.arange(kernel_size, device=device) - r, n)  # (n, k)
    m = torch.zeros(n, n, device=device)
    return m.index_put_((rows, cols), w.expand(n, kernel_size), accumulate=True)


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` computed as two small matrix products (same result up to rounding).

    torchvision convolves with the full k x k kernel through a depthwise convolution, which is
    slow on CPU for the 23 x 23 kernel of 224-px images (~11 ms); blurring rows and columns
    with reflect-padded banded matrices (``B_h @ img @ B_w.T``) takes ~2 ms and matches it
    to +-1 on uint8. Arguments, sampling of sigma and non-tensor inputs are those of
    ``v2.GaussianBlur``.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Blur an image tensor (..., C, H, W) (uint8 or float); defer anything else.

        Args:
            inpt: The input (a ``tv_tensors.Image`` or plain tensor is blurred here).
            params: ``{"sigma": [sigma_x, sigma_y]}`` from ``make_params``.

        Returns:
            The blurred image, same type, shape and dtype.
        """
        is_image = isinstance(inpt, tv_tensors.Image) or type(inpt) is Tensor
        if not is_image or inpt.ndim < 3 or inpt.numel() == 0:
            return super().transform(inpt, params)  # PIL, videos, masks, boxes, ...
        sigma_x, sigma_y = params["sigma"]
        k_x, k_y = self.kernel_size
        h, w = inpt.shape[-2:]
        fp = torch.is_floating_point(inpt)
        x = inpt.as_subclass(Tensor)
        x = x if fp else x.to(torch.float32)
        b_h = gaussian_blur_matrix(h, k_y, sigma_y, device=x.device).to(x.dtype)  # (H, H)
        b_w = gaussian_blur_matrix(w, k_x, sigma_x, device=x.device).to(x.dtype)  # (W, W)
        out = b_h @ x @ b_w.T  # (..., C, H, W)
        if not fp:
            out = out.round_().clamp_(0, 255).to(inpt.dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def _check_pair(name: str, pair: tuple[float, float], *, low: float, high: float) -> None:
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(
            f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {pair}"
        )


def _random_apply(transform: v2.Transform, p: float) -> list[v2.Transform]:
    """``transform`` wrapped to run with probability ``p`` ([] if p == 0, bare if p == 1)."""
    if p == 0.0:
        return []
    if p == 1.0:
        return [transform]
    return [v2.RandomApply([transform], p=p)]


@dataclasses.dataclass(frozen=True)
class ViewAugmentation:
    """The augmentation parameters of one view of a contrastive pair.

    The pipeline built by :meth:`build` runs, in this order and on uint8 tensors:
    RandomResizedCrop(size, crop_scale) -> ColorJitter(jitter) w.p. jitter_p ->
    RandomGrayscale(grayscale_p) -> GaussianBlur(kernel ~10% of size, blur_sigma) w.p. blur_p
    (as :class:`SeparableGaussianBlur`)
    -> RandomSolarize(128) w.p. solarize_p -> RandomHorizontalFlip(hflip_p), then
    float32 in [0, 1] and Normalize(mean, std). Steps with probability 0 are left out.

    Attributes:
        size: Output side length S.
        crop_scale: (min, max) area fraction of RandomResizedCrop, 0 < min <= max <= 1.
        jitter: ColorJitter (brightness, contrast, saturation, hue); hue <= 0.5.
        jitter_p: Probability of applying the colour jitter.
        grayscale_p: Probability of converting to (3-channel) greyscale.
        blur_p: Probability of the Gaussian blur.
        blur_sigma: (min, max) of the blur's standard deviation, in pixels.
        solarize_p: Probability of solarisation (threshold 128 on uint8).
        hflip_p: Probability of a horizontal flip.
        mean: Per-channel Normalize mean (3 values, for [0, 1] images).
        std: Per-channel Normalize std (3 positive values).
        interpolation: Resize interpolation: "nearest", "bilinear" or "bicubic".
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    hflip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so instances stay hashable and comparable.
        for name in ("crop_scale", "jitter", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        _check_pair("crop_scale", self.crop_scale, low=0.0, high=1.0)
        if self.crop_scale[0] <= 0.0:
            raise ValueError(f"crop_scale min must be > 0, got {self.crop_scale}")
        if len(self.jitter) != 4 or min(self.jitter) < 0.0 or self.jitter[3] > 0.5:
            raise ValueError(
                "jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                f"got {self.jitter}"
            )
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "hflip_p"):
            _check_prob(name, getattr(self, name))
        _check_pair("blur_sigma", self.blur_sigma, low=0.0, high=float("inf"))
        if self.blur_sigma[0] <= 0.0:
            raise ValueError(f"blur_sigma min must be > 0, got {self.blur_sigma}")
        if len(self.mean) != 3:
            raise ValueError(f"mean must have 3 values, got {self.mean}")
        if len(self.std) != 3 or min(self.std) <= 0.0:
            raise ValueError(f"std must have 3 positive values, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )

    def build(self) -> v2.Compose:
        """Build this view's pipeline.

        Returns:
            A ``v2.Compose`` mapping an RGB PIL image or a uint8 (3, H, W) tensor to a float32
            (3, size, size) normalised image. Convert other PIL modes with :func:`to_rgb`
            first (:class:`TwoViewTransform` does).
        """
        b, c, s, h = self.jitter
        steps: list[v2.Transform] = [
            v2.ToImage(),
            v2.RandomResizedCrop(
                self.size,
                scale=self.crop_scale,
                interpolation=_INTERPOLATIONS[self.interpolation],
                antialias=True,
            ),
        ]
        if any(self.jitter):
            steps += _random_apply(
                v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h), self.jitter_p
            )
        if self.grayscale_p > 0.0:
            steps.append(v2.RandomGrayscale(p=self.grayscale_p))
        steps += _random_apply(
            SeparableGaussianBlur(kernel_size=blur_kernel_size(self.size), sigma=self.blur_sigma),
            self.blur_p,
        )
        if self.solarize_p > 0.0:
            steps.append(v2.RandomSolarize(threshold=_SOLARIZE_THRESHOLD_UINT8, p=self.solarize_p))
        if self.hflip_p > 0.0:
            steps.append(v2.RandomHorizontalFlip(p=self.hflip_p))
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ]
        return v2.Compose(steps)


_MOCOV2 = ViewAugmentation(
    crop_scale=(0.2, 1.0),
    jitter=(0.4, 0.4, 0.4, 0.1),
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    hflip_p=0.5,
)
_MOCOV3_1 = ViewAugmentation(
    crop_scale=(0.08, 1.0),
    jitter=(0.4, 0.4, 0.2, 0.1),
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=1.0,
    blur_sigma=(0.1, 2.0),
    solarize_p=0.0,
    hflip_p=0.5,
)
_MOCOV3_2 = dataclasses.replace(_MOCOV3_1, blur_p=0.1, solarize_p=0.2)

PRESETS: Mapping[str, tuple[ViewAugmentation, ViewAugmentation]] = MappingProxyType(
    {
        "mocov2": (_MOCOV2, _MOCOV2),
        "mocov3": (_MOCOV3_1, _MOCOV3_2),
        "mocov2_small": (
            dataclasses.replace(_MOCOV2, crop_scale=(0.2, 1.0), blur_p=0.0),
            dataclasses.replace(_MOCOV2, crop_scale=(0.2, 1.0), blur_p=0.0),
        ),
        "mocov3_small": (
            dataclasses.replace(_MOCOV3_1, crop_scale=(0.2, 1.0), blur_p=0.0),
            dataclasses.replace(_MOCOV3_2, crop_scale=(0.2, 1.0), blur_p=0.0),
        ),
    }
)
"""Named two-view presets (view 1, view 2), defined at size 224 with ImageNet statistics;
:func:`two_view_transform` sets the size, mean and std."""

_OVERRIDABLE = tuple(
    f.name for f in dataclasses.fields(ViewAugmentation) if f.name not in ("size", "mean", "std")
)


class TwoViewTransform:
    """Apply two view augmentations to one image: the query/key pair of contrastive learning.

    The image is converted to a uint8 RGB tensor once (any PIL mode, see :func:`to_rgb`),
    then each view's pipeline runs on it independently.

    Args:
        view1: Parameters of the first view.
        view2: Parameters of the second view.
    """

    def __init__(self, view1: ViewAugmentation, view2: ViewAugmentation) -> None:
        if view1.size != view2.size:
            raise ValueError(f"both views must have the same size, got {view1.size}, {view2.size}")
        self.view1 = view1
        self.view2 = view2
        self._t1 = view1.build()
        self._t2 = view2.build()

    @property
    def size(self) -> int:
        """Output side length S of both views."""
        return self.view1.size

    def __call__(self, image: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        """Augment ``image`` twice.

        Args:
            image: A PIL image (any mode) or a uint8 tensor (1 | 3, H, W).

        Returns:
            Two float32 tensors of shape (3, S, S), normalised.
        """
        x = to_uint8_rgb_tensor(image)
        return (
            self._t1(x).as_subclass(torch.Tensor),
            self._t2(x).as_subclass(torch.Tensor),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(view1={self.view1!r}, view2={self.view2!r})"


def two_view_transform(
    preset: str,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **overrides: Any,
) -> TwoViewTransform:
    """Build a named two-view augmentation.

    Args:
        preset: One of ``PRESETS``: "mocov2", "mocov3", "mocov2_small", "mocov3_small".
        image_size: Output side length S of both views.
        mean: Normalize mean (3 values).
        std: Normalize std (3 values).
        **overrides: :class:`ViewAugmentation` fields replaced in *both* views, e.g.
            ``hflip_p=0.0`` or ``crop_scale=(0.3, 1.0)``.

    Returns:
        A :class:`TwoViewTransform` producing two float32 (3, S, S) tensors.

    Raises:
        ValueError: For an unknown preset or override key (the message lists the valid ones),
            or an invalid value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown}; valid overrides: {list(_OVERRIDABLE)} "
            "(set the size with image_size= and the statistics with mean= / std=)"
        )
    fields = dict(size=image_size, mean=tuple(mean), std=tuple(std), **overrides)
    v1, v2_ = (dataclasses.replace(view, **fields) for view in PRESETS[preset])
    return TwoViewTransform(v1, v2_)


# --------------------------------------------------------------------------- evaluation


class EvalTransform:
    """Deterministic evaluation transform: Resize(S / crop_pct) + CenterCrop(S) + Normalize.

    Runs on the same uint8 path as the training views. Prefer :func:`eval_transform`.

    Args:
        image_size: Output side length S.
        mean: Normalize mean (3 values).
        std: Normalize std (3 positive values).
        crop_pct: Fraction of the resized shorter side kept by the centre crop, in (0, 1].
        interpolation: "nearest", "bilinear" or "bicubic".
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_pct: float = 0.875,
        interpolation: str = "bilinear",
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must have 3 values (std > 0), got {mean}, {std}")
        self.image_size = image_size
        self.crop_pct = float(crop_pct)
        self.resize_size = int(image_size / crop_pct)
        self._t = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(
                    self.resize_size,
                    interpolation=_INTERPOLATIONS[interpolation],
                    antialias=True,
                ),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
            ]
        )

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """Transform one image.

        Args:
            image: A PIL image (any mode) or a uint8 tensor (1 | 3, H, W).

        Returns:
            A float32 tensor of shape (3, S, S), normalised.
        """
        return self._t(to_uint8_rgb_tensor(image)).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._t!r})"


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> EvalTransform:
    """Build the deterministic evaluation transform (timm-style ``crop_pct``).

    The shorter side is resized to ``int(image_size / crop_pct)`` and the centre
    ``image_size`` square is kept. With ``crop_pct=1.0`` an image that is already
    ``image_size`` x ``image_size`` (e.g. the digits) keeps its size.

    Args:
        image_size: Output side length S.
        mean: Normalize mean (3 values).
        std: Normalize std (3 positive values).
        crop_pct: Centre-crop fraction in (0, 1].
        interpolation: "nearest", "bilinear" or "bicubic".

    Returns:
        A callable mapping a PIL image (any mode) or a uint8 (1 | 3, H, W) tensor to a float32
        (3, S, S) tensor.
    """
    return EvalTransform(
        image_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation
    )


# --------------------------------------------------------------------------- datasets glue


def _column(batch: Mapping[str, Any], name: str) -> Any:
    """``batch[name]``, or a ValueError naming the column and listing the available ones."""
    if name not in batch:
        raise ValueError(f"column {name!r} not in the batch; available columns: {list(batch)}")
    return batch[name]


class TwoViewBatchTransform:
    """Batch transform for ``datasets.Dataset.with_transform`` producing two views per image.

    Prefer :func:`two_view_batch_transform`.

    Args:
        transform: The per-image two-view transform.
        image_column: Name of the image column (PIL images, uint8 tensors, or undecoded
            ``{"bytes", "path"}`` dicts).
        label_column: Name of the label column to pass through, or None for none.
    """

    def __init__(
        self,
        transform: Callable[[Any], tuple[Tensor, Tensor]],
        image_column: str = "image",
        label_column: str | None = "label",
    ) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Map a batch dict of lists to ``{"view1": [...], "view2": [...], "label": [...]}``.

        Each view entry is a float32 (3, S, S) tensor; "label" is present only when
        ``label_column`` is set.
        """
        images = _column(batch, self.image_column)
        labels = _column(batch, self.label_column) if self.label_column is not None else None
        pairs = [self.transform(_decode(img)) for img in images]
        out: dict[str, list[Any]] = {
            "view1": [p[0] for p in pairs],
            "view2": [p[1] for p in pairs],
        }
        if labels is not None:
            out["label"] = list(labels)
        return out


class EvalBatchTransform:
    """Batch transform for ``datasets.Dataset.with_transform`` producing one eval image.

    Prefer :func:`eval_batch_transform`.

    Args:
        transform: The per-image evaluation transform.
        image_column: Name of the image column.
        label_column: Name of the label column to pass through, or None for none.
    """

    def __init__(
        self,
        transform: Callable[[Any], Tensor],
        image_column: str = "image",
        label_column: str | None = "label",
    ) -> None:
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """Map a batch dict of lists to ``{"image": [...], "label": [...]}``.

        Each image is a float32 (3, S, S) tensor; "label" is present only when
        ``label_column`` is set.
        """
        images = _column(batch, self.image_column)
        labels = _column(batch, self.label_column) if self.label_column is not None else None
        out: dict[str, list[Any]] = {"image": [self.transform(_decode(img)) for img in images]}
        if labels is not None:
            out["label"] = list(labels)
        return out


def two_view_batch_transform(
    transform: Callable[[Any], tuple[Tensor, Tensor]],
    image_column: str = "image",
    label_column: str | None = "label",
) -> TwoViewBatchTransform:
    """Wrap a two-view transform for ``datasets.Dataset.with_transform``.

    Args:
        transform: E.g. a :class:`TwoViewTransform`.
        image_column: Name of the image column (e.g. "img" for ``uoft-cs/cifar10``).
        label_column: Name of the label column, or None to drop labels.

    Returns:
        A picklable callable mapping a batch dict to ``{"view1", "view2"[, "label"]}`` lists.
        It raises ValueError naming a missing column and listing the available ones.
    """
    return TwoViewBatchTransform(transform, image_column=image_column, label_column=label_column)


def eval_batch_transform(
    transform: Callable[[Any], Tensor],
    image_column: str = "image",
    label_column: str | None = "label",
) -> EvalBatchTransform:
    """Wrap an evaluation transform for ``datasets.Dataset.with_transform``.

    Args:
        transform: E.g. the result of :func:`eval_transform`.
        image_column: Name of the image column.
        label_column: Name of the label column, or None to drop labels.

    Returns:
        A picklable callable mapping a batch dict to ``{"image"[, "label"]}`` lists.
        It raises ValueError naming a missing column and listing the available ones.
    """
    return EvalBatchTransform(transform, image_column=image_column, label_column=label_column)
