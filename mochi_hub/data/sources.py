"""Image data sources (digits, image folders, Parquet, Hub ids) and corruption-tolerant datasets.

:func:`load_image_source` turns one source string into a ``datasets`` split with the canonical
columns ``image`` (undecoded, ``datasets.Image(decode=False)``: ``{"bytes", "path"}`` cells) and
``label``. Images are decoded only inside :class:`RobustTwoViewDataset` /
:class:`RobustEvalDataset`, which skip undecodable files (truncated JPEGs, zero-byte files,
non-image bytes, decompression bombs) with a warning and a deterministic replacement, and count
them so that the training engine can enforce a budget with :func:`check_corrupt_budget`.

Truncated images are never accepted silently: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left
untouched (and False by default), so they are counted as corrupt.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch import Tensor

from mochi_hub.data.digits import load_digits_dataset
from mochi_hub.data.transforms import to_rgb

__all__ = [
    "IMAGENET100_CLASSES",
    "IMAGE_COLUMN_CANDIDATES",
    "RobustEvalDataset",
    "RobustTwoViewDataset",
    "check_corrupt_budget",
    "check_imagenet100",
    "decode_image",
    "load_image_source",
]

logger = logging.getLogger(__name__)

# The ImageNet-100 subset of CMC (Tian et al., 2019), used by MoCHi for its ImageNet-100 runs.
# Source: HobbitLong/CMC, file imagenet100.txt, commit bc687a26de7ae350d98f671d25d164b65336b8c2
# (copied from /work/shared/data/imagenet100/classes.txt, in the source's order).
IMAGENET100_CLASSES: tuple[str, ...] = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823",
    "n04589890", "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013",
    "n04485082", "n02105505", "n01983481", "n02788148", "n03530642", "n04435653", "n02086910",
    "n02859443", "n13040303", "n03594734", "n02085620", "n02099849", "n01558993", "n04493381",
    "n02109047", "n04111531", "n02877765", "n04429376", "n02009229", "n01978455", "n02106550",
    "n01820546", "n01692333", "n07714571", "n02974003", "n02114855", "n03785016", "n03764736",
    "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251", "n02701002",
    "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973",
    "n03017168", "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322",
    "n02113978", "n03787032", "n02089867", "n02119022", "n03777754", "n04238763", "n02231487",
    "n03032252", "n02138441", "n02104029", "n03837869", "n03494278", "n04136333", "n03794056",
    "n03492542", "n02018207", "n04067472", "n03930630", "n03584829", "n02123045", "n04229816",
    "n02100583", "n03642806", "n04336792", "n03259280", "n02116738", "n02108089", "n03424325",
    "n01855672", "n02090622",
)  # fmt: skip

IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "jpg", "png", "pixel_values")
"""Column names tried, in order, when no column has a ``datasets.Image`` feature."""

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]

_GLOB_CHARS = frozenset("*?[")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # name or org/name, after "hf:"
_MAX_LISTED = 10  # names listed in error messages
_CASTABLE_DTYPES = frozenset({"binary", "large_binary", "string", "large_string"})
_SPLIT_NAMES = frozenset({"train", "test", "validation", "val", "valid", "dev", "eval"})

# Everything PIL (and datasets' formatting, which calls PIL) raises on a broken image file:
# OSError covers UnidentifiedImageError and "image file is truncated"; SyntaxError, ValueError,
# EOFError, struct.error and zlib.error come from individual format plugins.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


# --------------------------------------------------------------------------- small helpers


def _listing(names: Sequence[str]) -> str:
    """At most ``_MAX_LISTED`` names, plus a count of the rest."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    rest = len(names) - _MAX_LISTED
    return shown + (f", ... ({rest} more)" if rest > 0 else "")


def _column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str] | None:
    """The data set's column names, or None for a streaming set whose columns are unknown."""
    if ds.features is not None:
        return list(ds.features)
    names = ds.column_names
    return list(names) if names is not None else None


