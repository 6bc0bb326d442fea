"""The MoCo linear-classification protocol: a linear layer trained on a frozen backbone.

As in MoCo's ``main_lincls.py``: the backbone stays in eval mode (BatchNorm statistics frozen),
has no gradients and runs under ``no_grad``; only a linear layer, initialised N(0, 0.01) with a
zero bias, is trained with SGD (momentum 0.9, no weight decay) on RandomResizedCrop + flip views,
and evaluated on Resize + CenterCrop views at the backbone's ``crop_pct``. Presets hold the
published settings (:data:`LINEAR_PRESETS`); schedules are timm's.

Several processes train the linear layer with DDP (the backbone is not wrapped) on
``batch_size / processes`` images each, and validate on shards gathered with
``gather_for_metrics``. Runs are resumable like pretraining: checkpoints go to
``<output dir>/linear/checkpoints/step_XXXXXXXX/`` (written under a temporary name, marked
``COMPLETE``, renamed), the data order and every crop are functions of ``(seed, epoch, index)``,
so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from mochi_hub import __version__
from mochi_hub.data import RobustEvalDataset, to_uint8_rgb_tensor
from mochi_hub.data.sampling import EpochSampler, SeededDataset

__all__ = [
    "LINEAR_PRESETS",
    "LinearResult",
    "LinearSettings",
    "LinearTrainTransform",
    "linear_settings",
    "lr_scheduler",
    "run_linear",
    "train_linear",
]

logger = logging.getLogger(__name__)

LINEAR_DIR = "linear"
_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class LinearSettings:
    """Hyperparameters of the linear protocol.

    Attributes:
        preset: The preset these settings derive from.
        epochs: Training epochs.
        lr: Learning rate as the reference script's ``--lr``: absolute for MoCo-v1/v2
            (``scale_lr`` False), per 256 images for MoCo-v3 (``scale_lr`` True).
        batch_size: Global batch size (all processes together).
        schedule: ``step`` (x ``gamma`` at each milestone) or ``cosine`` (per epoch, to 0).
        milestones: Epochs (0-based) from which the step schedule's next decay applies.
        gamma: Step decay factor.
        scale_lr: Use ``lr * batch_size / 256``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        crop_scale: Area range of the training RandomResizedCrop (torchvision's and MoCo's
            0.08-1; small, low-detail images such as the digits do better with about 0.5-1).
    """

    preset: str
    epochs: int
    lr: float
    batch_size: int
    schedule: Literal["step", "cosine"]
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    scale_lr: bool = False
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimiser starts with."""
        return self.lr * self.batch_size / 256 if self.scale_lr else self.lr

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"epochs and batch_size must be >= 1 and lr > 0, got {self.epochs}, "
                f"{self.batch_size}, {self.lr}"
            )
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(
            not 0 < m < self.epochs for m in self.milestones
        ):
            raise ValueError(
                f"milestones must be increasing epochs in (0, {self.epochs}), got "
                f"{list(self.milestones)}"
            )
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


LINEAR_PRESETS: dict[str, LinearSettings] = {
    # MoCo v1/v2 main_lincls.py defaults (ImageNet-1k)
    "in1k": LinearSettings("in1k", 100, 30.0, 256, "step", (60, 80)),
    # MoCHi's ImageNet-100 protocol
    "in100": LinearSettings("in100", 60, 10.0, 128, "step", (30, 40, 50)),
    # MoCo-v3 main_lincls.py for ViTs: --lr 3 (x batch / 256), batch 1024, 90 epochs, cosine
    "mocov3_vit": LinearSettings("mocov3_vit", 90, 3.0, 1024, "cosine", scale_lr=True),
}


