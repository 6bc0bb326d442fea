"""The pretraining engine: the only module that reads the config tree.

One code path for one CPU, one GPU and many processes or nodes: Accelerate places tensors,
wraps the model for DDP and runs mixed precision; the engine makes the state changes (momentum
update, enqueue) explicitly and in order after each optimiser step.

A run is resumable at any step: checkpoints (``accelerator.save_state`` plus the trainer state)
are written under a temporary name and renamed once complete, the data order and every
augmentation are functions of ``(seed, epoch, index)``, and MoCHi's and shuffle-BN's generators
are checkpointed, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker
from accelerate.utils import InitProcessGroupKwargs, send_to_device, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mochi_hub import __version__
from mochi_hub.config import Config, ConfigError, config_to_dict
from mochi_hub.data import (
    IMAGENET100_CLASSES,
    RobustEvalDataset,
    RobustTwoViewDataset,
    check_corrupt_budget,
    eval_transform,
    load_image_source,
    two_view_transform,
)
from mochi_hub.data.sampling import EpochSampler, SeededDataset, StreamingViews
from mochi_hub.distributed import gather_no_grad
from mochi_hub.fsutil import replace_dir
from mochi_hub.knn import extract_features, knn_accuracy
from mochi_hub.losses import (
    ContrastiveOutput,
    MixingSpec,
    contrastive_diagnostics,
    false_negative_mask,
    false_negative_share,
    hardness_profile,
    moco_v2_loss,
    moco_v3_loss,
)
from mochi_hub.metrics import alignment, uniformity
from mochi_hub.moco import MoCoV2, MoCoV3, create_backbone, momentum_cosine

__all__ = [
    "PretrainResult",
    "build_model",
    "build_optimizer",
    "find_checkpoint",
    "load_generators",
    "pretrain",
    "save_checkpoint",
    "train_step",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
RNG_STATE_PREFIX = "rng_state_"
# A rank that dies leaves the others blocked in a collective; they give up after this long.
COLLECTIVE_TIMEOUT_S = int(os.environ.get("MOCHI_HUB_COLLECTIVE_TIMEOUT", "1800"))


# --------------------------------------------------------------------------- builders


def build_model(cfg: Config, *, queue_labels: bool = False) -> MoCoV2 | MoCoV3:
    """The MoCo-v2 or MoCo-v3 model of a configuration (random initialisation).

    Args:
        cfg: The configuration.
        queue_labels: MoCo-v2's queue also keeps its keys' class labels (analysis, oracle).
    """
    m = cfg.model
    backbone = create_backbone(m.arch, **dict(m.backbone_kwargs))
    if m.method == "mocov2":
        return MoCoV2(
            backbone,
            proj_dim=m.proj_dim,
            proj_hidden_dim=m.proj_hidden_dim,
            queue_size=m.queue_size,
            queue_labels=queue_labels,
        )
    return MoCoV3(
        backbone,
        proj_layers=m.proj_layers,
        hidden_dim=m.hidden_dim,
        dim=m.proj_dim,
        pred_last_bn=m.pred_last_bn,
    )


def _class_subset(cfg: Config) -> list[str] | None:
    subset = cfg.data.class_subset
    if subset is None:
        return None
    if isinstance(subset, str):
        if subset.lower() != "imagenet100":
            raise ConfigError(
                f"data.class_subset '{subset}' is unknown: use 'imagenet100' or a list of names"
            )
        return list(IMAGENET100_CLASSES)
    return list(subset)


def _load(cfg: Config, source: str, split: str, label_column: str | None, streaming=False):
    d = cfg.data
    try:
        return load_image_source(
            source,
            split=split,
            image_column=d.image_column,
            label_column=label_column,
            streaming=streaming,
            class_subset=_class_subset(cfg),
            image_size=d.image_size,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data source '{source}' (split '{split}'): {e}") from e


@dataclass
class _Data:
    train: Any  # map-style RobustTwoViewDataset, or a StreamingViews
    knn_bank: Any | None
    knn_query: Any | None
    stream_size: int | None = None  # images of a streamed training split


def _stream_size(cfg: Config, stream) -> int:
    if cfg.data.streaming_size is not None:
        return cfg.data.streaming_size
    splits = getattr(getattr(stream, "info", None), "splits", None) or {}
    split = splits.get(cfg.data.split) if hasattr(splits, "get") else None
    if split is not None and getattr(split, "num_examples", 0):
        return int(split.num_examples)
    raise ConfigError(
        "data.streaming_size is needed: the streamed split does not say how many images it "
        "holds (an epoch is data.streaming_size // data.batch_size steps)"
    )


def build_data(cfg: Config, *, rank: int = 0, world_size: int = 1) -> _Data:
    """Training set (two views) and the kNN monitor's labelled splits; fails fast on bad data."""
    d = cfg.data
    views = two_view_transform(
        d.augmentation, d.image_size, mean=d.mean, std=d.std, **d.augmentation_overrides
    )
    stream_size = None
    if d.streaming:
        stream = _load(cfg, d.source, d.split, None, streaming=True)
        stream_size = _stream_size(cfg, stream)
        if stream_size < d.batch_size:
            raise ConfigError(
                f"data.batch_size ({d.batch_size}) is larger than the streamed training split "
                f"({stream_size} images)"
            )
        train = StreamingViews(
            stream,
            views,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=d.shuffle_buffer,
        )
    else:
        # Labels ride along only for the class-oracle analysis and training mode.
        rows = None
        if _wants_labels(cfg):
            try:
                rows = _load(cfg, d.source, d.split, d.label_column)
            except ConfigError:
                if cfg.mixing.oracle:
                    raise
        labelled = rows is not None
        rows = rows if labelled else _load(cfg, d.source, d.split, None)
        train = RobustTwoViewDataset(rows, views, label_column="label" if labelled else None)
        if len(train) < d.batch_size:
            raise ConfigError(
                f"data.batch_size ({d.batch_size}) is larger than the training set "
                f"({len(train)} images): no full batch can be formed"
            )
    bank = query = None
    if d.eval_split is not None and d.label_column is not None:
        plain = eval_transform(d.image_size, mean=d.mean, std=d.std, crop_pct=d.eval_crop_pct)
        source = d.eval_source or d.source
        bank = RobustEvalDataset(_load(cfg, source, d.eval_train_split, d.label_column), plain)
        query = RobustEvalDataset(_load(cfg, source, d.eval_split, d.label_column), plain)
        cap = cfg.eval.max_train_images
        if cap is not None and cap < len(bank):
            g = torch.Generator().manual_seed(cfg.train.seed)
            bank = Subset(bank, torch.randperm(len(bank), generator=g)[:cap].tolist())
    return _Data(train, bank, query, stream_size)


