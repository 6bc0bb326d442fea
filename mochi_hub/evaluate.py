"""Evaluation of frozen backbones: weighted kNN, a fast logistic-regression probe, linear protocol.

A backbone is a training checkpoint or run directory, an exported folder, or a timm name
(:func:`load_backbone`). Its features on a labelled train / held-out split pair
(:func:`load_eval_data`) are extracted once, sharded over processes, and cached on disk keyed by
the weights, the data and the transform (:func:`extract_cached`); the kNN classifier
(:func:`mochi_hub.knn.knn_accuracy`) and the probe (:func:`linear_probe`) then run on the cached
features. The MoCo linear-classification protocol, which trains on augmented images, lives in
:mod:`mochi_hub.linear`. :func:`evaluate` ties it together and writes result rows
``{"dataset", "split", "protocol", "metric", "value", "settings"}`` that
``mochi-hub export --eval-results`` puts into the model card.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.data import resolve_model_data_config
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mochi_hub import __version__
from mochi_hub.data import RobustEvalDataset, eval_transform, load_image_source
from mochi_hub.knn import extract_features, knn_accuracy
from mochi_hub.registry import create_model

__all__ = [
    "PROBE_L2_GRID",
    "PROTOCOLS",
    "EvalData",
    "backbone_name",
    "default_output_dir",
    "eval_loader",
    "evaluate",
    "extract_cached",
    "fit_logistic_regression",
    "format_results",
    "linear_probe",
    "load_backbone",
    "load_eval_data",
    "make_accelerator",
    "transform_settings",
    "val_dataset",
    "weights_fingerprint",
    "write_results",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear", "probe")
PROBE_L2_GRID: tuple[float, ...] = (1e-6, 3.16e-5, 1e-3, 3.16e-2, 1.0)
"""L2 strengths tried by the probe: 5 log-spaced values over six decades."""
PROBE_HOLDOUT = 0.2  # part of the training features held out to choose the probe's L2

_VAL_SPLITS = ("validation", "val", "test")  # tried in order when no held-out split is named
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_CACHE_FORMAT = 1
_COLLECTIVE_TIMEOUT_S = int(os.environ.get("MOCHI_HUB_COLLECTIVE_TIMEOUT", "1800"))


# --------------------------------------------------------------------------- backbones


def _run_data_config(cfg) -> dict[str, Any]:
    """The evaluation preprocessing of a training run (what ``mochi-hub export`` records)."""
    d = cfg.data
    return {
        "input_size": (3, d.image_size, d.image_size),
        "mean": tuple(d.mean),
        "std": tuple(d.std),
        "crop_pct": d.eval_crop_pct,
        "interpolation": "bilinear",  # MoCo's evaluation resize
    }


def _from_checkpoint(path: Path, timm_kwargs: dict) -> tuple[nn.Module, dict]:
    from mochi_hub.config import load_config
    from mochi_hub.export import load_checkpoint_backbone, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: the run's configuration names its backbone")
    cfg = load_config(config)
    if timm_kwargs.pop("num_classes", 0) != 0:
        raise ValueError("an evaluated backbone has no classifier: num_classes must be 0")
    cfg.model.backbone_kwargs = {**cfg.model.backbone_kwargs, **timm_kwargs}
    model, _ = load_checkpoint_backbone(ckpt, cfg)
    data_config = _run_data_config(cfg)
    # later timm.data.resolve_model_data_config(model) calls see the run's preprocessing
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **data_config}
    logger.info("backbone: %s (%s) from %s", cfg.model.arch, cfg.model.method, ckpt)
    return model, data_config


def _unknown_name(name: str) -> ValueError:
    arch = name.partition(".")[0]
    near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return ValueError(
        f"backbone {name!r} is neither an existing checkpoint / run / export directory nor a "
        f"timm model name{hint}"
    )


def _from_timm(name: str, pretrained: bool | None, timm_kwargs: dict) -> tuple[nn.Module, dict]:
    hub = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if not hub:
        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            raise _unknown_name(name)
        if tag and name not in timm.list_pretrained(name):
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(
                f"timm has no pretrained weights {name!r}; tags of {arch!r}: {tags[:10] or 'none'}"
            )
        if pretrained is None:
            pretrained = bool(tag)
    elif pretrained is None:
        pretrained = True
    if timm_kwargs.setdefault("num_classes", 0) != 0:
        raise ValueError("an evaluated backbone has no classifier: num_classes must be 0")
    try:
        # checks hf-hub: ids; unreadable or unfitting weights raise a ValueError naming them
        model = create_model(name, pretrained=pretrained, **timm_kwargs)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, HTTP errors
        msg = " ".join(str(e).split())
        raise FileNotFoundError(f"the weights of {name!r} could not be loaded: {msg}") from e
    if not pretrained:
        logger.warning("backbone %s: randomly initialised weights (no pretrained tag)", name)
    return model.eval(), dict(resolve_model_data_config(model))


def load_backbone(
    spec: str | os.PathLike, *, pretrained: bool | None = None, **timm_kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """A feature backbone (no classifier) and its evaluation preprocessing.

    ``spec`` forms:

    * A training checkpoint ``run/checkpoints/step_XXXXXXXX`` or a run directory (its newest
      complete checkpoint): the query backbone, built from the run's ``config.yaml``; the data
      config is the run's (image size, mean/std, evaluation crop, bilinear resize).
    * An exported folder (``config.json`` + ``model.safetensors``, written by
      ``mochi-hub export`` or timm's ``save_for_hf``): loaded with ``local-dir:``.
    * A timm name: ``resnet18_mochi.cifar10`` or ``resnet50.a1_in1k`` (tagged: pretrained),
      ``hf-hub:org/name`` (pretrained), or ``resnet50`` (untagged: random weights, a baseline).

    Args:
        spec: The backbone, see above.
        pretrained: Override whether a timm name loads pretrained weights; by default tagged
            and ``hf-hub:`` names do and untagged ones do not.
        **timm_kwargs: Extra arguments of ``timm.create_model`` (for checkpoints: added to the
            run's ``model.backbone_kwargs``).

    Returns:
        ``(model, data_config)``: the model in eval mode, mapping images (B, 3, H, W) to
        features (B, num_features), and ``{"input_size", "mean", "std", "crop_pct",
        "interpolation", ...}`` (``timm.data.resolve_model_data_config`` for timm models).

    Raises:
        FileNotFoundError: For a directory that is neither a checkpoint, a run nor an export,
            a path that does not exist, or weights that cannot be downloaded.
        ValueError: For an unknown timm name or pretrained tag, an invalid ``hf-hub:`` id, a
            weights file that is not a readable safetensors file, or weights that do not match
            the architecture (of a checkpoint's run, or an export's ``config.json``).
    """
    from mochi_hub.engine import CHECKPOINT_DIR, COMPLETE_MARKER

    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        if (path / COMPLETE_MARKER).is_file() or (path / CHECKPOINT_DIR).is_dir():
            return _from_checkpoint(path, timm_kwargs)
        weights = path / "model.safetensors"
        if (path / "config.json").is_file() and weights.exists() and not weights.is_file():
            raise ValueError(f"{weights} is a directory, not a safetensors weights file")
        if (path / "config.json").is_file() and weights.is_file():
            return _from_timm(f"local-dir:{path.resolve()}", True, timm_kwargs)
        raise FileNotFoundError(
            f"{path} is neither a training checkpoint or run directory (checkpoints/step_*/"
            f"{COMPLETE_MARKER}) nor an exported folder (config.json + model.safetensors)"
        )
    if path.exists():
        raise ValueError(f"{path} is a file; give a checkpoint, run or export directory")
    if not text.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and (
        os.sep in text or text.startswith(".")
    ):
        raise FileNotFoundError(
            f"no such checkpoint, run or export directory: {text} (a Hub model is "
            "'hf-hub:<org>/<name>')"
        )
    return _from_timm(text, pretrained, timm_kwargs)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict: names, dtypes, shapes and bytes.

    Args:
        model: Any module (weights and buffers are hashed; BatchNorm statistics included).

    Returns:
        64 hex digits; equal for equal weights, whatever the device.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_name(spec: str | os.PathLike) -> str:
    """How result rows name a backbone: a timm name as given, a directory by its name.

    Local absolute paths stay out of result rows (they end up in model cards); the weights'
    SHA-256 identifies the backbone exactly.
    """
    from mochi_hub.engine import COMPLETE_MARKER

    path = Path(os.fspath(spec))
    if not path.is_dir():
        return os.fspath(spec)
    path = path.resolve()
    if (path / COMPLETE_MARKER).is_file():  # run/checkpoints/step_XXXXXXXX
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def default_output_dir(spec: str | os.PathLike) -> Path:
    """Where results go by default: the run directory of a checkpoint, else ``runs/eval/<name>``.

    An exported folder is left untouched (it is what gets pushed to the Hub).
    """
    from mochi_hub.engine import CHECKPOINT_DIR, COMPLETE_MARKER

    path = Path(os.fspath(spec))
    if path.is_dir() and (path / COMPLETE_MARKER).is_file():
        return path.parent.parent
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        return path
    name = path.name if path.is_dir() else os.fspath(spec)
    return Path("runs") / "eval" / re.sub(r"[^\w.-]+", "_", name).strip("_")


# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """A labelled train / held-out split pair in canonical columns ``image`` and ``label``.

    Attributes:
        train: The training split (a seeded subset when capped), undecoded images.
        val: The held-out split.
        num_classes: Number of classes C (labels lie in [0, C)).
        name: The data set's name for result rows (``digits``, a Hub id, a folder name).
        source: The source string as given.
        train_split: Name of the training split.
        val_split: Name of the held-out split.
        subset_seed: Seed of the training subset, or None when the whole split is used.
    """

    train: datasets.Dataset
    val: datasets.Dataset
    num_classes: int
    name: str
    source: str
    train_split: str
    val_split: str
    subset_seed: int | None = None


def _dataset_name(source: str) -> str:
    if source == "digits":
        return source
    if os.path.exists(source) or source.endswith(".parquet") or any(c in source for c in "*?["):
        path = Path(source.rstrip("/\\"))
        return path.parent.name if any(c in path.name for c in "*?[") else path.name
    return source.removeprefix("hf:")


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy", columns=["label"])[:]["label"])


def _load_split(source: str, split: str, **kwargs: Any) -> datasets.Dataset:
    ds = load_image_source(source, split=split, **kwargs)
    if "label" not in ds.column_names:
        raise ValueError(f"split {split!r} of {source!r} has no labels")
    return ds


def _held_out_split(source: str, **kwargs: Any) -> tuple[str, datasets.Dataset]:
    if source == "digits":
        return "test", _load_split(source, "test", **kwargs)
    errors = []
    for split in _VAL_SPLITS:
        try:
            return split, _load_split(source, split, **kwargs)
        except ValueError as e:
            errors.append(f"{split}: {' '.join(str(e).split())[:200]}")
    raise ValueError(
        f"no held-out split found in {source!r} (tried {', '.join(_VAL_SPLITS)}: "
        f"{'; '.join(errors)}); name one with val_split (--val-split)"
    )


def load_eval_data(
    source: str,
    *,
    image_size: int,
    train_split: str = "train",
    val_split: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    max_train_images: int | None = None,
    seed: int = 0,
) -> EvalData:
    """Load a labelled train / held-out split pair of any training source.

    Args:
        source: ``digits``, an image folder, Parquet file(s) or a Hub data set id (see
            :func:`mochi_hub.data.load_image_source`).
        image_size: Side of the built-in digits images (the model's input size); ignored
            otherwise.
        train_split: The split the kNN bank / classifier is fitted on.
        val_split: The held-out split; None: ``test`` for digits, else the first of
            ``validation``, ``val``, ``test`` that exists.
        image_column: Image column; detected when None.
        label_column: Label column.
        max_train_images: Keep a seeded random subset of this many training images.
        seed: Seed of that subset.

    Returns:
        The splits, the number of classes and names for the result rows.

    Raises:
        ValueError: For a missing split or column, unlabelled rows (labels < 0), or a bad cap.
    """
    if max_train_images is not None and max_train_images < 1:
        raise ValueError(f"max_train_images must be >= 1, got {max_train_images}")
    kw = dict(image_column=image_column, label_column=label_column, image_size=image_size)
    train = _load_split(source, train_split, **kw)
    if val_split is None:
        val_split, val = _held_out_split(source, **kw)
    else:
        val = _load_split(source, val_split, **kw)
    subset_seed = None
    if max_train_images is not None and max_train_images < len(train):
        g = torch.Generator().manual_seed(seed)
        train = train.select(torch.randperm(len(train), generator=g)[:max_train_images].tolist())
        subset_seed = seed
    y_train, y_val = _labels(train), _labels(val)
    for split, y in ((train_split, y_train), (val_split, y_val)):
        if y.min() < 0:
            raise ValueError(
                f"split {split!r} of {source!r} has unlabelled rows (label {int(y.min())}); "
                "evaluate on a labelled split"
            )
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        num_classes = feature.num_classes
    else:
        num_classes = int(max(y_train.max(), y_val.max())) + 1
    if max(y_train.max(), y_val.max()) >= num_classes:
        raise ValueError(f"labels of {source!r} exceed its {num_classes} class names")
    return EvalData(
        train, val, num_classes, _dataset_name(source), source, train_split, val_split, subset_seed
    )


def transform_settings(data_config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation preprocessing of a data config: size, crop, interpolation, mean, std.

    Raises:
        ValueError: For a non-square input size.
    """
    _, h, w = data_config["input_size"]
    if h != w:
        raise ValueError(f"non-square input sizes are not supported, got {h} x {w}")
    interpolation = data_config.get("interpolation", "bilinear")
    if interpolation not in _INTERPOLATIONS:
        logger.warning("interpolation %r is not supported; using bicubic", interpolation)
        interpolation = "bicubic"
    if data_config.get("crop_mode", "center") != "center":
        logger.warning(
            "crop_mode %r is not supported; using a centre crop", data_config["crop_mode"]
        )
    return {
        "image_size": int(h),
        "crop_pct": float(data_config.get("crop_pct", 0.875)),
        "interpolation": interpolation,
        "mean": [float(m) for m in data_config["mean"]],
        "std": [float(s) for s in data_config["std"]],
    }


def val_dataset(split: datasets.Dataset, settings: dict[str, Any]) -> RobustEvalDataset:
    """``split`` with the evaluation transform: Resize(S / crop_pct) + CenterCrop(S) + Normalize."""
    t = eval_transform(
        settings["image_size"],
        mean=settings["mean"],
        std=settings["std"],
        crop_pct=settings["crop_pct"],
        interpolation=settings["interpolation"],
    )
    return RobustEvalDataset(split, t)


# --------------------------------------------------------------------------- features


def make_accelerator() -> Accelerator:
    """An Accelerator for evaluation: one gloo group for several CPU processes, no trackers."""
    from datetime import timedelta

    # Several processes without CUDA only form one gloo group when told to use the CPU.
    distributed_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=distributed_cpu,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=_COLLECTIVE_TIMEOUT_S))],
    )


