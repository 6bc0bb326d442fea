"""Where the time of a multi-process MoCo-v2 + MoCHi step goes: communication vs compute.

Launch with torchrun (gloo on the CPU, NCCL on GPUs)::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py
    torchrun --standalone --nproc_per_node 1 benchmarks/bench_distributed.py   # reference
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py --quick

Every rank runs the engine's step (``engine._make_accelerator`` -> DDP with
``broadcast_buffers=False``, ``build_model``, ``engine._contrastive_step``) on its share of
the same global batch (default 64), for several queue sizes K, and times its parts:

* ``fwd+loss``: both encoders and the loss with MoCHi; it contains the shuffle-BN collectives
  (all-gather of the key views, all-gather of the shuffled keys), timed on their own by
  wrapping :func:`mochi_hub.distributed.gather_no_grad` (``shuffle``);
* ``backward``: DDP's backward, whose gradient all-reduce overlaps the computation. Its exposed
  cost is the median backward time minus that of a backward under ``no_sync()`` (a second
  variant, alternated with the first; its gradients are all-reduced afterwards, untimed, so
  the ranks stay identical). The all-reduce of a flat buffer as large as all gradients is also
  timed alone (``allreduce alone``, an upper bound of what the overlap hides);
* ``opt`` (zero_grad + optimiser step + momentum update), ``gather`` (all-gather of this
  step's keys for the queue) and ``enqueue``.

The queue itself (K x 128 floats per rank) is never communicated: only the batch's images,
keys and the gradients are, so the communicated bytes and times must not grow with K while
the compute (q @ queue.T, MoCHi's top-N) does. The script prints a table per K, the
communication share of the step, and the bytes each rank receives per step, and writes JSON.

Small model: ResNet-18 at half width (channels 32..256) at 32 px, as in the quickstart recipe,
so a full run takes a minute or two on two CPU cores. Threads: torchrun sets
OMP_NUM_THREADS=1 per process when it starts several; the thread count is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import _common
import torch
import torch.distributed as dist
from bench_step import build_trainer

from mochi_hub import distributed, engine
from mochi_hub.config import load_config

QUICK = dict(queues=[512, 1024], batch=8, reps=2, warmup=1, num_hard=64, s=32, sp=16)
PHASES = ("fwd+loss", "shuffle", "backward", "opt", "gather", "enqueue", "total")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-hard", type=int, default=1024, help="N (default 1024)")
    p.add_argument("--s", type=int, default=512, help="s (default 512)")
    p.add_argument("--sp", type=int, default=256, help="s' (default 256)")
    p.add_argument("--arch", default="resnet18", help="timm ResNet (default resnet18)")
    p.add_argument(
        "--width",
        type=int,
        nargs=4,
        default=[32, 64, 128, 256],
        help="stage widths (default 32 64 128 256: half-width ResNet-18)",
    )
    p.add_argument("--stock-width", action="store_true", help="the architecture's own widths")
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    _common.add_run_args(p, str(QUICK))
    args = p.parse_args(argv)
    if args.quick:
        args.num_hard, args.sp = QUICK["num_hard"], QUICK["sp"]
        for key in ("queues", "batch", "reps", "warmup", "s"):
            setattr(args, key, QUICK[key])
        args.width = [8, 8, 16, 16]
    return args


def _config(args: argparse.Namespace, queue: int):
    c = args.width
    overrides = [
        f"model.arch={args.arch}",
        f"data.batch_size={args.batch}",
        f"data.image_size={args.image_size}",
        f"model.queue_size={queue}",
        "model.key_bn_splits=1",  # one process: plain BN; several: shuffle-BN
        f"mixing.num_hard={args.num_hard}",
        f"mixing.num_synthetic={args.s}",
        f"mixing.num_synthetic_query={args.sp}",
        "train.log_with=none",
        f"train.seed={args.seed}",
    ]
    if not args.stock_width:
        overrides.append(
            f"model.backbone_kwargs={{channels: [{c[0]}, {c[1]}, {c[2]}, {c[3]}], "
            f"stem_width: {c[0]}}}"
        )
    return load_config("cifar10_resnet18_mochi", overrides)


class _GatherTimer:
    """Wraps ``mochi_hub.distributed.gather_no_grad`` (what shuffle-BN calls) to time it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.received = 0  # bytes from the other ranks
        self._real = distributed.gather_no_grad

    def __enter__(self):
        def wrapper(x: torch.Tensor) -> torch.Tensor:
            _common.sync(self.device)
            t0 = time.perf_counter()
            y = self._real(x)
            _common.sync(self.device)
            self.seconds += time.perf_counter() - t0
            self.received += (y.numel() - x.numel()) * x.element_size()
            return y

        distributed.gather_no_grad = wrapper
        return self

    def __exit__(self, *exc):
        distributed.gather_no_grad = self._real


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def timed_step(trainer, v1, v2, no_sync: bool) -> dict:
    """One engine step (see bench_step._Trainer.step) with each part timed on this rank."""
    acc, device = trainer.accelerator, trainer.accelerator.device
    world, cfg = acc.num_processes, trainer.cfg
    t: dict = {}
    _barrier(world)  # untimed: the ranks start the step together
    _common.sync(device)
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        _common.sync(device)
        now = time.perf_counter()
        t[name] = now - last
        last = now

    if cfg.model.channels_last:
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
    perm = None
    if trainer.use_shuffle:
        perm = torch.randperm(world * v1.shape[0], generator=trainer.shuffle_gen).to(device)
    with _GatherTimer(device) as shuffle:
        out = engine._contrastive_step(
            trainer.model,
            trainer.unwrapped,
            v1,
            v2,
            cfg,
            trainer.spec,
            trainer.mix_gen,
            perm=perm,
            rank=acc.process_index,
        )
        lap("fwd+loss")
    t["shuffle"], t["shuffle_bytes"] = shuffle.seconds, shuffle.received
    trainer.optimizer.zero_grad(set_to_none=True)
    ctx = trainer.model.no_sync() if no_sync else contextlib.nullcontext()
    with ctx:
        acc.backward(out.loss)
    lap("backward")
    if no_sync:  # untimed: keep the ranks' gradients (hence weights) identical
        paused = time.perf_counter()
        for p in trainer.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        _common.sync(device)
        start += time.perf_counter() - paused
        last = time.perf_counter()
    trainer.optimizer.step()
    trainer.unwrapped.momentum_update(cfg.model.momentum)
    lap("opt")
    keys = distributed.gather_no_grad(out.new_keys)
    lap("gather")
    trainer.unwrapped.queue.enqueue(keys)
    lap("enqueue")
    t["total"] = last - start
    t["gather_bytes"] = (keys.numel() - out.new_keys.numel()) * keys.element_size()
    return t


