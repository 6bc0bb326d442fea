"""The built-in offline data set: scikit-learn's bundled 8x8 handwritten digits as RGB images.

It needs no download (the 1,797 images ship inside scikit-learn), so tests, examples and CI
can run a real end-to-end pretraining / kNN evaluation without Hub access.
"""

from __future__ import annotations

import functools
import io

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["DIGITS_CLASS_NAMES", "load_digits_dataset"]

DIGITS_CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
"""Class names of the digits data set: ``"0"`` .. ``"9"`` (label i is digit i)."""

_MIN_PER_SPLIT = 10  # a stratified split needs at least one sample of each of the 10 classes


def _validate_args(image_size: int, test_fraction: float, seed: int) -> None:
    """Raise ValueError naming the first invalid argument of :func:`load_digits_dataset`."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def _upsample_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
    """Scale digit images from 0..16 to 0..255 and resize them bilinearly (antialiased).

    Args:
        images: Digit intensities, shape (N, 8, 8), values 0..16.
        image_size: Output side length S.

    Returns:
        uint8 array of shape (N, S, S, 3) (grey replicated to RGB).
    """
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) * (255.0 / 16.0))  # (N, 8, 8)
    x = x.round().clamp_(0, 255).unsqueeze(1)  # (N, 1, 8, 8), the 0..255 uint8 grid values
    if x.shape[-1] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    x = x.round().clamp_(0, 255).to(torch.uint8)  # (N, 1, S, S)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()  # (N, S, S, 3)


def _features() -> datasets.Features:
    """The features of both splits: an RGB ``image`` and a 10-class ``label``."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(DIGITS_CLASS_NAMES)),
        }
    )


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode one uint8 RGB array (S, S, 3) as a (lossless, fast-compressed) PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _make_split(images: np.ndarray, labels: np.ndarray, split: str) -> datasets.Dataset:
    """Build one split from uint8 RGB arrays (N, S, S, 3) and int labels (N,)."""
    encoded = [{"bytes": _png_bytes(img), "path": None} for img in images]
    return datasets.Dataset.from_dict(
        {"image": encoded, "label": labels.astype(np.int64).tolist()},
        features=_features(),
        split=datasets.Split(split),
    )


@functools.lru_cache(maxsize=8)
def _cached_digits(image_size: int, test_fraction: float, seed: int) -> datasets.DatasetDict:
    """Build the digits DatasetDict once per argument tuple (see :func:`load_digits_dataset`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = _upsample_uint8(bunch.images, image_size)  # (1797, S, S, 3)
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    n = labels.shape[0]
    n_test = int(np.ceil(test_fraction * n))  # sklearn's rounding for a float test_size
    if n_test < _MIN_PER_SPLIT or n - n_test < _MIN_PER_SPLIT:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves {n - n_test} train / {n_test} test images; "
            f"each split needs at least {_MIN_PER_SPLIT} for a stratified split"
        )
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_fraction, stratify=labels, random_state=seed, shuffle=True
    )
    return datasets.DatasetDict(
        {
            "train": _make_split(images[train_idx], labels[train_idx], "train"),
            "test": _make_split(images[test_idx], labels[test_idx], "test"),
        }
    )


def _fresh_view(ds: datasets.Dataset) -> datasets.Dataset:
    """A new Dataset object over the same (immutable) Arrow table, with default formatting.

    The cached object is never handed out, so ``set_transform``/``set_format`` on a returned
    split cannot leak into later calls.
    """
    return datasets.Dataset(ds.data, info=ds.info.copy(), split=ds.split)


def load_digits_dataset(
    image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> datasets.DatasetDict:
    """Load scikit-learn's 1,797 handwritten digits as an RGB image classification data set.

    The 8x8 images (values 0..16) are scaled to 0..255 uint8, upsampled to
    ``image_size`` x ``image_size`` with an antialiased bilinear resize and replicated to 3
    channels. The train/test split is a fixed stratified ``train_test_split`` with
    ``random_state=seed``, so it is identical on every machine and call. The result is built
    once per argument tuple per process (about a second) and then served from an in-process
    cache; every call returns new Dataset objects over the shared immutable Arrow tables.

    Args:
        image_size: Side length S of the returned square images (>= 1).
        test_fraction: Fraction of the images in the "test" split, in (0, 1); each split must
            receive at least 10 images.
        seed: Random state of the stratified split, in [0, 2**32).

    Returns:
        A ``DatasetDict`` with splits "train" and "test" and features ``image``
        (``datasets.Image()``, RGB PIL images of size S x S) and ``label``
        (``datasets.ClassLabel`` with names "0" .. "9").

    Raises:
        ValueError: If an argument is invalid (the message names it).
    """
    _validate_args(image_size, test_fraction, seed)
    cached = _cached_digits(image_size, float(test_fraction), seed)
    return datasets.DatasetDict({name: _fresh_view(ds) for name, ds in cached.items()})