def _wants_labels(cfg: Config) -> bool:
    """Whether training batches carry class labels (class-oracle analysis or training)."""
    d = cfg.data
    wanted = cfg.mixing.oracle or cfg.eval.analysis_top > 0
    return wanted and d.label_column is not None and not d.streaming


def _trackers(cfg: Config, run_dir: Path) -> list:
    trackers: list = [JsonlTracker(run_dir)]
    choice = cfg.train.log_with.strip().lower()
    if choice == "auto":
        try:
            import tensorboard  # noqa: F401

            trackers.append("tensorboard")
        except ImportError:
            pass
    elif choice not in ("", "none"):
        trackers += [t.strip() for t in choice.split(",") if t.strip()]
    return trackers


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per logged step to ``metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None

    @property
    def tracker(self):  # noqa: D102
        return self._file

    def store_init_configuration(self, values: dict) -> None:  # noqa: D102
        pass  # the resolved config is written to config.yaml

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:  # noqa: D102
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
        self._file.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self) -> None:  # noqa: D102
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory (or None).

    Directories without the completeness marker (a save that was interrupted) are ignored.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    done = [p for p in root.glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=_checkpoint_step) if done else None


def _rng_file(rank: int) -> str:
    return f"{RNG_STATE_PREFIX}{rank}.safetensors"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    state: dict,
    keep: int,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Save ``accelerator``'s state as ``<run_dir>/checkpoints/step_XXXXXXXX``, atomically.

    Written under a temporary name, fsynced, marked complete and renamed; only the newest
    ``keep`` complete checkpoints are kept. ``state`` (with its ``step``) is written as
    ``trainer_state.json``. A save that fails removes its temporary directory; a successful one
    also removes what earlier interrupted saves left behind.

    Args:
        accelerator: The run's Accelerator (model, optimiser, per-rank RNG states).
        run_dir: The run directory.
        state: JSON-serialisable trainer state; must hold ``step``.
        keep: How many complete checkpoints to keep.
        generators: This rank's own ``torch.Generator`` objects by name, written by every rank
            to ``rng_state_<rank>.safetensors`` (tensors only, no pickle) and restored by
            :func:`load_generators`.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        # Accelerate's automatic checkpoint naming is not used, so its iteration counter (which
        # load_state does not restore) plays no part: the directory name is the global step.
        accelerator.save_state(str(tmp))
        if generators:
            states = {k: g.get_state() for k, g in generators.items()}
            save_file(states, str(tmp / _rng_file(accelerator.process_index)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)  # every file is on disk before the marker says so
            (tmp / COMPLETE_MARKER).write_text(__version__)
            _fsync_tree(tmp / COMPLETE_MARKER, recursive=False)
            _fsync_tree(tmp, recursive=False)
            replace_dir(tmp, final)  # a checkpoint saved again replaces the old one in one step
            _fsync_tree(root, recursive=False)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never taken as valid: it has no marker
        raise
    if accelerator.is_main_process:
        done = sorted(
            (p for p in root.glob("step_*") if (p / COMPLETE_MARKER).exists()),
            key=_checkpoint_step,
        )
        for old in done[:-keep]:
            (old / COMPLETE_MARKER).unlink()  # invalid first: a killed prune leaves no "valid" half
            shutil.rmtree(old, ignore_errors=True)
        # Left by a save or a prune that was killed: temporary directories, and checkpoint
        # directories whose marker was already removed (a step_* directory only ever comes
        # into being marked, by the rename above).
        stale = [*root.glob(".tmp_step_*"), *root.glob(".step_*.old-*")]
        stale += [p for p in root.glob("step_*") if not (p / COMPLETE_MARKER).exists()]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_generators(checkpoint: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    """Restore this rank's generators saved by :func:`save_checkpoint`.

    Raises:
        RuntimeError: If the checkpoint has no state for this rank (it was saved by fewer
            processes) or not for every generator.
    """
    path = Path(checkpoint) / _rng_file(rank)
    if not path.is_file():
        raise RuntimeError(
            f"checkpoint {checkpoint} has no generator state for process {rank} ({path.name}): "
            "resume with the number of processes it was saved with"
        )
    try:
        states = load_file(str(path))
    except SafetensorError as e:
        raise RuntimeError(f"checkpoint {checkpoint}: {path.name} is not readable: {e}") from e
    missing = sorted(set(generators) - set(states))
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint}: {path.name} lacks generator(s) {missing}")
    for name, g in generators.items():
        g.set_state(states[name])


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    items = [*path.rglob("*"), path] if recursive else [path]
    for p in items:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _resume(
    accelerator: Accelerator,
    cfg: Config,
    run_dir: Path,
    generators: dict[str, torch.Generator] | None = None,
) -> tuple[Path | None, dict]:
    choice = cfg.train.resume
    if choice is None:
        return None, {}
    ckpt = find_checkpoint(run_dir) if choice == "auto" else Path(choice)
    if ckpt is None:
        return None, {}
    if not (ckpt / COMPLETE_MARKER).is_file():
        raise ConfigError(f"train.resume: {ckpt} is not a complete checkpoint")
    try:
        accelerator.load_state(str(ckpt))
    except (RuntimeError, KeyError, ValueError, OSError, SafetensorError) as e:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match this run's model or optimiser "
            f"(model.arch={cfg.model.arch}, method={cfg.model.method}): {e}"
        ) from e
    if generators:
        load_generators(ckpt, accelerator.process_index, generators)
    return ckpt, json.loads((ckpt / TRAINER_STATE).read_text())


