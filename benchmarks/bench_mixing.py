"""Cost of MoCHi's synthetic logits: ``impl="explicit"`` vs ``impl="fused"``, CPU, float32.

Standalone script (no pytest). Two things are timed, forward + backward, for each variant:

* **op** (the primary ratio): the mixing op alone, ``mochi_logits(q, negatives, l_neg)``, given
  unit queries ``q`` (a leaf that requires grad), the negatives and the precomputed
  ``l_neg = q @ negatives.T``, then ``backward`` of the (B, S + S') logits with a fixed random
  upstream gradient into ``q``. Everything MoCHi does is inside: the hard-negative selection, the
  draws, the synthetic logits and their gradient with respect to ``q``. ``l_neg`` is MoCo's own
  work and is not timed.
* **step** (secondary): a whole MoCo logit step, forward + backward::

      q = normalize(z);  l_pos = q . k;  l_neg = q @ negatives.T            # shared MoCo work
      syn = mochi_logits(q, negatives, l_neg, impl=...)                      # only with MoCHi
      cat([l_pos, l_neg, syn], 1).sum().backward()

  ``moco`` is the same step without ``syn`` (plain MoCo). Reported: explicit/fused (whole
  steps) and (explicit - moco)/(fused - moco), the ratio of what MoCHi adds to a step.

All variants are interleaved inside each repetition (the order rotated between repetitions)
after warm-up calls, so slow drifts of a shared machine hit all of them alike. Reported: medians
over repetitions, the ratio of medians and the median of the per-repetition ratios (the paired
ratio, robust to load changes between repetitions). ``--threads 1 2`` repeats the timing with
each torch thread count. With other jobs on the cores, OpenMP's default spin-waiting makes every
parallel region cost about a scheduler slice (measured here: ~8 ms instead of ~0.01 ms), so
multi-threaded timings then count parallel regions rather than work; a probe before and after
each timing reports that cost. On a shared machine run with ``OMP_WAIT_POLICY=PASSIVE`` (the
probe then drops to ~0.1 ms) or compare the one-thread numbers.

Peak memory: each variant runs once in a fresh ``spawn`` subprocess. It builds the inputs, runs
the plain MoCo step twice and the variant on two queries (one-off allocations), then resets the
kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads the resident size, runs
the variant once and reads the peak (``VmHWM``): the difference is the variant's peak memory
above what was already resident. The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
glibc maps every tensor of 64 KiB or more fresh and unmaps it on free: each such tensor shows up
in the resident size exactly while it lives, instead of being hidden in (or served from) freed
heap memory. Reported in MB (10^6 bytes): ``step`` variants minus ``moco`` (the extra peak of a
MoCHi step over plain MoCo logits) and the op alone. Without ``/proc`` the memory part is skipped.

Presets (``--preset``; any explicit flag overrides the preset's value):

* ``in1k`` (default), the paper's ImageNet-1k MoCo-v2 setting: B=256 queries against a queue of
  K=65536, D=128, MoCHi (N, s, s') = (1024, 1024, 256).
* ``mocov3``, MoCo-v3 scale as in ``recipes/in1k_vit_{small,base}_mocov3_mochi.yaml``: global
  batch B=4096, the negatives are the K=4096 gathered keys (key i is query i's positive and is
  masked out of the hard-negative selection, as ``moco_v3_loss`` does), proj_dim D=256,
  (N, s, s') = (256, 512, 256).

Examples (the results in ``benchmarks/results`` come from the last two, see
``benchmarks/README.md``)::

    python benchmarks/bench_mixing.py --quick
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_mixing.py --threads 1 2 \\
        --json benchmarks/results/mixing_cpu_in1k.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_mixing.py --preset mocov3 --threads 1 2 \\
        --reps 5 --warmup 1 --json benchmarks/results/mixing_cpu_mocov3.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from mochi_hub.mixing import mochi_logits
except ModuleNotFoundError:  # run from a checkout where the package is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mochi_hub.mixing import mochi_logits

STEPS = ("moco", "explicit", "fused")
OPS = ("explicit", "fused")
PRESETS = {
    "in1k": dict(batch=256, queue=65536, dim=128, num_hard=1024, s=1024, sp=256, mask=False),
    "mocov3": dict(batch=4096, queue=4096, dim=256, num_hard=256, s=512, sp=256, mask=True),
}
QUICK = dict(batch=8, queue=512, dim=32, num_hard=64, s=32, sp=16, reps=3, warmup=1)
DEFAULTS = dict(reps=7, warmup=2)
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="in1k", help="default in1k")
    p.add_argument("--batch", type=int, default=None, help="queries B")
    p.add_argument("--queue", type=int, default=None, help="negatives K (queue or gathered keys)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim D")
    p.add_argument("--num-hard", type=int, default=None, help="hard negatives N")
    p.add_argument("--s", type=int, default=None, help="pair-mixed points s")
    p.add_argument("--sp", type=int, default=None, help="query-mixed points s'")
    p.add_argument(
        "--mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mask key i out of query i's selection (MoCo-v3's positive); preset decides",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch thread counts to time"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting: " + str(QUICK))
    p.add_argument("--json", type=str, default=None, help="also write the results to this path")
    args = p.parse_args(argv)
    fill = {**PRESETS[args.preset], **DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in fill.items():
        if getattr(args, key) is None or (args.quick and key in QUICK):
            setattr(args, key, value)
    if args.threads is None:
        args.threads = [torch.get_num_threads()]
    return args


def config_of(args: argparse.Namespace) -> dict:
    keys = ("preset", "batch", "queue", "dim", "num_hard", "s", "sp", "mask", "reps", "warmup")
    return {**{k: getattr(args, k) for k in keys}, "threads": args.threads, "seed": args.seed}


def make_inputs(cfg: dict) -> dict:
    """Leaf z (B, D), unit keys (B, D), unit negatives (K, D), op inputs, optional mask (B, K)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, k, d = cfg["batch"], cfg["queue"], cfg["dim"]
    z = torch.randn(b, d, generator=g).requires_grad_(True)
    keys = F.normalize(torch.randn(b, d, generator=g), dim=1)
    negatives = torch.randn(k, d, generator=g)
    negatives /= negatives.norm(dim=1, keepdim=True)  # in place: no transient (K, D) copy
    q_op = F.normalize(z.detach(), dim=1).requires_grad_(True)
    mask = None
    if cfg["mask"]:
        mask = torch.zeros(b, k, dtype=torch.bool)
        mask.diagonal()[: min(b, k)] = True  # key i is query i's positive
    return dict(
        z=z,
        keys=keys,
        negatives=negatives,
        q_op=q_op,
        l_neg_op=torch.mm(q_op.detach(), negatives.T),  # (B, K), precomputed, no grad
        grad_op=torch.randn(b, cfg["s"] + cfg["sp"], generator=g),
        mask=mask,
    )


