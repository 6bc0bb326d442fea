"""Data: the built-in digits data set and the two-view / evaluation transforms."""

from mochi_hub.data.digits import DIGITS_CLASS_NAMES, load_digits_dataset
from mochi_hub.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    EvalBatchTransform,
    EvalTransform,
    SeparableGaussianBlur,
    TwoViewBatchTransform,
    TwoViewTransform,
    ViewAugmentation,
    blur_kernel_size,
    eval_batch_transform,
    eval_transform,
    gaussian_blur_matrix,
    to_rgb,
    to_uint8_rgb_tensor,
    two_view_batch_transform,
    two_view_transform,
)

__all__ = [
    "DIGITS_CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "EvalBatchTransform",
    "EvalTransform",
    "SeparableGaussianBlur",
    "TwoViewBatchTransform",
    "TwoViewTransform",
    "ViewAugmentation",
    "blur_kernel_size",
    "eval_batch_transform",
    "eval_transform",
    "gaussian_blur_matrix",
    "load_digits_dataset",
    "to_rgb",
    "to_uint8_rgb_tensor",
    "two_view_batch_transform",
    "two_view_transform",
]