def _check_not_empty(ds: datasets.Dataset | datasets.IterableDataset, where: str) -> None:
    """Raise ValueError for an empty map-style data set (streaming sets are not checked)."""
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise ValueError(f"{where} is empty: it has no rows, so there is nothing to train on")


# --------------------------------------------------------------------------- resolving sources


def _is_glob(source: str) -> bool:
    return any(c in source for c in _GLOB_CHARS)


def _split_parquet_files(directory: str, split: str) -> list[str]:
    """The Parquet files of ``split`` in ``directory``.

    Recognised layouts, tried in order: ``<dir>/<split>-*.parquet`` (e.g.
    ``train-00000-of-00004.parquet``), ``<dir>/<split>.parquet``, ``<dir>/<split>/*.parquet``,
    ``<dir>/data/<split>-*.parquet`` (the Hub's layout). Files that follow none of these split
    patterns all belong to the "train" split (as in ``datasets``).

    Raises:
        ValueError: If the directory holds split-named shards but none of ``split``.
    """
    patterns = (
        f"{split}-*.parquet",
        f"{split}.parquet",
        os.path.join(split, "*.parquet"),
        os.path.join("data", f"{split}-*.parquet"),
    )
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
        if files:
            return files
    esc = glob.escape(directory)
    all_files = sorted(
        glob.glob(os.path.join(esc, "*.parquet")) + glob.glob(os.path.join(esc, "*", "*.parquet"))
    )
    splits = set()
    for f in all_files:
        parts = os.path.relpath(f, directory).split(os.sep)
        name = parts[0] if len(parts) > 1 and parts[0] != "data" else parts[-1]
        splits.add(re.split(r"[-._]", name)[0])
    split_named = sorted(splits & _SPLIT_NAMES)
    if split_named:
        raise ValueError(
            f"no Parquet files of split {split!r} in {directory!r}; "
            f"splits found there: {split_named}"
        )
    if split != "train":
        raise ValueError(
            f"the Parquet files in {directory!r} are not named by split (e.g. "
            f"'{split}-00000-of-00001.parquet'), so they only form the 'train' split; "
            f"got split={split!r}"
        )
    return all_files


def _drop_empty_parquet(files: list[str], what: str) -> list[str]:
    """``files`` minus zero-row files (``datasets`` fails on those); ValueError if none is left."""
    kept = [f for f in files if pq.ParquetFile(f).metadata.num_rows > 0]
    if not kept:
        raise ValueError(f"{what} is empty: its Parquet files {_listing(files)} hold no rows")
    return kept


def _has_parquet(directory: str) -> bool:
    esc = glob.escape(directory)
    return bool(
        glob.glob(os.path.join(esc, "*.parquet")) or glob.glob(os.path.join(esc, "*", "*.parquet"))
    )


def _single_class_folder(source: str, split: str) -> bool:
    """True if ``<source>/<split>`` (or ``<source>``) holds one class folder and nothing else."""
    root = os.path.join(source, split) if os.path.isdir(os.path.join(source, split)) else source
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if len(entries) != 1 or not entries[0].is_dir():
        return False
    return not any(e.is_dir() for e in os.scandir(entries[0].path))  # images, not splits