def _mochi(q, negatives, l_neg, cfg, impl, mask):
    return mochi_logits(
        q,
        negatives,
        l_neg,
        num_hard=cfg["num_hard"],
        num_synthetic=cfg["s"],
        num_synthetic_query=cfg["sp"],
        mask=mask,
        generator=torch.Generator().manual_seed(cfg["seed"] + 1),
        impl=impl,
    )


def step(variant: str, x: dict, cfg: dict) -> None:
    """One forward+backward of the full logits; the shared MoCo work is identical for all."""
    z = x["z"]
    z.grad = None
    q = F.normalize(z, dim=1)
    l_pos = (q * x["keys"]).sum(1, keepdim=True)
    l_neg = q @ x["negatives"].T
    parts = [l_pos, l_neg]
    if variant != "moco":
        parts.append(_mochi(q, x["negatives"], l_neg, cfg, variant, x["mask"]))
    torch.cat(parts, 1).sum().backward()


def op(impl: str, x: dict, cfg: dict) -> torch.Tensor:
    """The mixing op alone: forward, then backward into the leaf query; returns the logits."""
    q = x["q_op"]
    q.grad = None
    out = _mochi(q, x["negatives"], x["l_neg_op"], cfg, impl, x["mask"])
    out.backward(x["grad_op"])
    return out.detach()


def _jobs() -> list[tuple[str, str]]:
    return [("step", v) for v in STEPS] + [("op", v) for v in OPS]


def _run(kind: str, variant: str, x: dict, cfg: dict) -> None:
    if kind == "step":
        step(variant, x, cfg)
    else:
        op(variant, x, cfg)


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _memory_worker(cfg: dict, kind: str, variant: str, threads: int) -> float:
    """In a fresh spawned process: peak resident MB of one call above the resident size before."""
    torch.set_num_threads(threads)
    x = make_inputs(cfg)
    for _ in range(2):
        step("moco", x, cfg)
    x["z"].grad = None
    # One-off costs of the variant's kernels (e.g. embedding_bag's generated code): pay them on
    # two queries first, so that only the memory of the call itself is measured.
    small = dict(x, q_op=x["q_op"][:2].detach().requires_grad_(True), l_neg_op=x["l_neg_op"][:2])
    small.update(grad_op=x["grad_op"][:2], mask=None if x["mask"] is None else x["mask"][:2])
    if variant != "moco":
        op(variant, small, cfg)
    del small
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _proc_status_kib("VmRSS")
    _run(kind, variant, x, cfg)
    return (_proc_status_kib("VmHWM") - before) * 1024 / 1e6


