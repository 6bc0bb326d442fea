"""Whole MoCo-v2 training step with and without MoCHi: same model, batch, queue and inputs.

Standalone script (no pytest). One timed unit is one optimiser step of the engine's training
loop, run through the engine's own pieces (``engine._make_accelerator``, ``build_model``,
``build_optimizer`` and ``train_step``, the loop's body), in the loop's order::

    q, k = model(v1, v2)  ->  moco_v2_loss(q, k, queue, mixing=spec | None)   # _contrastive_step
    optimizer.zero_grad(); accelerator.backward(loss); optimizer.step()
    momentum_update(m); queue.enqueue(gather_no_grad(k))

The two variants share one model, optimiser, queue and one pair of random input views; only
``mixing`` differs (the MoCHi spec of the recipe, or None as in the MoCo-v2 baseline recipe,
whose other settings are checked to be the same). Logging steps (the loop's only host syncs)
are not part of a step. The variants alternate inside each repetition with the order rotated,
after a warm-up; the ratio of the medians MoCHi / MoCo-v2 is the step-time overhead.

Settings:

* ``in1k``: ResNet-50, 224 px, K = 65536, (N, s, s') = (1024, 512, 256) from
  ``recipes/in1k_resnet50_mochi_1024_512_256_ep200.yaml``; a small batch (16) on the CPU.
  Target: ratio <= 1.03.
* ``cifar``: ResNet-18 (timm stem), 32 px, batch 256, K = 4096, (N, s, s') = (256, 256, 128),
  split-BN with 8 chunks, from ``recipes/cifar10_resnet18_mochi.yaml``.

Examples::

    python benchmarks/bench_step.py --quick
    python benchmarks/bench_step.py                     # both settings, CPU, fp32
    python benchmarks/bench_step.py --setting in1k --batch 32
    accelerate launch --config_file recipes/accelerate/gpu1.yaml benchmarks/bench_step.py \\
        --batch 256 --reps 20 --warmup 5             # GPU: bf16 autocast, as in training
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass

import _common
import torch
from accelerate.utils import set_seed

from mochi_hub import engine
from mochi_hub.config import Config, config_to_dict, load_config
from mochi_hub.losses import MixingSpec

VARIANTS = ("mocov2", "mochi")
SETTINGS = {
    "in1k": dict(
        recipe="in1k_resnet50_mochi_1024_512_256_ep200",
        baseline="in1k_resnet50_mocov2_ep200",
        batch=16,
        target=1.03,
    ),
    "cifar": dict(
        recipe="cifar10_resnet18_mochi",
        baseline="cifar10_resnet18_mocov2",
        batch=256,
        target=None,
    ),
}
# --quick: the same code paths at toy sizes (seconds in total).
QUICK = dict(reps=3, warmup=1, batch=16)
QUICK_OVERRIDES = [
    "model.queue_size=512",
    "mixing.num_hard=64",
    "mixing.num_synthetic=32",
    "mixing.num_synthetic_query=16",
    "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
    "data.image_size=32",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    p.add_argument("--batch", type=int, default=None, help="batch (default: in1k 16, cifar 256)")
    p.add_argument("--reps", type=int, default=7, help="timed steps per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="autocast as Accelerate does it (default: ACCELERATE_MIXED_PRECISION, else no)",
    )
    p.add_argument(
        "--memory-format",
        choices=["recipe", "channels_last", "contiguous"],
        default="recipe",
        help="model.channels_last as in the recipe (true in all four), or forced",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile)")
    p.add_argument("--override", action="append", default=[], help="extra key=value overrides")
    _common.add_run_args(p, f"{QUICK} {QUICK_OVERRIDES}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def _configs(setting: str, args: argparse.Namespace) -> tuple[Config, Config, list[str]]:
    spec = SETTINGS[setting]
    overrides = [
        f"data.batch_size={args.batch or spec['batch']}",
        "train.log_with=none",
        f"train.seed={args.seed}",
    ]
    if args.quick:
        overrides += QUICK_OVERRIDES
    if args.memory_format != "recipe":
        overrides.append(f"model.channels_last={args.memory_format == 'channels_last'}")
    if args.compile:
        overrides.append("model.compile=true")
    overrides += args.override
    mochi = load_config(spec["recipe"], overrides)
    moco = load_config(spec["baseline"], overrides)
    a, b = config_to_dict(mochi), config_to_dict(moco)
    diff = sorted(k for k in a if k not in ("name", "mixing") and a[k] != b[k])
    return mochi, moco, diff


@dataclass
class _Trainer:
    """One model with its optimiser and generators, stepped as the engine's loop steps it."""

    cfg: Config
    accelerator: object
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: object
    mix_gen: torch.Generator
    shuffle_gen: torch.Generator
    use_shuffle: bool
    spec: MixingSpec

    def step(self, v1: torch.Tensor, v2: torch.Tensor, mixing: MixingSpec | None) -> None:
        """The body of the engine's training loop, without logging and checkpointing."""
        m = self.cfg.model
        if m.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        perm = None
        if self.use_shuffle:
            n = self.accelerator.num_processes * v1.shape[0]
            perm = torch.randperm(n, generator=self.shuffle_gen).to(v1.device)
        engine.train_step(
            self.accelerator,
            self.model,
            self.unwrapped,
            self.optimizer,
            v1,
            v2,
            self.cfg,
            mixing,
            self.mix_gen,
            perm=perm,
            momentum=m.momentum,
        )