def eval_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """An in-order loader (shard it with ``accelerator.prepare``)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, digest: str, rows: int) -> tuple[Tensor, Tensor] | None:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != digest:
                return None
            feats, labels = f.get_tensor("features"), f.get_tensor("labels")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # truncated or foreign
        logger.warning("ignoring unreadable feature cache %s: %s", path, e)
        return None
    if feats.shape[0] != rows or labels.shape != (rows,):
        return None
    return feats, labels


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extract_cached(
    model: nn.Module,
    dataset,
    *,
    key: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    accelerator: Accelerator,
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[Tensor, Tensor, bool]:
    """L2-normalised features of a labelled data set, extracted once and cached on disk.

    The cache file ``<cache_dir>/<sha256(key)[:32]>.safetensors`` holds ``features`` (N, D)
    float32 and ``labels`` (N,) int64, and the key as JSON metadata; it is written atomically
    by the main process. Extraction is sharded over the processes and gathered
    (``gather_for_metrics``), so every process returns the whole set once.

    Args:
        model: Maps images (B, 3, S, S) to features (B, D); on ``accelerator.device``.
        dataset: Map-style data set of ``{"image", "label"}`` items.
        key: What determines the features (weights fingerprint, data, split, transform);
            JSON-serialisable.
        cache_dir: Cache directory; None disables the cache.
        accelerator: Places the batches and shards the loader.
        batch_size: Images per batch and process.
        workers: Loader worker processes.

    Returns:
        ``(features, labels, hit)``: CPU tensors (N, D) and (N,), and whether the cache
        answered (the model was not run).
    """
    digest = _digest({"format": _CACHE_FORMAT, **key})
    path = Path(cache_dir) / f"{digest[:32]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _read_cache(path, digest, len(dataset))
        if cached is not None:
            logger.info("features: cache hit %s", path)
            return cached[0], cached[1], True
    loader = accelerator.prepare(eval_loader(dataset, batch_size, workers))
    feats, labels = extract_features(
        model,
        loader,
        device=accelerator.device,
        gather=accelerator.gather_for_metrics,
        autocast=accelerator.autocast,
    )
    accelerator.free_memory(loader)
    if feats.shape[0] != len(dataset):
        raise RuntimeError(f"extracted {feats.shape[0]} features for {len(dataset)} images")
    if path is not None and accelerator.is_main_process:
        meta = {"key": digest, "meta": json.dumps(key, sort_keys=True), "format": "pt"}
        tensors = {"features": feats.contiguous(), "labels": labels.contiguous()}
        _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        logger.info("features: cached %s", path)
    accelerator.wait_for_everyone()
    return feats, labels, False


# --------------------------------------------------------------------------- probe


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (strong-Wolfe line search).

    Minimises ``mean_i CE(x_i W^T + b, y_i) + l2 / 2 * ||W||^2`` (the bias is not penalised).

    Args:
        x: Features (N, D), on the device to compute on.
        y: Labels (N,) in [0, C).
        num_classes: C.
        l2: L2 strength >= 0.
        max_iter: L-BFGS iterations.
        init: Warm start ``(W (C, D), b (C,))``.

    Returns:
        ``(W, b)``: weights (C, D) and bias (C,), detached.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = x.float()
    y = y.to(x.device).long()
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w, b = init[0].detach().clone().to(x.device), init[1].detach().clone().to(x.device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _topk_correct(logits: Tensor, y: Tensor, topk: Sequence[int]) -> dict[str, float]:
    """Top-k accuracies (percent) of logits (N, C) against labels (N,); k clipped to C."""
    ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices  # (N, kmax)
    hits = ranked == y.to(ranked.device)[:, None]
    return {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / y.numel() for k in topk}


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = PROBE_L2_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Fast linear probe: logistic regression on frozen features with a small L2 sweep.

    Features are standardised with the mean and std of the training features. Each L2 value
    (strongest first, each warm-starting the next) is fitted on a seeded random
    ``1 - holdout_fraction`` of the training set and scored (top-1) on the rest; the best one
    (the strongest on ties) is refitted on the whole training set and scored on ``val``.

    Full-batch L-BFGS in torch rather than scikit-learn's ``LogisticRegression``: the same
    code runs on the GPU, where ImageNet-size feature sets (1.28M x 2048, 1000 classes) take
    seconds per sweep value instead of the hours of a CPU solver, with no NumPy round trip,
    and it is deterministic for a given device.

    Args:
        train_x: Training features (N, D).
        train_y: Training labels (N,).
        val_x: Held-out features (M, D).
        val_y: Held-out labels (M,).
        num_classes: C.
        l2_grid: L2 strengths to try.
        holdout_fraction: Part of the training set held out to choose L2, in (0, 1).
        seed: Seed of the hold-out split.
        max_iter: L-BFGS iterations per fit.
        device: Where to compute; the features' device by default.

    Returns:
        ``{"top1", "top5", "l2", "holdout_top1": {l2: acc}, "weight" (C, D), "bias" (C,),
        "mean" (D,), "std" (D,)}``, accuracies in percent.

    Raises:
        ValueError: For an empty grid, a bad fraction or too few training samples.
    """
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n = train_x.shape[0]
    n_hold = int(round(holdout_fraction * n))
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"{n} training samples are too few to hold {holdout_fraction:.0%} out")
    device = torch.device(device) if device is not None else train_x.device
    x, y = train_x.to(device).float(), train_y.to(device).long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # (D,), (D,)
    x = (x - mean) / std
    xv = (val_x.to(device).float() - mean) / std
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    fit, hold = perm[n_hold:], perm[:n_hold]
    scores: dict[float, float] = {}
    solutions: dict[float, tuple[Tensor, Tensor]] = {}
    init = None
    for l2 in sorted(l2_grid, reverse=True):
        init = fit_logistic_regression(
            x[fit], y[fit], num_classes=num_classes, l2=l2, max_iter=max_iter, init=init
        )
        solutions[l2] = init
        scores[l2] = _topk_correct(torch.addmm(init[1], x[hold], init[0].T), y[hold], (1,))["top1"]
    best = max(sorted(scores, reverse=True), key=lambda v: scores[v])  # ties: stronger L2
    w, b = fit_logistic_regression(
        x, y, num_classes=num_classes, l2=best, max_iter=max_iter, init=solutions[best]
    )
    acc = _topk_correct(torch.addmm(b, xv, w.T), val_y.to(device), (1, 5))
    return {
        **acc,
        "l2": best,
        "holdout_top1": scores,
        "weight": w.cpu(),
        "bias": b.cpu(),
        "mean": mean.cpu(),
        "std": std.cpu(),
    }