def _load_raw(
    source: str,
    *,
    split: str,
    streaming: bool,
    data_files: DataFiles | None,
    cache_dir: str | None,
    image_size: int,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str], str]:
    """Load ``source`` as it is stored.

    Returns:
        The data set, the local Parquet files it was read from (empty for other sources), and a
        short description of the source for error messages.
    """
    if data_files is not None and not (
        os.path.isdir(source) or (not os.path.exists(source) and _hub_name(source) is not None)
    ):
        raise ValueError(
            f"data_files only applies to a local directory or a Hub data set id, "
            f"not to source={source!r}"
        )
    if source == "digits":
        if split not in ("train", "test"):
            raise ValueError(f"the digits data set has splits 'train' and 'test', got {split!r}")
        ds = load_digits_dataset(image_size=image_size)[split]
        return (ds.to_iterable_dataset() if streaming else ds), [], "data set 'digits'"

    what = f"data set {source!r} split {split!r}"
    if os.path.isdir(source):
        files: list[str] = []
        if data_files is not None:
            builder = "parquet" if _has_parquet(source) else "imagefolder"
            if not isinstance(data_files, Mapping):
                data_files = {split: data_files}
            kwargs: dict[str, Any] = {"data_dir": source, "data_files": data_files}
        elif _has_parquet(source):
            builder = "parquet"
            files = _drop_empty_parquet(_split_parquet_files(source, split), what)
            kwargs = {"data_files": {split: files}}
        else:
            builder = "imagefolder"
            kwargs = {"data_dir": source}
            if _single_class_folder(source, split):
                # datasets infers labels only from two or more class folders: one class is
                # still a labelled set (label 0, named after its folder).
                kwargs["drop_labels"] = False
        ds = datasets.load_dataset(
            builder, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs
        )
        return ds, files, what

    if source.endswith(".parquet") or _is_glob(source):
        files = sorted(glob.glob(source)) if _is_glob(source) else [source]
        if not files or not all(os.path.isfile(f) for f in files):
            raise ValueError(f"no Parquet file matches source={source!r}")
        files = _drop_empty_parquet(files, what)
        ds = datasets.load_dataset(
            "parquet",
            data_files={split: files},
            split=split,
            streaming=streaming,
            cache_dir=cache_dir,
        )
        return ds, files, what

    name = _hub_name(source)
    if name is None or os.path.exists(source):
        raise ValueError(
            f"source={source!r} is neither 'digits', an existing local directory, a .parquet "
            "file or glob, nor a Hub data set id ('hf:<org>/<name>' or '<org>/<name>')"
        )
    if data_files is not None and not isinstance(data_files, Mapping):
        data_files = {split: data_files}
    ds = datasets.load_dataset(
        name, split=split, streaming=streaming, cache_dir=cache_dir, data_files=data_files
    )
    return ds, [], f"data set {name!r} split {split!r}"


def _hub_name(source: str) -> str | None:
    """The Hub id of ``source`` ("hf:org/name" or "org/name"), or None if it is not one."""
    if source.startswith("hf:"):
        return source[3:] if _HUB_NAME.match(source[3:]) else None
    if _HUB_ID.match(source) and not source.endswith(".parquet"):
        return source
    return None


# --------------------------------------------------------------------------- columns


def _detect_image_column(features: datasets.Features | None, names: list[str] | None) -> str:
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                return name
    for candidate in IMAGE_COLUMN_CANDIDATES:
        if names is not None and candidate in names:
            return candidate
    if names is None:
        raise ValueError(
            "cannot detect the image column of a streaming data set with unknown columns; "
            "pass image_column="
        )
    raise ValueError(
        f"no image column found: no column has a datasets.Image feature and none is named one "
        f"of {list(IMAGE_COLUMN_CANDIDATES)}; available columns: {names}; pass image_column="
    )


def _check_column(column: str, names: list[str] | None, role: str) -> None:
    if names is not None and column not in names:
        raise ValueError(f"{role} column {column!r} not found; available columns: {names}")