def build_trainer(cfg: Config, accelerator) -> _Trainer:
    """Model, optimiser and generators exactly as :func:`mochi_hub.engine.pretrain` makes them."""
    world = accelerator.num_processes
    cfg.check_world_size(world)
    set_seed(cfg.train.seed)
    model = engine.build_model(cfg)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, _ = engine.build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.model.compile:
        model = torch.compile(model)
    mix_gen = torch.Generator(device=accelerator.device)
    mix_gen.manual_seed(cfg.train.seed * 1000 + 17 + accelerator.process_index)
    shuffle_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 29)
    m, x = cfg.model, cfg.mixing
    use_shuffle = m.method == "mocov2" and ((world > 1 and m.shuffle_bn) or m.key_bn_splits > 1)
    spec = MixingSpec(x.num_hard, x.num_synthetic, x.num_synthetic_query, x.max_beta, x.impl)
    return _Trainer(
        cfg, accelerator, model, unwrapped, optimizer, mix_gen, shuffle_gen, use_shuffle, spec
    )


def run_setting(setting: str, args: argparse.Namespace, accelerator) -> dict:
    cfg, _, diff = _configs(setting, args)
    m, x, d = cfg.model, cfg.mixing, cfg.data
    device = accelerator.device
    print(
        f"\n[{setting}] {m.arch} {d.image_size}px batch {d.batch_size} K {m.queue_size} "
        f"(N, s, s') = ({x.num_hard}, {x.num_synthetic}, {x.num_synthetic_query}) "
        f"impl {x.impl} | T {m.temperature} | key_bn_splits {m.key_bn_splits} | "
        f"channels_last {m.channels_last} | compile {m.compile} | "
        f"mixed precision {accelerator.mixed_precision}"
    )
    print(
        "baseline recipe "
        + SETTINGS[setting]["baseline"]
        + (" differs only in mixing" if not diff else f" ALSO DIFFERS in {diff}")
    )
    trainer = build_trainer(cfg, accelerator)
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (d.batch_size // accelerator.num_processes, 3, d.image_size, d.image_size)
    v1 = torch.randn(shape, generator=g).to(device)
    v2 = torch.randn(shape, generator=g).to(device)
    mixing = {"mocov2": None, "mochi": trainer.spec}

    def one(variant: str) -> float:
        return _common.timed(lambda: trainer.step(v1, v2, mixing[variant]), device)

    times = _common.interleaved(VARIANTS, one, args.reps, args.warmup)
    med = {v: _common.median(t) for v, t in times.items()}
    ratio = med["mochi"] / med["mocov2"]
    print(f"{'variant':<8} {'median s':>9} {'min s':>9} {'img/s':>8}")
    for v in VARIANTS:
        ips = d.batch_size / med[v]
        print(f"{v:<8} {med[v]:9.4f} {min(times[v]):9.4f} {ips:8.1f}")
    extra_ms = (med["mochi"] - med["mocov2"]) * 1e3
    target = SETTINGS[setting]["target"]
    verdict = ""
    if target is not None:
        verdict = f"  target <= {target}: {'met' if ratio <= target else 'NOT met'}"
        if args.quick:
            verdict += " (toy sizes: not the paper setting)"
    print(f"step-time ratio MoCHi / MoCo-v2 (medians): {ratio:.3f}x, +{extra_ms:.1f} ms{verdict}")
    return {
        "setting": setting,
        "arch": m.arch,
        "image_size": d.image_size,
        "batch": d.batch_size,
        "queue_size": m.queue_size,
        "mixing": {
            "num_hard": x.num_hard,
            "s": x.num_synthetic,
            "s_prime": x.num_synthetic_query,
            "impl": x.impl,
        },
        "key_bn_splits": m.key_bn_splits,
        "channels_last": m.channels_last,
        "compile": m.compile,
        "mixed_precision": str(accelerator.mixed_precision),
        "baseline_config_diff": diff,
        "reps": args.reps,
        "warmup": args.warmup,
        "times_s": times,
        "median_s": med,
        "images_per_s": {v: d.batch_size / med[v] for v in VARIANTS},
        "ratio_mochi_over_mocov2": ratio,
        "target": target,
        "target_met": None if target is None else ratio <= target,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mixed_precision is not None:
        os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    with tempfile.TemporaryDirectory() as run_dir:  # the accelerator's project dir; stays empty
        first, _, _ = _configs(settings[0], args)
        accelerator = engine._make_accelerator(first, run_dir)
        info = _common.machine(accelerator.device)
        _common.print_machine(info)
        print(f"torch threads: {torch.get_num_threads()} (left at the default unless --threads)")
        results = [run_setting(s, args, accelerator) for s in settings]
    out = {"benchmark": "bench_step", "machine": info, "quick": args.quick, "results": results}
    path = args.json or (
        None if args.no_json else _common.default_json("step", info["device"], args.quick)
    )
    _common.write_json(path, out)
    return out


if __name__ == "__main__":
    main()