# --------------------------------------------------------------------------- results


def _rows(data: EvalData, protocol: str, acc: dict[str, float], settings: dict) -> list[dict]:
    return [
        {
            "dataset": data.name,
            "split": data.val_split,
            "protocol": protocol,
            "metric": metric,
            "value": round(float(acc[metric]), 4),
            "settings": settings,
        }
        for metric in ("top1", "top5")
    ]


def write_results(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write result rows as a JSON list, atomically (``mochi-hub export --eval-results``)."""
    path = Path(path)
    text = json.dumps(rows, indent=2) + "\n"
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def format_results(rows: list[dict]) -> str:
    """A plain-text table of result rows: data set, split, protocol, metric, value."""
    head = ("dataset", "split", "protocol", "metric", "value")
    body = [
        (
            str(r["dataset"]),
            str(r["split"]),
            str(r["protocol"]),
            str(r["metric"]),
            f"{r['value']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- entry point


def _feature_protocol(
    model: nn.Module,
    data: EvalData,
    settings: dict[str, Any],
    *,
    protocol: str,
    key: dict[str, Any],
    cache_dir: Path | None,
    accelerator: Accelerator,
    batch_size: int,
    workers: int,
    knn_k: int,
    knn_t: float,
    probe_l2: Sequence[float],
    seed: int,
) -> list[dict] | None:
    kw = dict(cache_dir=cache_dir, accelerator=accelerator, batch_size=batch_size, workers=workers)
    ident = {k: v for k, v in key.items() if k != "backbone"}  # the same weights, any spelling
    train_key = {**ident, "split": data.train_split, "data": data.train._fingerprint}
    val_key = {**ident, "split": data.val_split, "data": data.val._fingerprint}
    bank = extract_cached(model, val_dataset(data.train, settings), key=train_key, **kw)
    query = extract_cached(model, val_dataset(data.val, settings), key=val_key, **kw)
    common = {
        **{k: key[k] for k in ("backbone", "weights_sha256")},
        **settings,
        "train_split": data.train_split,
        "train_images": int(bank[0].shape[0]),
        "val_images": int(query[0].shape[0]),
        "subset_seed": data.subset_seed,
        "mochi_hub_version": __version__,
    }
    if not accelerator.is_main_process:
        return None
    device = accelerator.device
    if protocol == "knn":
        acc = knn_accuracy(
            bank[0].to(device),
            bank[1].to(device),
            query[0].to(device),
            query[1].to(device),
            num_classes=data.num_classes,
            k=knn_k,
            temperature=knn_t,
        )
        return _rows(data, "knn", acc, {**common, "k": knn_k, "temperature": knn_t})
    res = linear_probe(
        *bank[:2], *query[:2], num_classes=data.num_classes, l2_grid=probe_l2,
        holdout_fraction=PROBE_HOLDOUT, seed=seed, device=device,
    )  # fmt: skip
    extra = {
        "l2": res["l2"],
        "l2_grid": sorted(probe_l2),
        "holdout_fraction": PROBE_HOLDOUT,
        "holdout_top1": {f"{k:g}": round(v, 4) for k, v in sorted(res["holdout_top1"].items())},
        "solver": "lbfgs",
        "standardized": True,
        "seed": seed,
    }
    return _rows(data, "probe", res, {**common, **extra})


def evaluate(
    spec: str | os.PathLike,
    source: str,
    *,
    protocol: str = "knn",
    train_split: str = "train",
    val_split: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    output_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    knn_k: int = 200,
    knn_t: float = 0.07,
    probe_l2: Sequence[float] = PROBE_L2_GRID,
    linear: Any | None = None,
    resume: str | None = "auto",
    max_steps: int | None = None,
    max_train_images: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 4,
    backbone: tuple[nn.Module, dict[str, Any]] | None = None,
    accelerator: Accelerator | None = None,
) -> list[dict]:
    """Evaluate a backbone on a labelled data set with one protocol and write the result rows.

    Args:
        spec: The backbone (see :func:`load_backbone`); also names it in the rows.
        source: The data (see :func:`load_eval_data`).
        protocol: ``knn`` (weighted kNN on cached features), ``probe`` (logistic regression on
            cached features, :func:`linear_probe`) or ``linear`` (the MoCo linear protocol on
            augmented images, :func:`mochi_hub.linear.train_linear`).
        train_split: Training split.
        val_split: Held-out split (default: see :func:`load_eval_data`).
        image_column: Image column; detected when None.
        label_column: Label column.
        output_dir: Results, feature cache and linear checkpoints; default
            :func:`default_output_dir`.
        out: Results JSON; default ``<output_dir>/eval_<protocol>.json``.
        cache_dir: Feature cache; default ``<output_dir>/features``.
        use_cache: Read and write the feature cache.
        knn_k: Neighbours of the kNN classifier.
        knn_t: Temperature of its vote weights.
        probe_l2: L2 strengths swept by the probe.
        linear: A :class:`mochi_hub.linear.LinearSettings` (default: the ``in1k`` preset).
        resume: Linear protocol: ``auto``, a checkpoint directory, or None.
        max_steps: Linear protocol: stop after this many optimiser steps.
        max_train_images: Cap on the training images (a seeded subset).
        seed: Seed of the subset, the probe's hold-out split and the linear run.
        batch_size: Images per batch and process for feature extraction and validation.
        workers: Loader worker processes.
        backbone: An already loaded ``(model, data_config)`` used instead of loading ``spec``.
        accelerator: An Accelerator; one is made (and ended) otherwise.

    Returns:
        Rows ``{"dataset", "split", "protocol", "metric", "value", "settings"}`` (top-1 and
        top-5 in percent), identical on every process; the main process wrote them to ``out``.

    Raises:
        ValueError: For an unknown protocol, backbone or bad data.
        FileNotFoundError: For a missing backbone directory.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if knn_k < 1 or knn_t <= 0:
        raise ValueError(f"knn_k must be >= 1 and knn_t > 0, got {knn_k}, {knn_t}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    model, data_config = backbone if backbone is not None else load_backbone(spec)
    settings = transform_settings(data_config)
    data = load_eval_data(
        source,
        image_size=settings["image_size"],
        train_split=train_split,
        val_split=val_split,
        image_column=image_column,
        label_column=label_column,
        max_train_images=max_train_images,
        seed=seed,
    )
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(spec)
    out = Path(out) if out is not None else output_dir / f"eval_{protocol}.json"
    cache = (Path(cache_dir) if cache_dir else output_dir / "features") if use_cache else None
    own = accelerator is None
    accelerator = accelerator or make_accelerator()
    model = model.to(accelerator.device).eval()
    fingerprint = weights_fingerprint(model)
    key = {
        "backbone": backbone_name(spec),  # provenance only: not part of the cache key
        "weights_sha256": fingerprint,
        "source": data.source,
        "transform": settings,
        "image_column": image_column,
        "label_column": label_column,
    }
    if protocol == "linear":
        from mochi_hub.linear import run_linear

        rows = run_linear(
            model,
            data,
            settings,
            key=key,
            linear=linear,
            output_dir=output_dir,
            accelerator=accelerator,
            resume=resume,
            max_steps=max_steps,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
        )
    else:
        rows = _feature_protocol(
            model, data, settings, protocol=protocol, key=key, cache_dir=cache,
            accelerator=accelerator, batch_size=batch_size, workers=workers, knn_k=knn_k,
            knn_t=knn_t, probe_l2=probe_l2, seed=seed,
        )  # fmt: skip
    if accelerator.num_processes > 1:  # the main process computed them
        box = [rows]
        broadcast_object_list(box, from_process=0)
        rows = box[0]
    if accelerator.is_main_process:
        write_results(rows, out)
        logger.info("results: %s", out)
    accelerator.wait_for_everyone()
    if own:
        accelerator.end_training()
    return rows