def linear_settings(
    preset: str = "in1k",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    milestones: list[int] | tuple[int, ...] | None = None,
    crop_scale: tuple[float, float] | None = None,
) -> LinearSettings:
    """A preset with overrides.

    When ``epochs`` changes and ``milestones`` is not given, a step preset's milestones are
    scaled to the new length (60/80 of 100 epochs become 3/4 of 5), so the decays still happen.

    Args:
        preset: A key of :data:`LINEAR_PRESETS`.
        epochs: Training epochs.
        lr: Learning rate, in the preset's convention (see :class:`LinearSettings`).
        batch_size: Global batch size.
        milestones: Step-schedule milestones (epochs, 0-based).
        crop_scale: Area range of the training crops.

    Returns:
        Validated settings.

    Raises:
        ValueError: For an unknown preset, milestones with a cosine preset, or bad values.
    """
    if preset not in LINEAR_PRESETS:
        raise ValueError(f"unknown linear preset {preset!r}; presets: {sorted(LINEAR_PRESETS)}")
    base = LINEAR_PRESETS[preset]
    if milestones is not None and base.schedule != "step":
        raise ValueError(f"preset {preset!r} has a cosine schedule: milestones do not apply")
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = epochs
        if milestones is None and base.schedule == "step" and epochs != base.epochs:
            scaled = {round(m * epochs / base.epochs) for m in base.milestones}
            changes["milestones"] = tuple(sorted(m for m in scaled if 0 < m < epochs))
    if milestones is not None:
        changes["milestones"] = tuple(int(m) for m in milestones)
    if lr is not None:
        changes["lr"] = float(lr)
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if crop_scale is not None:
        changes["crop_scale"] = (float(crop_scale[0]), float(crop_scale[1]))
    settings = dataclasses.replace(base, **changes)
    settings.validate()
    return settings