def allreduce_alone(trainer, reps: int, warmup: int) -> float | None:
    """Median time of one all-reduce of a flat float32 buffer as large as all gradients."""
    world, device = trainer.accelerator.num_processes, trainer.accelerator.device
    if world == 1:
        return None
    n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    buf = torch.ones(n, device=device)
    times = []
    for i in range(warmup + reps):
        _barrier(world)
        _common.sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        _common.sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _common.median(times)


def run_queue(args, queue: int, accelerator) -> dict:
    cfg = _config(args, queue)
    trainer = build_trainer(cfg, accelerator)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    per = args.batch // world
    g = torch.Generator().manual_seed(args.seed + 1)  # the same global batch on every rank
    views = [
        torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g) for _ in range(2)
    ]
    v1, v2 = (v[rank * per : (rank + 1) * per].to(device) for v in views)
    variants = ("ddp", "ddp_no_sync") if world > 1 else ("local",)

    def one(variant: str) -> dict:
        return timed_step(trainer, v1, v2, no_sync=variant == "ddp_no_sync")

    runs = _common.interleaved(variants, one, args.reps, args.warmup)
    main = variants[0]
    med = {ph: _common.median([r[ph] for r in runs[main]]) for ph in PHASES}
    bwd_local = _common.median([r["backward"] for r in runs["ddp_no_sync"]]) if world > 1 else None
    exposed = max(0.0, med["backward"] - bwd_local) if world > 1 else 0.0
    alone = allreduce_alone(trainer, args.reps, args.warmup)
    comm = med["shuffle"] + med["gather"] + exposed
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    grad_bytes = n_params * 4
    received = {
        "shuffle_gathers": runs[main][0]["shuffle_bytes"],
        "key_gather": runs[main][0]["gather_bytes"],
        # ring all-reduce: each rank receives 2 (W - 1) / W of the buffer
        "grad_allreduce": int(2 * (world - 1) / world * grad_bytes),
    }
    return {
        "queue_size": queue,
        "per_process_batch": per,
        "median_s": med,
        "backward_no_sync_s": bwd_local,
        "allreduce_exposed_s": exposed,
        "allreduce_alone_s": alone,
        "comm_s": comm,
        "comm_share": comm / med["total"],
        "received_bytes_per_step": received,
        "queue_bytes_per_rank_not_communicated": queue * cfg.model.proj_dim * 4,
        "grad_params": n_params,
        "runs": runs,
        "rank": rank,
    }


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as run_dir:
        accelerator = engine._make_accelerator(_config(args, args.queues[0]), run_dir)
        world = accelerator.num_processes
        info = _common.machine(accelerator.device)
        is_main = accelerator.is_main_process
        if is_main:
            _common.print_machine(info)
            backend = dist.get_backend() if world > 1 else "none"
            print(
                f"{world} process(es), backend {backend}, torch threads "
                f"{torch.get_num_threads()} per process; global batch {args.batch} "
                f"({args.batch // world} per process), {args.image_size}px {args.arch} widths "
                f"{'stock' if args.stock_width else args.width}, MoCHi (N, s, s') = "
                f"({args.num_hard}, {args.s}, {args.sp}), "
                f"shuffle-BN {'on' if world > 1 else 'off (one process)'}"
            )
        mine = [run_queue(args, k, accelerator) for k in args.queues]
        everyone = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
    if not is_main:
        return {}
    head = (
        f"{'K':>6} {'total':>7} {'fwd+loss':>8} {'shuffle':>7} {'backward':>8} "
        f"{'exposed':>7} {'alone':>6} {'opt':>6} {'gather':>6} {'enqueue':>7} "
        f"{'comm':>6} {'comm %':>6}"
    )
    print("\nmedian ms per step on rank 0 (shuffle, exposed all-reduce and gather are comm):")
    print(head)
    print("-" * len(head))
    for r in mine:
        m = r["median_s"]
        print(
            f"{r['queue_size']:>6} {_fmt_ms(m['total']):>7} {_fmt_ms(m['fwd+loss']):>8} "
            f"{_fmt_ms(m['shuffle']):>7} {_fmt_ms(m['backward']):>8} "
            f"{_fmt_ms(r['allreduce_exposed_s']):>7} {_fmt_ms(r['allreduce_alone_s']):>6} "
            f"{_fmt_ms(m['opt']):>6} {_fmt_ms(m['gather']):>6} {_fmt_ms(m['enqueue']):>7} "
            f"{_fmt_ms(r['comm_s']):>6} {100 * r['comm_share']:6.1f}"
        )
    print("\nbytes each rank receives per step (the same for every K):")
    for r in mine:
        b = r["received_bytes_per_step"]
        print(
            f"  K={r['queue_size']:>6}: shuffle-BN gathers {_fmt_bytes(b['shuffle_gathers'])}, "
            f"queue key gather {_fmt_bytes(b['key_gather'])}, gradient all-reduce "
            f"{_fmt_bytes(b['grad_allreduce'])} ({r['grad_params'] / 1e6:.2f} M params); "
            f"queue {_fmt_bytes(r['queue_bytes_per_rank_not_communicated'])} per rank, "
            "never sent"
        )
    totals = [r["median_s"]["total"] for r in mine]
    comms = [r["comm_s"] for r in mine]
    print(
        f"\nstep time K={args.queues[0]} -> K={args.queues[-1]}: "
        f"{_fmt_ms(totals[0])} -> {_fmt_ms(totals[-1])} ms; communication "
        f"{_fmt_ms(comms[0])} -> {_fmt_ms(comms[-1])} ms"
    )
    if world > 1:
        worst = [
            max(rank_runs[i]["median_s"]["total"] for rank_runs in everyone)
            for i in range(len(mine))
        ]
        print("slowest rank's median step (ms): " + ", ".join(_fmt_ms(x) for x in worst))
    out = {
        "benchmark": "bench_distributed",
        "machine": info,
        "world_size": world,
        "quick": args.quick,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "no_json")},
        "results_rank0": mine,
        "results_all_ranks": everyone,
    }
    path = args.json or (
        None
        if args.no_json
        else _common.default_json(f"distributed_w{world}", info["device"], args.quick)
    )
    _common.write_json(path, out)
    return out


if __name__ == "__main__":
    main()
