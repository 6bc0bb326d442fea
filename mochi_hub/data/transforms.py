"""Two-view (contrastive) and evaluation image transforms on the torchvision v2 tensor path.

Every image is decoded and converted to RGB once and turned into a uint8 CHW tensor. The
training views are cropped and resized (``RandomResizedCrop``) while still uint8, then
converted to float32 in [0, 1] right after the crop, so that colour jitter, greyscale, blur,
solarisation, flip and ``Normalize`` all run on float32: torchvision's brightness, contrast
and saturation kernels are several times faster on float than on uint8, the hue step uses a
closed-form HSV rotation (:func:`adjust_hue_float`, through :class:`FastColorJitter`) and the
blur a truncated separable filter (:class:`SeparableGaussianBlur`); both agree with
torchvision's float kernels to ~1e-5.

Consequence: colour operations no longer round to uint8 between steps. The random parameters
(drawn from torch's global generator in the same order and number) and the crops are those of
the former all-uint8 pipeline, and a view differs from that pipeline's by its rounding only:
torchvision's uint8 colour kernels truncate after every step, so the former views were on
average ~1.5 / 255 darker (mean absolute difference ~1.4 / 255, a few / 255 at most). The
evaluation transform resizes and centre-crops in uint8 and converts at the end.

Presets follow MoCo-v2 ``--aug-plus`` (both views alike) and MoCo-v3 / BYOL (asymmetric
views); the ``*_small`` presets are their 32-px variants without Gaussian blur (as in the
SimCLR / MoCo CIFAR set-ups).

All callables here are plain classes (no closures), so they pickle into DataLoader workers
under every start method.
"""

from __future__ import annotations

import dataclasses
import io
import math
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
    "FastColorJitter",
    "TwoViewBatchTransform",
    "TwoViewTransform",
    "ViewAugmentation",
    "adjust_hue_float",
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
# PIL ImageOps.solarize's default 128 (MoCo-v3 / BYOL) on [0, 1] floats: float32(k / 255) >=
# float32(128 / 255) exactly when k >= 128, so uint8 pixels converted by ToDtype are inverted
# exactly as PIL (and torchvision's uint8 solarize with threshold 128) would invert them.
_SOLARIZE_THRESHOLD = 128 / 255
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# hue (in sixths, [0, 6)) to R, G, B: clamp(sign * |h - center| + offset, 0, 1)
_HUE_TO_RGB = ((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))
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


def _truncated_gaussian(radius: int, sigma: float) -> list[float]:
    """Weights of torchvision's Gaussian kernel at offsets -radius..radius, renormalised."""
    w = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = math.fsum(w)
    return [v / total for v in w]


def _reflect_pad(x: Tensor, dim: int, radius: int) -> Tensor:
    """``x`` padded by ``radius`` < its size along ``dim`` on both sides by mirror reflection.

    The same as ``torch.nn.functional.pad(..., mode="reflect")``, which is ~4x slower along
    the last dimension on CPU.
    """
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = n + 2 * radius
    out = x.new_empty(shape)
    out.narrow(dim, radius, n).copy_(x)
    out.narrow(dim, 0, radius).copy_(x.narrow(dim, 1, radius).flip(dim))
    out.narrow(dim, radius + n, radius).copy_(x.narrow(dim, n - 1 - radius, radius).flip(dim))
    return out


