"""Typed training configuration: defaults here, recipes as YAML deltas, dotted CLI overrides last.

Only the training engine reads this tree; library modules take explicit arguments. Unknown keys
and wrong types are errors that name the key (and the nearest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MixingConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_to_dict",
    "find_recipe",
    "load_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration schema."""


@dataclass
class ModelConfig:
    """The contrastive model.

    Attributes:
        method: ``mocov2`` (queue of negatives) or ``mocov3`` (in-batch negatives, predictor).
        arch: timm architecture of the backbone.
        backbone_kwargs: Extra keyword arguments for ``timm.create_model``.
        proj_dim: Embedding dimension (128 for MoCo-v2, 256 for MoCo-v3).
        proj_hidden_dim: MoCo-v2 head hidden width; the backbone width when null.
        proj_layers: MoCo-v3 projector depth (3 for ViT, 2 for ResNet).
        hidden_dim: MoCo-v3 projector/predictor hidden width.
        pred_last_bn: MoCo-v3 predictor ends with BatchNorm (ViT) or not (ResNet).
        queue_size: MoCo-v2 queue size K.
        temperature: InfoNCE temperature T.
        momentum: Key-encoder momentum m (the start value for the cosine schedule).
        momentum_schedule: ``constant`` (MoCo-v2) or ``cosine`` ramp to 1 (MoCo-v3).
        channels_last: Use channels-last memory format (CNNs on GPU).
        compile: Wrap the model with ``torch.compile``.
        shuffle_bn: MoCo-v2 shuffle-BN across processes for the key encoder (several processes).
        key_bn_splits: Encode the (shuffled) key batch in this many chunks with separate
            BatchNorm statistics; the single-process guard against BatchNorm cheating.
        sync_bn: Convert BatchNorm to SyncBatchNorm (several GPUs; MoCo-v3 uses it).
    """

    method: Literal["mocov2", "mocov3"] = "mocov2"
    arch: str = "resnet50"
    backbone_kwargs: dict = field(default_factory=dict)
    proj_dim: int = 128
    proj_hidden_dim: int | None = None
    proj_layers: int = 2
    hidden_dim: int = 4096
    pred_last_bn: bool = False
    queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    channels_last: bool = True
    compile: bool = False
    shuffle_bn: bool = True
    key_bn_splits: int = 1
    sync_bn: bool = False


@dataclass
class MixingConfig:
    """MoCHi (N, s, s').

    Attributes:
        enabled: Turn hard negative mixing on (off gives the MoCo baseline).
        num_hard: N, hardest negatives per query.
        num_synthetic: s, points mixed from pairs of hard negatives.
        num_synthetic_query: s', points mixed from the query and a hard negative.
        max_beta: Upper bound of the query weight in query mixing, in (0, 0.5].
        start_epoch: Warm-up: mixing starts at this epoch (0-based).
        impl: ``fused`` (closed form) or ``explicit`` (materialised reference).
        oracle: Class-oracle training (the paper's analysis): negatives of the query's own
            class are masked before the hard-negative selection. Needs labelled training data.
    """

    enabled: bool = True
    num_hard: int = 1024
    num_synthetic: int = 512
    num_synthetic_query: int = 256
    max_beta: float = 0.5
    start_epoch: int = 15
    impl: Literal["fused", "explicit"] = "fused"
    oracle: bool = False