def _raw_pixel_shape(files: Sequence[str], column: str) -> tuple[int, int, int] | None:
    """(H, W, C) of a raw-pixel Parquet image column, from the schema metadata, or None.

    Parquet shards that store each image as ``H*W*C`` raw uint8 bytes (HWC, row-major) declare
    ``height``, ``width`` and ``channels`` in their schema metadata (as the shared CIFAR-10 copy
    does); encoded (PNG/JPEG) bytes have no such entries.
    """
    if not files:
        return None
    schema = pq.read_schema(files[0])
    meta = schema.metadata or {}
    try:
        h, w, c = (int(meta[k]) for k in (b"height", b"width", b"channels"))
    except (KeyError, ValueError):
        return None
    field_type = schema.field(column).type if column in schema.names else None
    if field_type is None or not (
        pa.types.is_fixed_size_binary(field_type) or pa.types.is_binary(field_type)
    ):
        return None
    if pa.types.is_fixed_size_binary(field_type) and field_type.byte_width != h * w * c:
        raise ValueError(
            f"column {column!r} holds {field_type.byte_width} bytes per row, but the Parquet "
            f"metadata says height={h} width={w} channels={c} ({h * w * c} bytes)"
        )
    if c not in (1, 3):
        raise ValueError(f"raw-pixel images must have 1 or 3 channels, the metadata says {c}")
    return h, w, c


def _class_names_from_parquet(files: Sequence[str]) -> list[str] | None:
    """``class_names`` (a JSON list) from the first file's Parquet schema metadata, if any."""
    if not files:
        return None
    meta = pq.read_schema(files[0]).metadata or {}
    if b"class_names" not in meta:
        return None
    try:
        names = json.loads(meta[b"class_names"])
    except ValueError:
        return None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


class _RawPixelsToPnm:
    """Batched map: raw HWC uint8 bytes -> ``{"bytes": <binary PPM/PGM>, "path": None}``.

    A binary PNM file is a short text header followed by exactly these raw bytes, so the
    conversion copies no pixels through NumPy and PIL reads the result losslessly.
    """

    def __init__(self, height: int, width: int, channels: int) -> None:
        magic = b"P6" if channels == 3 else b"P5"
        self.header = magic + f"\n{width} {height}\n255\n".encode()
        self.nbytes = height * width * channels

    def __call__(self, images: list[bytes | None]) -> dict[str, list[Any]]:
        out = []
        for raw in images:
            if raw is None or len(raw) != self.nbytes:
                out.append(None)  # a short row is decoded (and reported) as corrupt
            else:
                out.append({"bytes": self.header + raw, "path": None})
        return {"image": out}


class _KeepLabels:
    """Batched filter predicate: label in ``keep``."""

    def __init__(self, keep: Sequence[int]) -> None:
        self.keep = frozenset(keep)

    def __call__(self, labels: list[int]) -> list[bool]:
        return [label in self.keep for label in labels]


class _RemapLabels:
    """Batched map: old label index -> new label index."""

    def __init__(self, mapping: Mapping[int, int]) -> None:
        self.mapping = dict(mapping)

    def __call__(self, labels: list[int]) -> dict[str, list[int]]:
        return {"label": [self.mapping[label] for label in labels]}