def measure_memory(cfg: dict, threads: int) -> dict | None:
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in _MMAP_ENV}
    os.environ.update(_MMAP_ENV)  # inherited by the spawned children only while set
    try:
        peak = {}
        for kind, variant in _jobs():
            with ctx.Pool(processes=1) as pool:  # a fresh process per variant
                peak[f"{kind}_{variant}"] = pool.apply(
                    _memory_worker, (cfg, kind, variant, threads)
                )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "peak_mb": peak,
        "step_extra_over_moco_mb": {
            v: peak[f"step_{v}"] - peak["step_moco"] for v in ("explicit", "fused")
        },
        "op_peak_mb": {v: peak[f"op_{v}"] for v in OPS},
    }


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def time_all(cfg: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    x = make_inputs(cfg)
    jobs = _jobs()
    for _ in range(cfg["warmup"]):
        for job in jobs:
            _run(*job, x, cfg)
    wall = {f"{k}_{v}": [] for k, v in jobs}
    cpu = {f"{k}_{v}": [] for k, v in jobs}
    for rep in range(cfg["reps"]):
        shift = rep % len(jobs)
        for kind, variant in jobs[shift:] + jobs[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            _run(kind, variant, x, cfg)
            wall[f"{kind}_{variant}"].append(time.perf_counter() - t0)
            cpu[f"{kind}_{variant}"].append(time.process_time() - c0)
    return {"wall_s": wall, "cpu_s": cpu}


def parallel_op_ms(threads: int, calls: int = 200) -> float:
    """Wall ms of one tiny op that ATen runs in parallel (65536 floats, above its grain size).

    On an idle machine this is ~0.01 ms. With other jobs on the cores, every parallel region
    waits until all of its threads got the CPU again (~one scheduler slice each time), so this
    probe tells whether the timings at this thread count measure work or barrier waits.
    """
    torch.set_num_threads(threads)
    a, b = torch.ones(256, 256), torch.ones(256, 256)
    torch.add(a, b)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.add(a, b)
    return (time.perf_counter() - t0) / calls * 1e3


def summarise(times: dict) -> dict:
    wall = times["wall_s"]
    med = {k: statistics.median(v) for k, v in wall.items()}

    def paired(num: list, den: list) -> float:
        return statistics.median(a / b for a, b in zip(num, den, strict=True))

    add_e = [e - m for e, m in zip(wall["step_explicit"], wall["step_moco"], strict=True)]
    add_f = [f - m for f, m in zip(wall["step_fused"], wall["step_moco"], strict=True)]
    over_e, over_f = med["step_explicit"] - med["step_moco"], med["step_fused"] - med["step_moco"]
    return {
        "median_wall_s": med,
        "median_cpu_s": {k: statistics.median(v) for k, v in times["cpu_s"].items()},
        "op_ratio_explicit_over_fused": med["op_explicit"] / med["op_fused"],
        "op_ratio_paired": paired(wall["op_explicit"], wall["op_fused"]),
        "step_ratio_explicit_over_fused": med["step_explicit"] / med["step_fused"],
        "step_ratio_paired": paired(wall["step_explicit"], wall["step_fused"]),
        "step_fused_over_moco": med["step_fused"] / med["step_moco"],
        "step_explicit_over_moco": med["step_explicit"] / med["step_moco"],
        "overhead_ratio_explicit_over_fused": over_e / over_f if over_f > 0 else None,
        "overhead_ratio_paired": (paired(add_e, add_f) if all(f > 0 for f in add_f) else None),
    }


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "default_torch_threads": torch.get_num_threads(),
        "loadavg_at_start": load,
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        "device": "cpu",
        "dtype": "float32",
    }


def sanity(cfg: dict) -> dict:
    """Largest |explicit - fused| on the op's logits and on its gradient into q."""
    x = make_inputs(cfg)
    out_e = op("explicit", x, cfg)
    grad_e = x["q_op"].grad.clone()
    out_f = op("fused", x, cfg)
    grad_f = x["q_op"].grad.clone()
    return {
        "max_abs_logit_diff": (out_e - out_f).abs().max().item() if out_e.numel() else 0.0,
        "max_abs_grad_diff": (grad_e - grad_f).abs().max().item(),
    }


def _fmt_ratio(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}x"


def report(cfg: dict, threads: int, s: dict, memory: dict | None) -> None:
    med, cpu = s["median_wall_s"], s["median_cpu_s"]
    print(f"\n== threads={threads}  (medians of {cfg['reps']} reps; wall s, process cpu s)")
    header = f"{'':18} {'wall s':>9} {'cpu s':>9} {'peak MB':>10}"
    print(header)
    print("-" * len(header))
    for kind, variant in _jobs():
        key = f"{kind}_{variant}"
        mem = ""
        if memory is not None:
            mem = f"{memory['peak_mb'][key]:10.1f}"
        print(f"{kind + ' ' + variant:18} {med[key]:9.4f} {cpu[key]:9.4f} {mem}")
    print(
        f"op   explicit/fused: {_fmt_ratio(s['op_ratio_explicit_over_fused'])} "
        f"(paired {_fmt_ratio(s['op_ratio_paired'])})   <- primary"
    )
    print(
        f"step explicit/fused: {_fmt_ratio(s['step_ratio_explicit_over_fused'])} "
        f"(paired {_fmt_ratio(s['step_ratio_paired'])})"
    )
    print(
        f"step over moco: explicit {_fmt_ratio(s['step_explicit_over_moco'])}, "
        f"fused {_fmt_ratio(s['step_fused_over_moco'])};  MoCHi overhead explicit/fused: "
        f"{_fmt_ratio(s['overhead_ratio_explicit_over_fused'])} "
        f"(paired {_fmt_ratio(s['overhead_ratio_paired'])})"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = config_of(args)
    info = machine()
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in _ENV_KEYS if k in os.environ]
    argv_used = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    command = " ".join([*env, "python", *(shlex.quote(a) for a in argv_used)])
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(
        "setting: preset={preset} B={batch} K={queue} D={dim} N={num_hard} s={s} s'={sp} "
        "mask={mask} reps={reps} warmup={warmup} threads={threads}".format(**cfg)
    )
    torch.set_num_threads(args.threads[0])
    check = sanity(cfg)
    print(
        f"max |explicit - fused|: logits {check['max_abs_logit_diff']:.2e}, "
        f"grad wrt q {check['max_abs_grad_diff']:.2e}"
    )

    memory = None if args.no_memory else measure_memory(cfg, args.threads[0])
    if memory is not None:
        e, f = (
            memory["step_extra_over_moco_mb"]["explicit"],
            memory["step_extra_over_moco_mb"]["fused"],
        )
        print(
            f"extra peak MB of a step over plain MoCo: explicit {e:.1f}, fused {f:.1f};  "
            f"op alone: explicit {memory['op_peak_mb']['explicit']:.1f}, "
            f"fused {memory['op_peak_mb']['fused']:.1f}"
        )
    timing = {}
    for threads in args.threads:
        probe_before = parallel_op_ms(threads)
        times = time_all(cfg, threads)
        probe = [probe_before, parallel_op_ms(threads)]
        summary = summarise(times)
        report(cfg, threads, summary, memory)
        print(
            f"probe: one small parallel op took {probe[0]:.3f} / {probe[1]:.3f} ms (before / "
            "after the timing; ~0.01 ms when the cores are free)"
        )
        timing[str(threads)] = {**summary, "parallel_op_probe_ms": probe, **times}

    result = {
        "command": command,
        "machine": info,
        "config": cfg,
        "definitions": {
            "op": "mochi_logits(q, negatives, l_neg) forward + backward into the leaf q, "
            "l_neg precomputed and untimed",
            "step": "normalize, l_pos, l_neg = q @ negatives.T, [mochi_logits], cat, "
            "sum().backward()",
            "paired": "median over repetitions of the per-repetition ratio",
            "parallel_op_probe_ms": "wall ms of one 65536-float add (a parallel region) before "
            "and after the timing at that thread count; ~0.01 ms on free cores, ~a scheduler "
            "slice when other jobs hold the cores",
            "memory": "peak resident MB (1e6 bytes) of one call above the resident size "
            "before it, fresh process, MALLOC_MMAP_THRESHOLD_=65536",
        },
        "sanity": check,
        "memory": memory,
        "timing": timing,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