class LinearTrainTransform:
    """Training view of the linear protocol: RandomResizedCrop(S) + horizontal flip + Normalize.

    On the uint8 torchvision v2 path of :mod:`mochi_hub.data.transforms`; a plain class, so it
    pickles into loader workers. Randomness comes from torch's global CPU generator (seeded
    per image by :class:`~mochi_hub.data.sampling.SeededDataset`).

    Args:
        image_size: Output side S.
        mean: Normalize mean.
        std: Normalize std.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
        scale: RandomResizedCrop area range (torchvision's default 0.08-1, as MoCo).
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...] | list[float],
        std: tuple[float, ...] | list[float],
        interpolation: str = "bilinear",
        scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        self._t = v2.Compose(
            [
                v2.RandomResizedCrop(
                    image_size,
                    scale=scale,
                    interpolation=_INTERPOLATIONS[interpolation],
                    antialias=True,
                ),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
            ]
        )

    def __call__(self, image) -> Tensor:
        """Map a PIL image or uint8 (1 | 3, H, W) tensor to a float32 (3, S, S) tensor."""
        return self._t(to_uint8_rgb_tensor(image)).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._t!r})"


@dataclass
class LinearResult:
    """What a linear run reports.

    Attributes:
        top1: Held-out top-1 accuracy (percent) of the final linear layer.
        top5: Held-out top-5 accuracy (percent).
        steps: Optimiser steps taken in total (including those before a resume).
        epochs_completed: Complete epochs.
        resumed_from: The checkpoint the run resumed from, if any.
        checkpoint: The last checkpoint.
        head: The trained linear layer (D -> C), on the CPU.
    """

    top1: float
    top5: float
    steps: int
    epochs_completed: int
    resumed_from: Path | None
    checkpoint: Path | None
    head: nn.Linear


def lr_scheduler(optimizer: torch.optim.Optimizer, s: LinearSettings):
    """The timm schedule of the settings; call ``.step(epoch)`` at the start of each epoch.

    Args:
        optimizer: The SGD optimiser, its lr at ``s.effective_lr``.
        s: The settings.

    Returns:
        A ``CosineLRScheduler`` or ``MultiStepLRScheduler`` (timm).
    """
    if s.schedule == "cosine":  # MoCo-v3: lr * 0.5 * (1 + cos(pi * epoch / epochs)), per epoch
        return CosineLRScheduler(optimizer, t_initial=s.epochs, lr_min=0.0, t_in_epochs=True)
    # MoCo's step schedule decays from epoch m on; timm applies decay_t at t == decay_t - 1,
    # so stepping it with t = epoch needs decay_t = m + 1.
    return MultiStepLRScheduler(
        optimizer, decay_t=[m + 1 for m in s.milestones], decay_rate=s.gamma, t_in_epochs=True
    )


def _freeze(backbone: nn.Module) -> nn.Module:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def _head(num_features: int, num_classes: int, seed: int) -> nn.Linear:
    """The classifier (D -> C): weight ~ N(0, 0.01), zero bias, as in MoCo (seeded)."""
    head = nn.Linear(num_features, num_classes)
    with torch.no_grad():
        nn.init.normal_(head.weight, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(head.bias)
    return head


def _resume(
    accelerator: Accelerator, run_dir: Path, resume: str | None, fingerprint: str
) -> tuple[Path | None, dict]:
    from mochi_hub.engine import COMPLETE_MARKER, TRAINER_STATE, find_checkpoint

    existing = find_checkpoint(run_dir)
    if resume is None:
        if existing is not None:
            raise ValueError(
                f"{run_dir} holds checkpoints of an earlier linear run ({existing.name}); "
                "resume it, remove them, or use another output directory"
            )
        return None, {}
    ckpt = existing if resume == "auto" else Path(resume)
    if ckpt is None:
        return None, {}
    if not (ckpt / COMPLETE_MARKER).is_file():
        raise ValueError(f"resume: {ckpt} is not a complete checkpoint")
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{ckpt} belongs to a linear run of another backbone, data set or settings; "
            "use another output directory (or remove it) to start afresh"
        )
    accelerator.load_state(str(ckpt))
    return ckpt, state


@torch.no_grad()
def _validate(backbone: nn.Module, head: nn.Module, loader, accelerator: Accelerator) -> dict:
    """Top-1/top-5 (percent) of ``head(backbone(x))`` over a sharded loader, every image once."""
    hits1 = hits5 = count = 0
    for batch in loader:
        with accelerator.autocast():
            feats = backbone(batch["image"])
        logits = head(feats.float())  # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        top, y = accelerator.gather_for_metrics((top, batch["label"]))
        hits = top == y[:, None]
        hits1 += int(hits[:, :1].any(dim=1).sum())
        hits5 += int(hits.any(dim=1).sum())
        count += y.numel()
    if count == 0:
        raise ValueError("the held-out split is empty")
    return {"top1": 100.0 * hits1 / count, "top5": 100.0 * hits5 / count}


def _train_epoch(
    backbone: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    accelerator: Accelerator,
    *,
    max_batches: int,
    bar,
) -> tuple[int, float]:
    """SGD on the linear layer over (at most ``max_batches`` of) one epoch's batches.

    Returns:
        The number of optimiser steps taken and their mean loss over all processes.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    taken = 0
    for batch in batches:
        with torch.no_grad(), accelerator.autocast():
            feats = backbone(batch["image"])  # (B, D), frozen
        loss = F.cross_entropy(head(feats.float()), batch["label"])  # (B, C) logits
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        loss_sum += loss.detach()
        taken += 1
        bar.update(1)
        if taken >= max_batches:
            break
    mean = accelerator.reduce(loss_sum, reduction="mean").item() / max(taken, 1)
    return taken, mean