def _blur_axis(x: Tensor, dim: int, kernel_size: int, sigma: float) -> Tensor:
    """1-D Gaussian blur of a float tensor (N, H, W) along ``dim`` (-1: W, -2: H).

    The kernel is truncated at radius ``min(kernel_size // 2, ceil(4 * sigma))`` and
    renormalised (the dropped tail weighs < 1e-4 of the kernel), and the blur is a sum of
    shifted copies of the reflect-padded signal. A radius that reflection padding cannot
    provide (radius >= the signal length) falls back to :func:`gaussian_blur_matrix`, with
    the full kernel.

    Args:
        x: Float tensor of shape (N, H, W).
        dim: -1 to blur along W, -2 to blur along H.
        kernel_size: Odd kernel size k of the untruncated kernel.
        sigma: Standard deviation in pixels (> 0).

    Returns:
        A new tensor of the shape and dtype of ``x``.
    """
    n = x.shape[dim]
    radius = min(kernel_size // 2, math.ceil(4.0 * sigma))
    if radius == 0:
        return x.clone()
    if radius >= n:
        m = gaussian_blur_matrix(n, kernel_size, sigma, device=x.device).to(x.dtype)  # (n, n)
        return x @ m.T if dim == -1 else m @ x
    weights = _truncated_gaussian(radius, sigma)
    xp = _reflect_pad(x, dim, radius)
    out = xp.narrow(dim, 0, n) * weights[0]
    for j in range(1, 2 * radius + 1):
        out.add_(xp.narrow(dim, j, n), alpha=weights[j])
    return out


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` computed separably, much faster on CPU (same result up to ~1e-5).

    torchvision convolves with the full k x k kernel through a depthwise convolution, which is
    slow on CPU for the 23 x 23 kernel of 224-px images (~11 ms). Here:

    * float images are blurred along W, then H, each as a sum of shifted copies of the
      reflect-padded image, with the kernel truncated at radius ``min(k // 2, ceil(4 sigma))``
      and renormalised (~0.3-1.2 ms at 224 px; at most ~1e-5 from ``v2.GaussianBlur`` on
      [0, 1] images, the mass of the dropped tail). Along an axis no longer than that
      radius, the matrix product below (with the full kernel) is used instead;
    * uint8 images are blurred with reflect-padded banded matrices (``B_h @ img @ B_w.T``,
      ~2-3 ms, the full kernel) and rounded back, matching torchvision to +-1.

    Reflection extends to kernels wider than the image (where torchvision's padding would
    raise). Arguments, sampling of sigma and non-tensor inputs are those of
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
        x = inpt.as_subclass(Tensor)
        if torch.is_floating_point(x):
            out = _blur_axis(x.reshape(-1, h, w), -1, k_x, sigma_x)
            out = _blur_axis(out, -2, k_y, sigma_y).reshape(x.shape)
        else:
            xf = x.to(torch.float32)
            b_h = gaussian_blur_matrix(h, k_y, sigma_y, device=x.device)  # (H, H)
            b_w = gaussian_blur_matrix(w, k_x, sigma_x, device=x.device)  # (W, W)
            out = (b_h @ xf @ b_w.T).round_().clamp_(0, 255).to(x.dtype)  # (..., C, H, W)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def adjust_hue_float(image: Tensor, hue_factor: float) -> Tensor:
    """Rotate the hue of a float RGB image in closed form; ``v2.functional.adjust_hue`` values.

    torchvision converts to HSV, shifts H and converts back with a gather over six sectors
    (~5 ms for a 224-px image on one CPU thread). The same map is computed here directly:
    with V = max, m = min and C = V - m (chroma) over the channels, the hue in sixths is
    ``(G - B) / C``, ``(B - R) / C + 2`` or ``(R - G) / C + 4`` as R, G or B is the maximum
    (R first, then G, on ties, as torchvision and PIL), is shifted by ``6 * hue_factor`` modulo
    6 to H', and the output channels are ``m + C * clamp(f(H'), 0, 1)`` with
    ``f = |H' - 3| - 1``, ``2 - |H' - 2|``, ``2 - |H' - 4|`` for R, G, B. The sector is
    selected with float 0/1 indicators (``sign(V - R)``, ...), as bool masks and
    ``torch.where`` are slow on CPU; the whole step takes ~0.5 ms at 224 px. Results agree
    with torchvision to ~2e-6 on [0, 1] images, grey pixels (C == 0, left unchanged)
    included.

    Args:
        image: Float tensor (..., 1 | 3, H, W) with values in [0, 1] (a plain tensor or a
            ``tv_tensors.Image``). One-channel images are returned unchanged, as in PIL.
        hue_factor: Shift of the hue channel, in turns, in [-0.5, 0.5].

    Returns:
        A plain tensor of the shape and dtype of ``image`` with the hue shifted (``image``
        itself, as given, for one channel, no pixels or ``hue_factor == 0``). float16 and
        bfloat16 are computed in float32.

    Raises:
        ValueError: If ``hue_factor`` is outside [-0.5, 0.5].
        TypeError: If ``image`` is not floating point or has neither 1 nor 3 channels.
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if not torch.is_floating_point(image):
        raise TypeError(f"adjust_hue_float expects a float image, got {image.dtype}")
    if image.ndim < 3 or image.shape[-3] not in (1, 3):
        raise TypeError(f"expected an image (..., 1 | 3, H, W), got shape {tuple(image.shape)}")
    if image.shape[-3] == 1 or image.numel() == 0 or hue_factor == 0:
        return image
    x = image.as_subclass(Tensor)
    x = x.float() if x.dtype in _LOW_PRECISION else x
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)  # (aminmax over dim -3 is ~30x slower)
    chroma = maxc - minc
    inv = chroma.clamp_min(torch.finfo(x.dtype).tiny).reciprocal_()  # grey: 0 * finite
    not_r = (maxc - r).sign_()  # 0 where R is the maximum, else 1
    is_g = (maxc - g).sign_().neg_().add_(1.0).mul_(not_r)  # G is the maximum and R is not
    is_b = not_r - is_g
    # C * hue in sixths = is_r (G - B) + is_g (B - R + 2C) + is_b (R - G + 4C)
    h = (g - b).mul_(not_r.neg().add_(1.0))
    h.addcmul_(is_g, (b - r).add_(chroma, alpha=2.0))
    h.addcmul_(is_b, (r - g).add_(chroma, alpha=4.0))
    h.mul_(inv).add_(6.0 * hue_factor + 6.0)  # in [2, 14)
    h.sub_(torch.floor(h * (1.0 / 6.0)).mul_(6.0))  # modulo 6 (torch.remainder is slower)
    out = torch.empty_like(x)
    for channel, (center, sign, offset) in enumerate(_HUE_TO_RGB):
        plane = torch.sub(h, center, out=out[..., channel, :, :]).abs_()
        plane.mul_(sign).add_(offset).clamp_(0.0, 1.0).mul_(chroma).add_(minc)
    return out.to(image.dtype)


class FastColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` whose hue step runs :func:`adjust_hue_float` on float images.

    Arguments, the random order of the four operations and the sampling of their factors are
    inherited unchanged (so it draws the same numbers from torch's generator as
    ``v2.ColorJitter``); brightness, contrast and saturation use torchvision's kernels. uint8
    images, PIL images and videos take torchvision's hue path.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the jitter with the factors and order in ``params``.

        Args:
            inpt: An image (float tensors take the fast hue path) or anything
                ``v2.ColorJitter`` accepts.
            params: From ``make_params``: ``fn_idx`` (a permutation of 0..3) and the four
                factors (None for an operation that is off).

        Returns:
            The jittered input, same type.
        """
        is_image = isinstance(inpt, tv_tensors.Image) or type(inpt) is Tensor
        if not (is_image and torch.is_floating_point(inpt)):
            return super().transform(inpt, params)
        fns = {
            0: (v2.functional.adjust_brightness_image, params["brightness_factor"]),
            1: (v2.functional.adjust_contrast_image, params["contrast_factor"]),
            2: (v2.functional.adjust_saturation_image, params["saturation_factor"]),
            3: (adjust_hue_float, params["hue_factor"]),
        }
        output = inpt.as_subclass(Tensor)
        for fn_id in params["fn_idx"].tolist():
            fn, factor = fns[fn_id]
            if factor is not None:
                output = fn(output, factor)
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.Image) else output


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

    The pipeline built by :meth:`build` runs, in this order: RandomResizedCrop(size,
    crop_scale) on the uint8 image -> float32 in [0, 1] -> ColorJitter(jitter) w.p. jitter_p
    (as :class:`FastColorJitter`) -> RandomGrayscale(grayscale_p) -> GaussianBlur(kernel ~10%
    of size, blur_sigma) w.p. blur_p (as :class:`SeparableGaussianBlur`) -> RandomSolarize
    (128 / 255, i.e. PIL's 128) w.p. solarize_p -> RandomHorizontalFlip(hflip_p) ->
    Normalize(mean, std). Steps with probability 0 are left out. The random parameters are
    drawn from torch's global generator in the same order and number as the same pipeline on
    uint8 throughout (torchvision's ColorJitter and GaussianBlur), whose result differs from
    this one by the uint8 rounding between its colour steps only.

    Attributes:
        size: Output side length S.
        crop_scale: (min, max) area fraction of RandomResizedCrop, 0 < min <= max <= 1.
        jitter: ColorJitter (brightness, contrast, saturation, hue); hue <= 0.5.
        jitter_p: Probability of applying the colour jitter.
        grayscale_p: Probability of converting to (3-channel) greyscale.
        blur_p: Probability of the Gaussian blur.
        blur_sigma: (min, max) of the blur's standard deviation, in pixels.
        solarize_p: Probability of solarisation (pixels >= 128 / 255 are inverted).
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
            # colour ops are several times faster on float32 than on uint8 (see module doc)
            v2.ToDtype(torch.float32, scale=True),
        ]
        if any(self.jitter):
            steps += _random_apply(
                FastColorJitter(brightness=b, contrast=c, saturation=s, hue=h), self.jitter_p
            )
        if self.grayscale_p > 0.0:
            steps.append(v2.RandomGrayscale(p=self.grayscale_p))
        steps += _random_apply(
            SeparableGaussianBlur(kernel_size=blur_kernel_size(self.size), sigma=self.blur_sigma),
            self.blur_p,
        )
        if self.solarize_p > 0.0:
            steps.append(v2.RandomSolarize(threshold=_SOLARIZE_THRESHOLD, p=self.solarize_p))
        if self.hflip_p > 0.0:
            steps.append(v2.RandomHorizontalFlip(p=self.hflip_p))
        steps.append(v2.Normalize(mean=list(self.mean), std=list(self.std)))
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

    Resizes and crops in uint8, like the training views, then converts to float32. Prefer
    :func:`eval_transform`.

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
