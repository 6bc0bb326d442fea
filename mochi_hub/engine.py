"""The pretraining engine: the only module that reads the config tree.

One code path for one CPU, one GPU and many processes: Accelerate places tensors, wraps the model
for DDP and runs mixed precision; the engine makes the state changes (momentum update, enqueue)
explicitly and in order after each optimiser step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mochi_hub import __version__
from mochi_hub.config import Config, ConfigError, config_to_dict
from mochi_hub.data import (
    eval_batch_transform,
    eval_transform,
    load_digits_dataset,
    two_view_batch_transform,
    two_view_transform,
)
from mochi_hub.distributed import gather_no_grad
from mochi_hub.knn import extract_features, knn_accuracy
from mochi_hub.losses import MixingSpec, contrastive_diagnostics, moco_v2_loss, moco_v3_loss
from mochi_hub.moco import MoCoV2, MoCoV3, create_backbone, momentum_cosine

__all__ = ["PretrainResult", "build_model", "pretrain"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


# --------------------------------------------------------------------------- builders


def build_model(cfg: Config) -> MoCoV2 | MoCoV3:
    """The MoCo-v2 or MoCo-v3 model of a configuration (random initialisation)."""
    m = cfg.model
    kwargs = dict(m.backbone_kwargs)
    backbone = create_backbone(m.arch, **kwargs)
    if m.method == "mocov2":
        return MoCoV2(
            backbone,
            proj_dim=m.proj_dim,
            proj_hidden_dim=m.proj_hidden_dim,
            queue_size=m.queue_size,
        )
    return MoCoV3(
        backbone,
        proj_layers=m.proj_layers,
        hidden_dim=m.hidden_dim,
        dim=m.proj_dim,
        pred_last_bn=m.pred_last_bn,
    )


def _datasets(cfg: Config):
    """(train split, labelled train split, labelled test split) of the configured source."""
    d = cfg.data
    if d.source != "digits":
        raise ConfigError(
            f"data.source '{d.source}' is not supported yet; the built-in source is 'digits'"
        )
    splits = load_digits_dataset(image_size=d.image_size)
    views = two_view_transform(
        d.augmentation, d.image_size, mean=d.mean, std=d.std, **d.augmentation_overrides
    )
    train = splits["train"].with_transform(two_view_batch_transform(views))
    plain = eval_transform(d.image_size, mean=d.mean, std=d.std, crop_pct=1.0)
    knn_train = splits["train"].with_transform(eval_batch_transform(plain))
    knn_test = splits["test"].with_transform(eval_batch_transform(plain))
    return train, knn_train, knn_test


def _loader(dataset, batch_size: int, *, shuffle: bool, drop_last: bool, cfg: Config, seed: int):
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    @property
    def tracker(self):  # noqa: D102
        return self._file

    def store_init_configuration(self, values: dict) -> None:  # noqa: D102
        pass  # the resolved config is written to config.yaml

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:  # noqa: D102
        if self._file is None:
            self._file = self.path.open("a", buffering=1)
        self._file.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self) -> None:  # noqa: D102
        if self._file is not None:
            self._file.close()
            self._file = None


class _GeneratorState:
    """Makes a torch.Generator checkpointable through ``accelerator.register_for_checkpointing``."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


# --------------------------------------------------------------------------- evaluation


def _knn_eval(
    accelerator: Accelerator, backbone: nn.Module, loaders: tuple[DataLoader, DataLoader], cfg
):
    train_loader, test_loader = loaders
    device = accelerator.device
    train_f, train_y = extract_features(backbone, train_loader, device=device)
    test_f, test_y = extract_features(backbone, test_loader, device=device)
    return knn_accuracy(
        train_f, train_y, test_f, test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature
    )


# --------------------------------------------------------------------------- training