def _log(run_dir: Path, record: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_linear(
    backbone: nn.Module,
    train_set,
    val_set,
    *,
    num_classes: int,
    settings: LinearSettings,
    run_dir: str | os.PathLike,
    accelerator: Accelerator,
    seed: int = 0,
    workers: int = 0,
    eval_batch_size: int = 256,
    resume: str | None = "auto",
    max_steps: int | None = None,
    fingerprint: str = "",
    keep_checkpoints: int = 2,
) -> LinearResult:
    """Train and evaluate a linear layer on a frozen backbone (the MoCo linear protocol).

    Args:
        backbone: Maps images (B, 3, S, S) to features (B, D), ``num_features`` = D; frozen
            here (eval mode, no gradients) and moved to ``accelerator.device``.
        train_set: Map-style data set of ``{"image", "label"}`` items whose image transform
            draws from torch's global RNG (e.g. :class:`LinearTrainTransform`).
        val_set: Map-style data set of deterministic ``{"image", "label"}`` items.
        num_classes: C.
        settings: The protocol's hyperparameters (:func:`linear_settings`).
        run_dir: Directory of ``checkpoints/`` and ``metrics.jsonl``.
        accelerator: Places tensors and runs DDP over several processes.
        seed: Seeds the layer's initialisation, the data order and the crops.
        workers: Loader worker processes.
        eval_batch_size: Validation images per batch and process.
        resume: ``auto`` (the newest complete checkpoint of ``run_dir``, if any), a
            checkpoint directory, or None (refuses a ``run_dir`` that holds checkpoints).
        max_steps: Stop (with a checkpoint) after this many optimiser steps in total.
        fingerprint: Identifies backbone, data and settings; a checkpoint with another one
            is not resumed.
        keep_checkpoints: Number of most recent checkpoints kept.

    Returns:
        The held-out accuracy of the final layer, the step count and the layer.

    Raises:
        ValueError: For a batch size not divisible by the processes, or a checkpoint of
            another run.
        RuntimeError: If the backbone's weights or BatchNorm statistics changed.
    """
    from mochi_hub.engine import save_checkpoint
    from mochi_hub.evaluate import eval_loader, weights_fingerprint

    settings.validate()
    world = accelerator.num_processes
    if settings.batch_size % world:
        raise ValueError(
            f"batch_size ({settings.batch_size}) is not divisible by the number of processes "
            f"({world})"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    run_dir = Path(run_dir)
    backbone = _freeze(backbone.to(accelerator.device))
    before = weights_fingerprint(backbone)
    num_features = getattr(backbone, "num_features", None)
    if not isinstance(num_features, int):
        raise ValueError("the backbone must expose its feature width as num_features (timm)")

    head = _head(num_features, num_classes, seed)  # the same initial layer on every process
    optimizer = torch.optim.SGD(
        head.parameters(),
        lr=settings.effective_lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    train_seeded = SeededDataset(train_set, seed)
    train_loader = DataLoader(
        train_seeded,
        batch_size=settings.batch_size // world,
        sampler=EpochSampler(len(train_seeded), seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    head, optimizer, train_loader, val_loader = accelerator.prepare(
        head, optimizer, train_loader, eval_loader(val_set, eval_batch_size, workers)
    )
    scheduler = lr_scheduler(optimizer, settings)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * settings.epochs
    stop = total if max_steps is None else min(total, max_steps)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resumed_from, state = _resume(accelerator, run_dir, resume, fingerprint)
    step, epoch, skip = state.get("step", 0), state.get("epoch", 0), state.get("step_in_epoch", 0)
    checkpoint = resumed_from
    if resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} (step {step}, epoch {epoch})")
    steps = f" at {list(settings.milestones)}" if settings.milestones else ""
    accelerator.print(
        f"linear protocol ({settings.preset}): {num_features} features -> {num_classes} classes, "
        f"{len(train_set)} training images, {settings.epochs} epochs of {steps_per_epoch} steps, "
        f"batch {settings.batch_size} on {world} process(es), lr {settings.effective_lr:.4g} "
        f"({settings.schedule}{steps})"
    )
    bar = tqdm(
        total=stop, initial=step, disable=not accelerator.is_local_main_process, desc="linear"
    )
    state = {"fingerprint": fingerprint, "version": __version__}
    while step < stop:
        scheduler.step(epoch)
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        taken, mean_loss = _train_epoch(
            backbone, head, optimizer, batches, accelerator, max_batches=stop - step, bar=bar
        )
        step, step_in_epoch, skip = step + taken, skip + taken, 0
        if accelerator.is_main_process:
            lr = optimizer.param_groups[0]["lr"]
            _log(run_dir, {"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr})
        done = step_in_epoch == steps_per_epoch
        epoch, step_in_epoch = (epoch + 1, 0) if done else (epoch, step_in_epoch)
        state.update(epoch=epoch, step_in_epoch=step_in_epoch, step=step)
        checkpoint = save_checkpoint(accelerator, run_dir, dict(state), keep_checkpoints)
    bar.close()

    unwrapped = accelerator.unwrap_model(head)
    acc = _validate(backbone, unwrapped, val_loader, accelerator)
    if weights_fingerprint(backbone) != before:
        raise RuntimeError("the frozen backbone changed during linear training")
    accelerator.print(
        f"linear: top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}% after {step} steps"
    )
    head_cpu = copy.deepcopy(unwrapped).cpu()
    return LinearResult(
        acc["top1"], acc["top5"], step, step // steps_per_epoch, resumed_from, checkpoint, head_cpu
    )


def run_linear(
    model: nn.Module,
    data,
    transform: dict[str, Any],
    *,
    key: dict[str, Any],
    linear: LinearSettings | None,
    output_dir: Path,
    accelerator: Accelerator,
    resume: str | None,
    max_steps: int | None,
    seed: int,
    batch_size: int,
    workers: int,
) -> list[dict]:
    """The linear protocol on an :class:`~mochi_hub.evaluate.EvalData`, as result rows.

    Args:
        model: The backbone.
        data: The train / held-out splits.
        transform: :func:`~mochi_hub.evaluate.transform_settings` of the backbone.
        key: Backbone and data identity (:func:`~mochi_hub.evaluate.evaluate`'s cache key).
        linear: Settings; the ``in1k`` preset when None.
        output_dir: The run goes to ``<output_dir>/linear``.
        accelerator: The Accelerator.
        resume: See :func:`train_linear`.
        max_steps: See :func:`train_linear`.
        seed: See :func:`train_linear`.
        batch_size: Validation images per batch and process.
        workers: Loader worker processes.

    Returns:
        Rows ``{"dataset", "split", "protocol": "linear", "metric", "value", "settings"}``.
    """
    from mochi_hub.evaluate import _rows, val_dataset

    settings = linear or linear_settings("in1k")
    t = transform
    train_t = LinearTrainTransform(
        t["image_size"], t["mean"], t["std"], t["interpolation"], scale=settings.crop_scale
    )
    identity = {
        **{k: v for k, v in key.items() if k != "backbone"},
        "train": [data.train_split, data.train._fingerprint],
        "val": [data.val_split, data.val._fingerprint],
        "linear": dataclasses.asdict(settings),
        "seed": seed,
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    result = train_linear(
        model,
        RobustEvalDataset(data.train, train_t),
        val_dataset(data.val, t),
        num_classes=data.num_classes,
        settings=settings,
        run_dir=output_dir / LINEAR_DIR,
        accelerator=accelerator,
        seed=seed,
        workers=workers,
        eval_batch_size=batch_size,
        resume=resume,
        max_steps=max_steps,
        fingerprint=fingerprint,
    )
    info = {
        **{k: key[k] for k in ("backbone", "weights_sha256")},
        **t,
        "train_split": data.train_split,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "subset_seed": data.subset_seed,
        "mochi_hub_version": __version__,
        **dataclasses.asdict(settings),
        "milestones": list(settings.milestones),
        "crop_scale": list(settings.crop_scale),
        "effective_lr": settings.effective_lr,
        "steps": result.steps,
        "epochs_completed": result.epochs_completed,
        "seed": seed,
    }
    return _rows(data, "linear", {"top1": result.top1, "top5": result.top5}, info)