def _canonicalize(
    ds: datasets.Dataset | datasets.IterableDataset,
    *,
    files: Sequence[str],
    image_column: str | None,
    label_column: str | None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the image (and label) column, name them "image"/"label", leave images undecoded."""
    features = ds.features
    names = _column_names(ds)
    if image_column is None:
        image_column = _detect_image_column(features, names)
    else:
        _check_column(image_column, names, "image")
    if label_column is not None:
        _check_column(label_column, names, "label")
        if label_column == image_column:
            raise ValueError(f"image and label column are the same column {image_column!r}")
    keep = [image_column] + ([label_column] if label_column is not None else [])
    if names is not None and names != keep:
        ds = ds.select_columns(keep)
    renames = {image_column: "image"}
    if label_column is not None:
        renames[label_column] = "label"
    renames = {old: new for old, new in renames.items() if old != new}
    if renames:
        ds = ds.rename_columns(renames)
    if ds.features is None:  # streaming with unknown features: trust the caller's columns
        return ds

    image_feature = ds.features["image"]
    raw_shape = _raw_pixel_shape(files, image_column)
    if raw_shape is not None:
        new_features = ds.features.copy()
        new_features["image"] = datasets.Image(decode=False)
        if label_column is not None:
            class_names = _class_names_from_parquet(files)
            label_feature = new_features["label"]
            if class_names is not None and isinstance(label_feature, datasets.Value):
                new_features["label"] = datasets.ClassLabel(names=class_names)
        ds = ds.map(
            _RawPixelsToPnm(*raw_shape),
            batched=True,
            input_columns="image",
            features=new_features,
        )
    elif isinstance(image_feature, datasets.Image):
        if image_feature.decode:
            ds = ds.cast_column("image", datasets.Image(decode=False))
    elif isinstance(image_feature, datasets.Value) and image_feature.dtype.startswith(
        "fixed_size_binary"
    ):
        raise ValueError(
            f"image column {image_column!r} holds raw bytes of type {image_feature.dtype} "
            "without 'height'/'width'/'channels' Parquet metadata, so they cannot be decoded"
        )
    elif (isinstance(image_feature, dict) and "bytes" in image_feature) or (
        isinstance(image_feature, datasets.Value) and image_feature.dtype in _CASTABLE_DTYPES
    ):
        # Encoded image bytes (a {"bytes", "path"} struct, a binary column) or file paths.
        ds = ds.cast_column("image", datasets.Image(decode=False))
    # Anything else (e.g. pixel arrays) is kept as is and decoded by decode_image().
    return ds


def _select_classes(
    ds: datasets.Dataset | datasets.IterableDataset,
    class_subset: Sequence[str],
    *,
    where: str,
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the rows of ``class_subset`` and relabel them 0..K-1 in sorted name order."""
    if isinstance(class_subset, str):
        raise ValueError(f"class_subset must be a sequence of class names, got {class_subset!r}")
    wanted = sorted(set(class_subset))
    if not wanted:
        raise ValueError("class_subset is empty; pass None to keep every class")
    features = ds.features
    if features is None or "label" not in features:
        raise ValueError(f"class_subset needs a label column, but {where} has none")
    label_feature = features["label"]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise ValueError(
            f"class_subset needs class names, but the label column of {where} is "
            f"{label_feature!r}, not a datasets.ClassLabel"
        )
    index = {name: i for i, name in enumerate(label_feature.names)}
    missing = [name for name in wanted if name not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} class(es) of class_subset are not label names of {where}: "
            f"{_listing(missing)}; it has {label_feature.num_classes} classes, e.g. "
            f"{_listing(label_feature.names[:5])}"
        )
    mapping = {index[name]: new for new, name in enumerate(wanted)}
    new_label = datasets.ClassLabel(names=wanted)
    if isinstance(ds, datasets.IterableDataset):
        new_features = features.copy()
        new_features["label"] = new_label
        ds = ds.filter(_KeepLabels(list(mapping)), batched=True, input_columns="label")
        return ds.map(
            _RemapLabels(mapping), batched=True, input_columns="label", features=new_features
        )
    # Map-style: relabel with a lookup table and select the kept rows through an indices
    # mapping, without rewriting the (possibly huge) image column.
    old = np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)  # (N,)
    lut = np.full(max(label_feature.num_classes, 1), -1, dtype=np.int64)
    for old_idx, new_idx in mapping.items():
        lut[old_idx] = new_idx
    valid = (old >= 0) & (old < lut.shape[0])
    new = np.where(valid, lut[np.clip(old, 0, lut.shape[0] - 1)], -1)  # (N,)
    ds = ds.remove_columns("label").add_column("label", new, feature=new_label)
    return ds.select(np.flatnonzero(new >= 0))


# --------------------------------------------------------------------------- public: loading