@dataclass
class PretrainResult:
    """What a finished run reports.

    Attributes:
        run_dir: The run directory.
        checkpoint: The last checkpoint directory.
        steps: Optimiser steps taken.
        knn_init: kNN accuracies of the randomly initialised backbone (if evaluated).
        knn_final: kNN accuracies after training (if evaluated).
        wall_seconds: Wall time of the whole run.
    """

    run_dir: Path
    checkpoint: Path | None
    steps: int
    knn_init: dict[str, float] | None
    knn_final: dict[str, float] | None
    wall_seconds: float


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict, keep: int) -> Path:
    """Save atomically: write under a temporary name, mark complete, then rename."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (tmp / COMPLETE_MARKER).write_text(__version__)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        done = sorted(p for p in root.glob("step_*") if (p / COMPLETE_MARKER).exists())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
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


def pretrain(cfg: Config, *, accelerator: Accelerator | None = None) -> PretrainResult:
    """Pretrain a backbone with MoCo (+ MoCHi) as configured.

    Args:
        cfg: A validated configuration (see :func:`mochi_hub.config.load_config`).
        accelerator: An existing Accelerator (tests); a new one is made otherwise.

    Returns:
        The run's summary; the run directory holds ``config.yaml``, ``metrics.jsonl``,
        ``checkpoints/`` and ``results.json``.
    """
    t_start = time.perf_counter()
    cfg.validate()
    run_dir = Path(cfg.train.output_dir or Path("runs") / cfg.name)
    if accelerator is None:
        accelerator = Accelerator(
            log_with=_trackers(cfg, run_dir),
            project_dir=str(run_dir),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
    cfg.check_world_size(accelerator.num_processes)
    world, rank = accelerator.num_processes, accelerator.process_index

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    accelerator.init_trackers(cfg.name, config=_flat(config_to_dict(cfg)))

    # The same seed on every rank: identical initial weights and queue.
    set_seed(cfg.train.seed)
    train_set, knn_train_set, knn_test_set = _datasets(cfg)
    model = build_model(cfg)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    per_process = cfg.data.batch_size // world
    if len(train_set) < cfg.data.batch_size:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) is larger than the training set "
            f"({len(train_set)} images)"
        )

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
    train_loader = _loader(
        train_set, per_process, shuffle=True, drop_last=True, cfg=cfg, seed=cfg.train.seed
    )
    knn_loaders = tuple(
        _loader(s, 256, shuffle=False, drop_last=False, cfg=cfg, seed=0)
        for s in (knn_train_set, knn_test_set)
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.model.compile:
        model = torch.compile(model)

    steps_per_epoch = len(train_loader)
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
        accelerator.register_for_checkpointing(scheduler)

    # MoCHi's randomness: one generator per rank, on the device, checkpointed with the run.
    mix_gen = torch.Generator(device=accelerator.device)
    mix_gen.manual_seed(cfg.train.seed * 1000 + 17 + rank)
    accelerator.register_for_checkpointing(_GeneratorState(mix_gen))
    x = cfg.mixing
    spec = None
    if x.enabled and x.num_synthetic + x.num_synthetic_query > 0:
        spec = MixingSpec(x.num_hard, x.num_synthetic, x.num_synthetic_query, x.max_beta, x.impl)

    knn_init = None
    if cfg.eval.at_start:
        knn_init = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
        accelerator.print(f"kNN before training: top-1 {knn_init['top1']:.2f}%")
        accelerator.log({f"knn/{k}": v for k, v in knn_init.items()}, step=0)

    mix_desc = f"MoCHi{(x.num_hard, x.num_synthetic, x.num_synthetic_query)}" if spec else "none"
    accelerator.print(
        f"mochi_hub {__version__}: {cfg.model.method}, mixing {mix_desc}"
        f" | {cfg.model.arch} | {world} process(es) on {accelerator.device} | "
        f"batch {cfg.data.batch_size} | lr {lr:.4g} | {steps_per_epoch} steps/epoch"
    )
    bar = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="pretrain")
    step, checkpoint, knn_final = 0, None, None
    t_log, images_since_log = time.perf_counter(), 0
    done = False
    for epoch in range(cfg.train.epochs):
        if scheduler is not None and not per_step:
            scheduler.step(epoch)
        mixing = spec if (spec is not None and epoch >= x.start_epoch) else None
        model.train()
        for batch in train_loader:
            v1, v2 = batch["view1"], batch["view2"]
            if cfg.model.channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            progress = step / max(1, total_steps)
            m = (
                momentum_cosine(cfg.model.momentum, progress)
                if cfg.model.momentum_schedule == "cosine"
                else cfg.model.momentum
            )
            if cfg.model.method == "mocov2":
                q, k = model(v1, v2)
                out = moco_v2_loss(
                    q,
                    k,
                    unwrapped.queue.keys,
                    temperature=cfg.model.temperature,
                    mixing=mixing,
                    generator=mix_gen,
                )
                loss, outs = out.loss, [out]
                new_keys = k
            else:
                q1, q2, k1, k2 = model(v1, v2)
                o1 = moco_v3_loss(
                    q1, gather_no_grad(k2), temperature=cfg.model.temperature, rank=rank,
                    mixing=mixing, generator=mix_gen,
                )  # fmt: skip
                o2 = moco_v3_loss(
                    q2, gather_no_grad(k1), temperature=cfg.model.temperature, rank=rank,
                    mixing=mixing, generator=mix_gen,
                )  # fmt: skip
                loss, outs, new_keys = o1.loss + o2.loss, [o1, o2], None
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if o.clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), o.clip_grad)
            optimizer.step()
            if scheduler is not None and per_step:
                scheduler.step_update(step + 1)
            # Explicit state changes, after the optimiser step.
            unwrapped.momentum_update(m)
            if new_keys is not None:
                unwrapped.queue.enqueue(gather_no_grad(new_keys))
            step += 1
            images_since_log += cfg.data.batch_size
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == total_steps:
                loss_value = loss.item()  # the only host sync, every log_every steps
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"loss is {loss_value} at step {step} (epoch {epoch}); stopping. "
                        "The last complete checkpoint is kept."
                    )
                now = time.perf_counter()
                ips = images_since_log / max(now - t_log, 1e-9)
                t_log, images_since_log = now, 0
                stats = contrastive_diagnostics(
                    outs[0], cfg.model.temperature, x.num_hard if spec else 1024
                )
                logs = {
                    "train/loss": loss_value,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/momentum": m,
                    "train/images_per_s": ips,
                    "train/epoch": epoch,
                    "train/mixing_active": float(mixing is not None),
                    **{f"train/{k}": v.item() for k, v in stats.items()},
                }
                accelerator.log(logs, step=step)
                bar.set_postfix(
                    loss=f"{loss_value:.3f}", lr=f"{logs['train/lr']:.3g}", img_s=f"{ips:.0f}"
                )
            if step >= total_steps:
                done = True
                break

        last_epoch = done or epoch == cfg.train.epochs - 1
        every = cfg.train.checkpoint_every_epochs
        if last_epoch or (every and (epoch + 1) % every == 0):
            state = {"epoch": epoch + 1, "step": step, "version": __version__}
            checkpoint = _save_checkpoint(accelerator, run_dir, state, cfg.train.keep_checkpoints)
        monitor = cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0
        if monitor and not last_epoch:
            acc = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
            accelerator.log({f"knn/{k}": v for k, v in acc.items()}, step=step)
            accelerator.print(f"epoch {epoch + 1}: kNN top-1 {acc['top1']:.2f}%")
        if done:
            break
    bar.close()

    if cfg.eval.at_end:
        knn_final = _knn_eval(accelerator, unwrapped.backbone, knn_loaders, cfg)
        accelerator.log({f"knn/{k}": v for k, v in knn_final.items()}, step=step)
    wall = time.perf_counter() - t_start
    result = PretrainResult(run_dir, checkpoint, step, knn_init, knn_final, wall)
    if accelerator.is_main_process:
        summary = {
            "steps": step,
            "knn_init": knn_init,
            "knn_final": knn_final,
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
    accelerator.print(f"run directory: {run_dir} | checkpoint: {checkpoint} | {wall:.0f} s")
    accelerator.end_training()
    return result


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