@dataclass
class DataConfig:
    """Training and evaluation data.

    Attributes:
        source: ``digits`` (built-in), a local image folder, Parquet file(s) (file, directory
            or glob), or a Hugging Face Hub data set id (``uoft-cs/cifar10``).
        split: Training split.
        image_column: Image column; detected when null (``image``, ``img``, ...).
        label_column: Label column (used by the kNN monitor); null for unlabelled data.
        class_subset: Keep only these class names; ``imagenet100`` is the CMC subset of
            ImageNet-1k used by the MoCHi paper.
        streaming: Stream the training split instead of downloading it first (Hub data sets
            too large for the disk; local Parquet and image folders stream too). The kNN
            monitor still loads ``eval_source`` (default: the training source) in full.
        streaming_size: Number of training images of a streamed split, when its metadata does
            not say; an epoch is ``streaming_size // batch_size`` steps.
        shuffle_buffer: Shuffle buffer of a streamed split (0: stream order).
        max_corrupt: Stop when more corrupt images were skipped than this; null: never.
        eval_source: Labelled source of the kNN monitor; the training source when null.
        eval_train_split: Split whose features form the kNN memory bank.
        eval_split: Split the kNN monitor classifies; no monitor when null.
        image_size: Side of the training crops.
        augmentation: Two-view preset (``mocov2``, ``mocov3``, ``mocov2_small``, ``mocov3_small``).
        augmentation_overrides: Fields of both views to override (``hflip_p``, ``crop_scale``...).
        batch_size: Global batch size (all processes together).
        num_workers: Data-loader worker processes per training process.
        mean: Normalisation mean.
        std: Normalisation standard deviation.
    """

    source: str = "digits"
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = "label"
    class_subset: str | list | None = None
    streaming: bool = False
    streaming_size: int | None = None
    shuffle_buffer: int = 10000
    max_corrupt: int | None = None
    eval_source: str | None = None
    eval_train_split: str = "train"
    eval_split: str | None = "test"
    image_size: int = 224
    augmentation: str = "mocov2"
    augmentation_overrides: dict = field(default_factory=dict)
    batch_size: int = 256
    num_workers: int = 4
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def eval_crop_pct(self) -> float:
        """Centre-crop fraction of evaluation: the built-in digits are already image_size."""
        return 1.0 if self.source == "digits" else 0.875


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``sgd``, ``lars`` or ``adamw`` (timm.optim).
        base_lr: Learning rate at batch 256; the run uses ``base_lr * batch_size / 256``.
        weight_decay: Weight decay.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        exclude_bias_and_norm: No weight decay for biases and normalisation parameters.
        schedule: ``cosine`` (half cosine to ``min_lr``) or ``constant``.
        schedule_unit: ``epoch`` (MoCo-v2 updates per epoch) or ``step``.
        warmup_epochs: Linear warm-up length in epochs.
        min_lr: Final learning rate of the cosine.
        clip_grad: Gradient-norm clipping threshold; null for none.
    """

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    base_lr: float = 0.03
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    exclude_bias_and_norm: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    schedule_unit: Literal["epoch", "step"] = "epoch"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    clip_grad: float | None = None


@dataclass
class EvalConfig:
    """Weighted kNN evaluation on a labelled split.

    Attributes:
        knn_k: Neighbours.
        knn_temperature: Temperature of the neighbour weights.
        every_epochs: Run the kNN monitor every n epochs (0: only at the end).
        at_start: Also evaluate the randomly initialised backbone before training.
        at_end: Evaluate after training.
        max_train_images: Cap on the kNN memory bank (a fixed, seeded subset); null: all.
        batch_size: Batch size of feature extraction, per process.
        analysis_top: Window of hardest negatives for the training analysis: the hardness
            profile (``analysis.jsonl``, per epoch) and, with labelled training data, the
            share of same-class negatives in it (0: off).
    """

    knn_k: int = 200
    knn_temperature: float = 0.07
    every_epochs: int = 0
    at_start: bool = True
    at_end: bool = True
    max_train_images: int | None = None
    batch_size: int = 256
    analysis_top: int = 1024


@dataclass
class TrainConfig:
    """Run-level settings.

    Attributes:
        epochs: Number of epochs.
        max_steps: Stop after this many optimiser steps (for smoke tests); null for all.
        seed: Base random seed.
        output_dir: Run directory; ``runs/<recipe name>`` when null.
        log_every: Log metrics and refresh the progress bar every n steps.
        checkpoint_every_epochs: Save a checkpoint every n epochs (0: only at the end).
        checkpoint_every_steps: Also save every n optimiser steps (0: off).
        resume: ``auto`` (newest complete checkpoint of the run directory, if any), a
            checkpoint directory, or null (start afresh).
        keep_checkpoints: Number of most recent checkpoints kept.
        log_with: Accelerate trackers (``auto``: TensorBoard if installed; ``none``; or a
            comma-separated list such as ``tensorboard,wandb``).
    """

    epochs: int = 200
    max_steps: int | None = None
    seed: int = 0
    output_dir: str | None = None
    log_every: int = 10
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    resume: str | None = "auto"
    keep_checkpoints: int = 2
    log_with: str = "auto"


@dataclass
class Config:
    """The whole training configuration."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check cross-field constraints before any data is read.

        Raises:
            ConfigError: Naming the offending key.
        """
        m, x, d, t, o = self.model, self.mixing, self.data, self.train, self.optim
        positive = {
            "model.proj_dim": m.proj_dim,
            "model.queue_size": m.queue_size,
            "model.hidden_dim": m.hidden_dim,
            "model.proj_layers": m.proj_layers,
            "model.key_bn_splits": m.key_bn_splits,
            "model.temperature": m.temperature,
            "data.image_size": d.image_size,
            "data.batch_size": d.batch_size,
            "train.epochs": t.epochs,
            "train.log_every": t.log_every,
            "optim.base_lr": o.base_lr,
            "eval.knn_k": self.eval.knn_k,
            "eval.knn_temperature": self.eval.knn_temperature,
        }
        if not _RUN_NAME.fullmatch(self.name) or ".." in self.name:
            raise ConfigError(
                f"name must be a plain directory name (letters, digits, '.', '_', '-'; it names "
                f"runs/<name>), got {self.name!r}"
            )
        for key, value in positive.items():
            if not value > 0 or not math.isfinite(value):  # NaN fails every comparison
                raise ConfigError(f"{key} must be > 0, got {value}")
        non_negative = {
            "mixing.num_hard": x.num_hard,
            "mixing.num_synthetic": x.num_synthetic,
            "mixing.num_synthetic_query": x.num_synthetic_query,
            "mixing.start_epoch": x.start_epoch,
            "data.num_workers": d.num_workers,
            "optim.weight_decay": o.weight_decay,
            "optim.warmup_epochs": o.warmup_epochs,
            "train.checkpoint_every_epochs": t.checkpoint_every_epochs,
            "train.checkpoint_every_steps": t.checkpoint_every_steps,
            "eval.every_epochs": self.eval.every_epochs,
            "eval.analysis_top": self.eval.analysis_top,
        }
        for key, value in non_negative.items():
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if t.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")
        if not 0.0 <= m.momentum <= 1.0:
            raise ConfigError(f"model.momentum must be in [0, 1], got {m.momentum}")
        if not 0.0 < x.max_beta <= 0.5:
            raise ConfigError(f"mixing.max_beta must be in (0, 0.5], got {x.max_beta}")
        if x.oracle and d.label_column is None:
            raise ConfigError("mixing.oracle needs labelled training data: set data.label_column")
        if x.oracle and d.streaming:
            raise ConfigError("mixing.oracle is not available with data.streaming=true")
        if x.enabled and x.num_synthetic + x.num_synthetic_query > 0:
            if x.num_hard < 1:
                raise ConfigError("mixing.num_hard must be >= 1 when mixing is enabled")
            if m.method == "mocov2" and x.num_hard > m.queue_size:
                raise ConfigError(
                    f"mixing.num_hard ({x.num_hard}) is larger than model.queue_size "
                    f"({m.queue_size}): N hardest negatives are picked from the queue"
                )
            if m.method == "mocov3" and x.num_hard > d.batch_size - 1:
                raise ConfigError(
                    f"mixing.num_hard ({x.num_hard}) is larger than the in-batch negatives "
                    f"of MoCo-v3 (data.batch_size - 1 = {d.batch_size - 1})"
                )
        if m.method == "mocov2" and m.queue_size < d.batch_size:
            raise ConfigError(
                f"model.queue_size ({m.queue_size}) is smaller than the global batch "
                f"data.batch_size ({d.batch_size})"
            )
        if d.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
        if d.streaming_size is not None and d.streaming_size < d.batch_size:
            raise ConfigError(
                f"data.streaming_size ({d.streaming_size}) is smaller than data.batch_size "
                f"({d.batch_size}): no full batch can be formed"
            )
        if d.max_corrupt is not None and d.max_corrupt < 0:
            raise ConfigError(f"data.max_corrupt must be >= 0 or null, got {d.max_corrupt}")
        if self.eval.max_train_images is not None and self.eval.max_train_images < 1:
            raise ConfigError("eval.max_train_images must be >= 1 or null")
        if self.eval.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.eval.batch_size}")
        if isinstance(d.class_subset, list) and not all(isinstance(c, str) for c in d.class_subset):
            raise ConfigError("data.class_subset must be 'imagenet100' or a list of class names")
        if not math.isfinite(o.min_lr) or o.min_lr < 0:
            raise ConfigError(f"optim.min_lr must be >= 0, got {o.min_lr}")
        if o.clip_grad is not None and (not o.clip_grad > 0 or not math.isfinite(o.clip_grad)):
            raise ConfigError(f"optim.clip_grad must be > 0 or null, got {o.clip_grad}")

    def check_world_size(self, world_size: int | None = None) -> None:
        """Check that the global batch splits evenly over ``world_size`` processes.

        Args:
            world_size: Number of processes; by default the launcher's ``WORLD_SIZE``
                environment variable (``accelerate launch``, ``torchrun``, Slurm through them),
                so the check runs before any process group or device is set up.
        """
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.data.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size ({self.data.batch_size}) is not divisible by the number of "
                f"processes ({world_size})"
            )
        per_process = self.data.batch_size // world_size
        if per_process < 2 * self.model.key_bn_splits:
            raise ConfigError(
                f"model.key_bn_splits ({self.model.key_bn_splits}) leaves fewer than 2 images "
                f"per BatchNorm chunk of the per-process batch ({per_process})"
            )


# --------------------------------------------------------------------------- parsing


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], name + ".")
    return keys


def _unknown_key(key: str) -> ConfigError:
    valid = _all_keys(Config)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # try the leaf name alone, e.g. "num_hrad" -> "mixing.num_hard"
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        near = [by_leaf[close[0]]] if close else []
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(
            f"override '{item}' must have the form key=value (e.g. mixing.num_hard=128)"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse the value ({_yaml_problem(e)})") from e
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def find_recipe(recipe: str | Path) -> Path:
    """Resolve a recipe path, or a bare recipe name shipped with the package.

    Args:
        recipe: ``recipes/quickstart.yaml``, any YAML path, or a name such as ``quickstart``.

    Returns:
        An existing file.

    Raises:
        ConfigError: If nothing matches; lists the shipped recipes.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = Path(__file__).parent / "recipes"
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    if (shipped / name).is_file():
        return shipped / name
    available = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise ConfigError(f"recipe '{recipe}' not found; shipped recipes: {', '.join(available)}")


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a recipe's YAML delta, then ``key=value`` overrides; validated.

    Args:
        recipe: A recipe file or shipped recipe name; defaults only when None.
        overrides: Dotted ``key=value`` strings; values are parsed as YAML.

    Returns:
        The resolved configuration.

    Raises:
        ConfigError: On an unknown key, a wrong type or an invalid value; the key is named.
    """
    cfg = Config()
    if recipe is not None:
        path = find_recipe(recipe)
        try:
            delta = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path}: invalid YAML ({_yaml_problem(e)})") from e
        if not isinstance(delta, dict):
            raise ConfigError(f"recipe {path} must be a mapping of config sections")
        delta.setdefault("name", path.stem)
        _apply(cfg, delta)
    for item in overrides or []:
        _apply(cfg, _parse_override(item))
    cfg.validate()
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML and trackers."""

    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))