def load_image_source(
    source: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = "label",
    streaming: bool = False,
    data_files: DataFiles | None = None,
    class_subset: Sequence[str] | None = None,
    cache_dir: str | None = None,
    image_size: int = 32,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of an image data set with the canonical columns "image" and "label".

    ``source`` forms:

    * ``"digits"``: the built-in offline digits (:func:`load_digits_dataset`, splits "train" /
      "test", side ``image_size``).
    * An existing local directory: Parquet shards if it holds any (``<split>-*.parquet``,
      ``<split>.parquet``, ``<split>/*.parquet`` or ``data/<split>-*.parquet``; unsplit shards
      form "train"), otherwise an image folder (``<dir>/<split>/<class>/*.jpg`` or, for
      "train", ``<dir>/<class>/*.jpg``) read with ``load_dataset("imagefolder")``.
    * A ``.parquet`` file or a glob such as ``"/data/train-*.parquet"``.
    * ``"hf:<org>/<name>"`` or ``"<org>/<name>"`` (not a local path): a Hub data set, loaded
      with ``datasets.load_dataset(name, split=..., streaming=..., cache_dir=...)``.

    The returned image column is ``datasets.Image(decode=False)`` (``{"bytes", "path"}`` cells,
    decoded later by :func:`decode_image` / the robust datasets), except for array-valued
    columns, which are kept as they are. Parquet columns of raw uint8 pixels whose schema
    metadata gives ``height``/``width``/``channels`` (the shared CIFAR-10 copy) are wrapped as
    lossless binary PPM/PGM bytes, and an integer label column becomes a ``ClassLabel`` when
    the metadata has ``class_names``. Other columns are dropped.

    Args:
        source: The source, see above.
        split: Split to load, e.g. "train", "test", "validation".
        image_column: Name of the image column; None detects it: the first column with a
            ``datasets.Image`` feature, else the first of :data:`IMAGE_COLUMN_CANDIDATES`
            ("img" for ``uoft-cs/cifar10``).
        label_column: Name of the label column, or None for an unlabelled set (no "label").
        streaming: Return a ``datasets.IterableDataset`` (not checked for emptiness).
        data_files: Data files for a Hub id or a local directory (relative to it), as for
            ``datasets.load_dataset``; a string or list is assigned to ``split``.
        class_subset: Keep only the rows whose label *name* (``ClassLabel`` names, e.g. the
            synsets of :data:`IMAGENET100_CLASSES`) is listed; labels are remapped to
            0..K-1 in sorted name order and the label feature lists the sorted names.
        cache_dir: ``datasets`` cache directory (None: the default).
        image_size: Side length of the "digits" images; ignored for other sources.

    Returns:
        A ``datasets.Dataset`` (or ``IterableDataset`` if ``streaming``) with columns
        "image" and, unless ``label_column`` is None, "label".

    Raises:
        ValueError: For an unrecognised source, a missing split, image or label column (the
            message lists the available ones), class names absent from the data set, or an
            empty (map-style) result.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if class_subset is not None and label_column is None:
        raise ValueError("class_subset needs labels, but label_column is None")
    ds, files, what = _load_raw(
        source,
        split=split,
        streaming=streaming,
        data_files=data_files,
        cache_dir=cache_dir,
        image_size=image_size,
    )
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise ValueError(f"loading {what} returned several splits {list(ds)}; expected one")
    _check_not_empty(ds, what)
    ds = _canonicalize(ds, files=files, image_column=image_column, label_column=label_column)
    if class_subset is not None:
        ds = _select_classes(ds, class_subset, where=what)
        _check_not_empty(
            ds, f"{what} restricted to class_subset ({len(set(class_subset))} classes)"
        )
    return ds


def check_imagenet100(label_names: Sequence[str]) -> None:
    """Check that a data set's label names are exactly the CMC ImageNet-100 classes.

    Args:
        label_names: The data set's class names (e.g. ``ds.features["label"].names``), in any
            order.

    Raises:
        ValueError: If a name is repeated, or the set differs from
            :data:`IMAGENET100_CLASSES` (the message lists missing and unexpected names).
    """
    names = list(label_names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label names are repeated: {_listing(duplicates)}")
    expected = set(IMAGENET100_CLASSES)
    missing = sorted(expected - set(names))
    unexpected = sorted(set(names) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the label names are not the 100 CMC ImageNet-100 classes: {len(names)} names, "
            f"{len(missing)} ImageNet-100 class(es) missing ({_listing(missing)}), "
            f"{len(unexpected)} unexpected ({_listing(unexpected)})"
        )


# --------------------------------------------------------------------------- decoding


def decode_image(value: Any) -> Image.Image | Tensor:
    """Decode one image cell, fully and strictly, to an RGB PIL image (tensors pass through).

    Args:
        value: A PIL image, a uint8 tensor (C, H, W), a NumPy array or nested list (H, W) /
            (H, W, C), or an undecoded ``{"bytes", "path"}`` dict.

    Returns:
        An RGB PIL image (EXIF orientation applied, as ``datasets.Image`` does), or the tensor.

    Raises:
        OSError: For unreadable or truncated files (``PIL.UnidentifiedImageError`` included).
        PIL.Image.DecompressionBombError: For images over twice ``Image.MAX_IMAGE_PIXELS``.
        ValueError: For a cell with neither bytes nor path, or another malformed value.
        TypeError: For an unsupported cell type.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, np.ndarray | list):
        img = Image.fromarray(np.asarray(value))
    elif isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path") is not None:
            with open(value["path"], "rb") as f:  # closed even if decoding fails
                img = Image.open(io.BytesIO(f.read()))
        else:
            raise ValueError("image cell has neither 'bytes' nor 'path'")
        img.load()  # raises OSError on truncated data (LOAD_TRUNCATED_IMAGES is left False)
    elif value is None:
        raise ValueError("image cell is None")
    else:
        raise TypeError(f"unsupported image cell of type {type(value).__name__}")
    if img.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def _cell_path(row: Any, image_column: str) -> str | None:
    cell = row.get(image_column) if isinstance(row, Mapping) else None
    if isinstance(cell, Mapping):
        return cell.get("path")
    return getattr(cell, "filename", None) or None


class _RobustBase(torch.utils.data.Dataset):
    """Shared fetch-decode-substitute logic of the robust datasets."""

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        *,
        image_column: str = "image",
        label_column: str | None = "label",
        max_tries: int = 10,
    ) -> None:
        self.transform = transform
        if isinstance(dataset, datasets.IterableDataset | torch.utils.data.IterableDataset):
            raise TypeError("the robust datasets wrap map-style datasets, not iterable ones")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"expected a map-style dataset, got {type(dataset).__name__}")
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
        if len(dataset) == 0:
            raise ValueError("the wrapped dataset is empty")
        names = getattr(dataset, "column_names", None)
        if names is not None:
            _check_column(image_column, list(names), "image")
            if label_column is not None and label_column not in names:
                label_column = None  # unlabelled data set: items carry no "label"
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[Image.Image | Tensor, Any, int]:
        """Decode ``index`` or, if it is corrupt, the next decodable index (wrapping).

        Returns:
            The RGB image (or tensor), its row's label (None if the row has none), and the
            number of corrupt images skipped on the way.

        Raises:
            RuntimeError: If ``max_tries`` consecutive images are corrupt.
        """
        n = len(self.dataset)
        if isinstance(index, bool) or not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} rows")
        index = int(index) % n
        skipped = 0
        for attempt in range(self.max_tries):
            j = (index + attempt) % n
            row: Any = None
            try:
                row = self.dataset[j]
                image = decode_image(row[self.image_column])
            except _DECODE_ERRORS as err:
                skipped += 1
                logger.warning(
                    "skipping corrupt image at index %d (path %s): %s: %s; trying index %d",
                    j,
                    _cell_path(row, self.image_column),
                    type(err).__name__,
                    err,
                    (j + 1) % n,
                )
                continue
            label = None
            if self.label_column is not None:
                label = row.get(self.label_column) if isinstance(row, Mapping) else None
            return image, label, skipped
        raise RuntimeError(
            f"{self.max_tries} consecutive images starting at index {index} could not be "
            "decoded; the data set looks broken (see the warnings above)"
        )


class RobustTwoViewDataset(_RobustBase):
    """Map-style dataset of two augmented views that skips undecodable images.

    Item ``i`` decodes row ``i`` of the wrapped dataset (undecoded ``{"bytes", "path"}`` cells
    or already decoded images), converts it to RGB and applies the two-view transform. A
    corrupt image (truncated, zero-byte, not an image, a decompression bomb, ...) is logged as
    a warning naming its index and path and replaced by the next index (wrapping), up to
    ``max_tries`` rows, so every item, and every batch, keeps its shape.

    Args:
        dataset: Map-style dataset whose rows are mappings with an image column (e.g. from
            :func:`load_image_source`).
        transform: Two-view transform, image -> (view1, view2), e.g. a ``TwoViewTransform``.
        image_column: Name of the image column.
        label_column: Name of the label column; if None, absent from the dataset's
            ``column_names`` or missing from a row, items carry no "label".
        max_tries: How many consecutive rows to try before raising RuntimeError.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return ``{"view1", "view2"[, "label"], "corrupt"}`` for row ``index``.

        Returns:
            "view1"/"view2": float32 tensors (3, S, S); "label": the (replacement) row's label;
            "corrupt": the number of corrupt images skipped for this item (int, usually 0).
        """
        image, label, skipped = self._load(index)
        view1, view2 = self.transform(image)
        item: dict[str, Any] = {"view1": view1, "view2": view2}
        if label is not None:
            item["label"] = label
        item["corrupt"] = skipped
        return item


class RobustEvalDataset(_RobustBase):
    """Map-style evaluation dataset that skips undecodable images.

    Decoding, warnings and substitution work as in :class:`RobustTwoViewDataset`.

    Args:
        dataset: Map-style dataset whose rows are mappings with an image column.
        transform: Evaluation transform, image -> float32 (3, S, S) tensor.
        image_column: Name of the image column.
        label_column: Name of the label column; if None or absent, items carry no "label".
        max_tries: How many consecutive rows to try before raising RuntimeError.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return ``{"image"[, "label"], "corrupt"}`` for row ``index``.

        Returns:
            "image": float32 tensor (3, S, S); "label": the (replacement) row's label;
            "corrupt": the number of corrupt images skipped for this item (int).
        """
        image, label, skipped = self._load(index)
        item: dict[str, Any] = {"image": self.transform(image)}
        if label is not None:
            item["label"] = label
        item["corrupt"] = skipped
        return item


def check_corrupt_budget(total_skipped: int, max_corrupt: int | None) -> None:
    """Raise if more corrupt images were skipped than allowed.

    The robust datasets count skips per item ("corrupt"); only the engine, which sums them
    over batches (and processes), knows the total, so it calls this after each step / epoch.

    Args:
        total_skipped: Corrupt images skipped so far (>= 0).
        max_corrupt: The allowed number, or None for no limit.

    Raises:
        ValueError: If ``max_corrupt`` or ``total_skipped`` is negative or not an int.
        RuntimeError: If ``total_skipped > max_corrupt``.
    """
    if isinstance(total_skipped, bool) or not isinstance(total_skipped, int | np.integer):
        raise ValueError(f"total_skipped must be an int, got {total_skipped!r}")
    if total_skipped < 0:
        raise ValueError(f"total_skipped must be >= 0, got {total_skipped}")
    if max_corrupt is None:
        return
    if isinstance(max_corrupt, bool) or not isinstance(max_corrupt, int) or max_corrupt < 0:
        raise ValueError(f"max_corrupt must be a non-negative int or None, got {max_corrupt!r}")
    if total_skipped > max_corrupt:
        raise RuntimeError(
            f"{total_skipped} corrupt images skipped, more than data.max_corrupt={max_corrupt}; "
            "fix or remove the broken files (see the warnings) or raise data.max_corrupt"
        )