# --------------------------------------------------------------------------- evaluation


def _knn_eval(accelerator: Accelerator, backbone: nn.Module, loaders, cfg: Config) -> dict:
    kw = dict(
        device=accelerator.device,
        gather=accelerator.gather_for_metrics,
        autocast=accelerator.autocast,
    )
    bank = extract_features(backbone, loaders[0], **kw)  # sharded, gathered: every image once
    query = extract_features(backbone, loaders[1], **kw)
    return knn_accuracy(*bank, *query, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)


# --------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    """What a finished run reports.

    Attributes:
        run_dir: The run directory.
        checkpoint: The last checkpoint directory.
        steps: Optimiser steps taken in total (including those before a resume).
        resumed_from: The checkpoint the run resumed from, if any.
        knn_init: kNN accuracies of the randomly initialised backbone (if evaluated).
        knn_final: kNN accuracies after training (if evaluated).
        corrupt_images: Corrupt images skipped (replaced) in training.
        wall_seconds: Wall time of this invocation.
    """

    run_dir: Path
    checkpoint: Path | None
    steps: int
    resumed_from: Path | None
    knn_init: dict[str, float] | None
    knn_final: dict[str, float] | None
    corrupt_images: int
    wall_seconds: float


def _epoch_batches(accelerator, loader, data: _Data, epoch: int, skip: int, steps: int):
    """The batches of one epoch after the first ``skip`` ones, on the device."""
    if data.stream_size is None:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        return
    data.train.set_epoch(epoch)
    batches = iter(loader)
    for i in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(
                f"process {accelerator.process_index} ran out of streamed data after {i} of "
                f"{steps} batches in epoch {epoch}: data.streaming_size is larger than the "
                "stream (each process needs streaming_size / processes images)"
            ) from None
        if i >= skip:  # batches seen before a resume are read again, not trained on
            yield send_to_device(batch, accelerator.device)


class _StepOutput(NamedTuple):
    loss: Tensor  # the loss to back-propagate
    first: ContrastiveOutput  # the (first) InfoNCE term, for the diagnostics
    q: Tensor  # (B, D) queries of the first view
    k: Tensor  # (B, D) their positive keys
    new_keys: Tensor | None  # this process's keys to enqueue (MoCo-v2), or None
    same_class: Tensor | None  # (B, C_real) same-class flags of the real logits, or None


def _contrastive_step(
    model: nn.Module,
    unwrapped: MoCoV2 | MoCoV3,
    v1: Tensor,
    v2: Tensor,
    cfg: Config,
    mixing: MixingSpec | None,
    mix_gen: torch.Generator,
    *,
    perm: Tensor | None,
    rank: int,
    labels: Tensor | None = None,
) -> _StepOutput:
    """Forward pass and loss of one step; no state changes (those follow the optimiser step).

    With ``labels`` (B,) the step also marks which negatives share the query's class; in
    oracle mode (``mixing.oracle``) those are masked before MoCHi's hard-negative selection.
    """
    m = cfg.model
    oracle = cfg.mixing.oracle
    if m.method == "mocov2":
        q, k = model(v1, v2, key_perm=perm, key_splits=m.key_bn_splits)
        queue = unwrapped.queue
        same = None
        if labels is not None and queue.labels is not None:
            same = false_negative_mask(labels, queue.labels)  # (B, K)
        out = moco_v2_loss(
            q,
            k,
            queue.keys,
            temperature=m.temperature,
            mixing=mixing,
            mask=same if oracle else None,
            generator=mix_gen,
        )
        if same is not None:  # align with the real logits: the positive's column first
            same = torch.cat([same.new_zeros(same.shape[0], 1), same], dim=1)
        return _StepOutput(out.loss, out, q, k, k, same)
    # MoCo-v3: symmetric loss over the keys of all processes
    q1, q2, k1, k2 = model(v1, v2)
    same = None
    if labels is not None:
        same = false_negative_mask(labels, gather_no_grad(labels))  # (B, W * B)
    kw = dict(
        temperature=m.temperature,
        rank=rank,
        mixing=mixing,
        mask=same if oracle else None,
        generator=mix_gen,
    )
    out1 = moco_v3_loss(q1, gather_no_grad(k2), **kw)
    out2 = moco_v3_loss(q2, gather_no_grad(k1), **kw)
    return _StepOutput(out1.loss + out2.loss, out1, q1, k2, None, same)


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    unwrapped: MoCoV2 | MoCoV3,
    optimizer: torch.optim.Optimizer,
    v1: Tensor,
    v2: Tensor,
    cfg: Config,
    mixing: MixingSpec | None,
    mix_gen: torch.Generator,
    *,
    perm: Tensor | None,
    momentum: float,
    labels: Tensor | None = None,
) -> _StepOutput:
    """One optimiser step of pretraining, the body of the engine's loop (no logging).

    Forward and loss (:func:`_contrastive_step`), backward, optional gradient clipping and the
    optimiser step; then the explicit state changes, in this order: the momentum update of the
    key encoder and (MoCo-v2) the enqueue of every process's keys (with their labels when the
    queue keeps them). No host-device synchronisation.

    Args:
        accelerator: The run's Accelerator.
        model: The prepared (possibly DDP-wrapped or compiled) model.
        unwrapped: The same model unwrapped (its queue and momentum encoder).
        optimizer: The prepared optimiser.
        v1: Query views (B, 3, H, W) of this process.
        v2: Key views (B, 3, H, W).
        cfg: The configuration.
        mixing: MoCHi's settings this step (None during the warm-up or for the baseline).
        mix_gen: MoCHi's generator.
        perm: Shuffle-BN permutation of the global batch, or None.
        momentum: Momentum of the key-encoder update.
        labels: (B,) class labels when the analysis or the oracle needs them.

    Returns:
        The step's loss, first InfoNCE output, queries and keys.
    """
    step_out = _contrastive_step(
        model,
        unwrapped,
        v1,
        v2,
        cfg,
        mixing,
        mix_gen,
        perm=perm,
        rank=accelerator.process_index,
        labels=labels,
    )
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(step_out.loss)
    if cfg.optim.clip_grad is not None:
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    unwrapped.momentum_update(momentum)
    if step_out.new_keys is not None:
        new_labels = gather_no_grad(labels) if labels is not None else None
        unwrapped.queue.enqueue(gather_no_grad(step_out.new_keys), new_labels)
    return step_out


def build_optimizer(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, float]:
    """The optimiser of a configuration (timm's factory) and its peak learning rate.

    The learning rate scales linearly with the global batch (``base_lr * batch / 256``); with
    ``optim.exclude_bias_and_norm`` biases and normalisation weights get no weight decay.
    """
    o = cfg.optim
    lr = o.base_lr * cfg.data.batch_size / 256
    optimizer = create_optimizer_v2(
        model,
        opt=o.name,
        lr=lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        filter_bias_and_bn=o.exclude_bias_and_norm,
        **({"betas": o.betas} if o.name == "adamw" else {}),
    )
    return optimizer, lr


def _make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    from datetime import timedelta

    # Several processes without CUDA (torchrun or `accelerate launch --multi_gpu` on a CPU
    # host) only form one gloo group when the Accelerator is told to use the CPU.
    distributed_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=distributed_cpu,
        log_with=_trackers(cfg, run_dir),
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
        # Batches go to the GPU with non-blocking copies from pinned memory: no host wait.
        dataloader_config=DataLoaderConfiguration(
            even_batches=True, non_blocking=torch.cuda.is_available()
        ),
        kwargs_handlers=[
            # The queue and the momentum encoder's BatchNorm statistics are kept identical on
            # every rank by the engine; DDP must not broadcast them each step.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)),
        ],
    )


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the GPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _loader(dataset, batch_size: int, sampler, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _eval_loader(dataset, cfg: Config) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def pretrain(cfg: Config, *, accelerator: Accelerator | None = None) -> PretrainResult:
    """Pretrain a backbone with MoCo (+ MoCHi) as configured, resuming if asked to.

    Args:
        cfg: A configuration (see :func:`mochi_hub.config.load_config`).
        accelerator: An existing Accelerator (tests); a new one is made otherwise.

    Returns:
        The run's summary; the run directory holds ``config.yaml``, ``metrics.jsonl``,
        ``checkpoints/`` and ``results.json``.
    """
    t_start = time.perf_counter()
    cfg.validate()
    if accelerator is None:
        cfg.check_world_size()  # the launcher's WORLD_SIZE: before any process group or device
    run_dir = Path(cfg.train.output_dir or Path("runs") / cfg.name)
    accelerator = accelerator or _make_accelerator(cfg, run_dir)
    cfg.check_world_size(accelerator.num_processes)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.model.sync_bn and world > 1 and accelerator.device.type == "cpu":
        raise ConfigError("model.sync_bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel")

    # Everything that can fail on bad data fails here, before the model takes any memory.
    data = build_data(cfg, rank=rank, world_size=world)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    accelerator.init_trackers(cfg.name, config=_flat(config_to_dict(cfg)))

    set_seed(cfg.train.seed)  # the same on every rank: identical initial weights and queue
    labelled = getattr(data.train, "label_column", None) is not None
    model = build_model(cfg, queue_labels=labelled)
    if cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    o = cfg.optim
    optimizer, lr = build_optimizer(cfg, model)
    per_process = cfg.data.batch_size // world
    if data.stream_size is None:
        train_set = SeededDataset(data.train, cfg.train.seed)
        sampler = EpochSampler(len(train_set), cfg.train.seed)
        train_loader = _loader(train_set, per_process, sampler, cfg.data.num_workers)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        steps_per_epoch = len(train_loader)
    else:  # each process already reads its own part of the stream
        train_loader = DataLoader(
            data.train,
            batch_size=per_process,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            persistent_workers=False,  # a fresh copy each epoch carries the epoch number
            pin_memory=torch.cuda.is_available(),
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        steps_per_epoch = data.stream_size // cfg.data.batch_size
    knn_loaders = None
    if data.knn_bank is not None:
        knn_loaders = accelerator.prepare(
            _eval_loader(data.knn_bank, cfg), _eval_loader(data.knn_query, cfg)
        )
    unwrapped = accelerator.unwrap_model(model)
    if cfg.model.compile:
        model = torch.compile(model)

    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    per_step = o.schedule_unit == "step"
    scheduler = None
    if o.schedule == "cosine":
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=steps_per_epoch * cfg.train.epochs if per_step else cfg.train.epochs,
            lr_min=o.min_lr,
            warmup_t=round(o.warmup_epochs * steps_per_epoch) if per_step else o.warmup_epochs,
            warmup_lr_init=0.0 if o.warmup_epochs else lr,
            warmup_prefix=True,
            t_in_epochs=not per_step,
        )
        # No checkpoint state of its own: timm's schedulers are a function of the step (or
        # epoch) they are given, and the optimiser's restored param groups hold the current lr.

    # MoCHi's randomness: one generator per rank (different queries); shuffle-BN's permutation:
    # the same generator state on every rank. Each rank checkpoints its own (safetensors).
    mix_gen = torch.Generator(device=accelerator.device)
    mix_gen.manual_seed(cfg.train.seed * 1000 + 17 + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 29)
    generators = {"mixing": mix_gen, "shuffle_bn": shuffle_gen}
    m_cfg = cfg.model
    use_shuffle = m_cfg.method == "mocov2" and (
        (world > 1 and m_cfg.shuffle_bn) or m_cfg.key_bn_splits > 1
    )
    x = cfg.mixing
    spec = None
    if x.enabled and x.num_synthetic + x.num_synthetic_query > 0:
        spec = MixingSpec(x.num_hard, x.num_synthetic, x.num_synthetic_query, x.max_beta, x.impl)

    resumed_from, state = _resume(accelerator, cfg, run_dir, generators)
    step = state.get("step", 0)
    start_epoch = state.get("epoch", 0)
    skip = state.get("step_in_epoch", 0)
    corrupt_before = state.get("corrupt_images", 0)
    if resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} (step {step}, epoch {start_epoch})")

    knn_init = None
    if cfg.eval.at_start and knn_loaders is not None and resumed_from is None:
        knn_init = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
        accelerator.print(f"kNN before training: top-1 {knn_init['top1']:.2f}%")
        accelerator.log({f"knn/{k}": v for k, v in knn_init.items()}, step=0)

    mix_desc = f"MoCHi{(x.num_hard, x.num_synthetic, x.num_synthetic_query)}" if spec else "none"
    accelerator.print(
        f"mochi_hub {__version__}: {m_cfg.method}, mixing {mix_desc} | {m_cfg.arch} | "
        f"{world} process(es) on {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision} | batch {cfg.data.batch_size} | "
        f"lr {lr:.4g} | {steps_per_epoch} steps/epoch"
    )
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="pretrain",
    )
    device = accelerator.device
    corrupt = torch.zeros((), dtype=torch.long, device=device)
    checkpoint = resumed_from
    t_log, images_since_log = time.perf_counter(), 0
    top = cfg.eval.analysis_top
    analysis_path = run_dir / "analysis.jsonl"
    epoch = start_epoch
    done = step >= total_steps
    for epoch in range(start_epoch, cfg.train.epochs):
        if done:
            break
        if scheduler is not None and not per_step:
            scheduler.step(epoch)
        mixing = spec if (spec is not None and epoch >= x.start_epoch) else None
        loader = _epoch_batches(accelerator, train_loader, data, epoch, skip, steps_per_epoch)
        step_in_epoch, skip = skip, 0
        profile_sum, profile_logs = None, 0  # the epoch's hardness profile, on the device
        model.train()
        for batch in loader:
            v1, v2 = batch["view1"], batch["view2"]
            labels = batch.get("label") if labelled else None
            corrupt += batch["corrupt"].sum()
            if m_cfg.channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            momentum = (
                momentum_cosine(m_cfg.momentum, step / max(1, total_steps))
                if m_cfg.momentum_schedule == "cosine"
                else m_cfg.momentum
            )
            perm = None
            if use_shuffle:
                perm = torch.randperm(world * per_process, generator=shuffle_gen)
                perm = _to_device(perm, device)
            step_out = train_step(
                accelerator,
                model,
                unwrapped,
                optimizer,
                v1,
                v2,
                cfg,
                mixing,
                mix_gen,
                perm=perm,
                momentum=momentum,
                labels=labels,
            )
            loss, first, q, k = step_out.loss, step_out.first, step_out.q, step_out.k
            if scheduler is not None and per_step:
                scheduler.step_update(step + 1)
            step += 1
            step_in_epoch += 1
            images_since_log += cfg.data.batch_size
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == total_steps:
                # The only host synchronisations of the loop, every log_every steps.
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss is {mean_loss} at step {step} (epoch {epoch}); stopping. The last "
                        f"complete checkpoint ({find_checkpoint(run_dir)}) is kept."
                    )
                skipped = corrupt_before + int(accelerator.reduce(corrupt, reduction="sum"))
                check_corrupt_budget(skipped, cfg.data.max_corrupt)
                now = time.perf_counter()
                ips = images_since_log / max(now - t_log, 1e-9)
                t_log, images_since_log = now, 0
                stats = contrastive_diagnostics(
                    first, m_cfg.temperature, x.num_hard if spec else 1024
                )
                logs = {
                    "train/loss": mean_loss,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/momentum": momentum,
                    "train/images_per_s": ips,
                    "train/epoch": epoch,
                    "train/mixing_active": float(mixing is not None),
                    "train/corrupt_images": skipped,
                    "train/alignment": alignment(q, k).item(),
                    "train/uniformity": uniformity(q).item(),
                    **{f"train/{name}": v.item() for name, v in stats.items()},
                }
                if top > 0:
                    profile = hardness_profile(first, top)
                    profile_sum = profile if profile_sum is None else profile_sum + profile
                    profile_logs += 1
                    if step_out.same_class is not None:
                        share = false_negative_share(first, step_out.same_class, top)
                        logs["train/false_neg_share_topn"] = share.item()
                accelerator.log(logs, step=step)
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}", lr=f"{logs['train/lr']:.3g}", img_s=f"{ips:.0f}"
                )
            last_batch = step_in_epoch == steps_per_epoch
            every_steps = cfg.train.checkpoint_every_steps
            if every_steps and step % every_steps == 0 and not last_batch and step < total_steps:
                state = _trainer_state(
                    epoch, step_in_epoch, step, corrupt_before, corrupt, accelerator
                )
                checkpoint = save_checkpoint(
                    accelerator, run_dir, state, cfg.train.keep_checkpoints, generators
                )
            if step >= total_steps:
                done = True
                break

        finished_epoch = step_in_epoch == steps_per_epoch
        if profile_sum is not None and accelerator.is_main_process:
            _append_analysis(analysis_path, epoch, step, profile_sum / profile_logs, profile_logs)
        every = cfg.train.checkpoint_every_epochs
        save = done or (finished_epoch and every and (epoch + 1) % every == 0)
        save = save or (
            finished_epoch
            and cfg.train.checkpoint_every_steps
            and step % cfg.train.checkpoint_every_steps == 0
        )
        if save:
            state = (
                _trainer_state(epoch + 1, 0, step, corrupt_before, corrupt, accelerator)
                if finished_epoch
                else _trainer_state(
                    epoch, step_in_epoch, step, corrupt_before, corrupt, accelerator
                )
            )
            checkpoint = save_checkpoint(
                accelerator, run_dir, state, cfg.train.keep_checkpoints, generators
            )
        monitor = cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0
        if monitor and knn_loaders is not None and not done:
            acc = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
            accelerator.log({f"knn/{k}": v for k, v in acc.items()}, step=step)
            accelerator.print(f"epoch {epoch + 1}: kNN top-1 {acc['top1']:.2f}%")
    bar.close()

    knn_final = None
    if cfg.eval.at_end and knn_loaders is not None:
        knn_final = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
        accelerator.log({f"knn/{k}": v for k, v in knn_final.items()}, step=step)
    skipped = corrupt_before + int(accelerator.reduce(corrupt, reduction="sum"))
    wall = time.perf_counter() - t_start
    result = PretrainResult(
        run_dir, checkpoint, step, resumed_from, knn_init, knn_final, skipped, wall
    )
    if accelerator.is_main_process:
        summary = {
            "steps": step,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "knn_init": knn_init,
            "knn_final": knn_final,
            "corrupt_images": skipped,
            "wall_seconds": round(wall, 1),
            "checkpoint": str(checkpoint) if checkpoint else None,
        }
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    if knn_final is not None:
        init = f" (random init: {knn_init['top1']:.2f}%)" if knn_init else ""
        accelerator.print(
            f"kNN top-1 on the held-out split: {knn_final['top1']:.2f}%{init}; "
            f"top-5 {knn_final['top5']:.2f}%"
        )
    if skipped:
        accelerator.print(f"{skipped} corrupt image(s) were skipped and replaced")
    accelerator.print(f"run directory: {run_dir} | checkpoint: {checkpoint} | {wall:.0f} s")
    accelerator.end_training()
    return result


def _append_analysis(path: Path, epoch: int, step: int, profile: Tensor, logs: int) -> None:
    """One ``analysis.jsonl`` line per epoch: the hardness profile (the paper's Fig. 2a)."""
    row = {
        "epoch": epoch,
        "step": step,
        "logged_steps": logs,
        "hardness_profile": [round(v, 8) for v in profile.float().cpu().tolist()],
    }
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _trainer_state(
    epoch: int, step_in_epoch: int, step: int, before: int, corrupt: Tensor, accelerator
) -> dict:
    return {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "step": step,
        "corrupt_images": before + int(accelerator.reduce(corrupt.clone(), reduction="sum")),
        "version": __version__,
    }


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict for trackers (TensorBoard hparams take scalars and strings)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
