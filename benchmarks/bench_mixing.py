"""Forward+backward cost of MoCHi's synthetic logits: ``impl="explicit"`` vs ``impl="fused"``.

Standalone script (no pytest). One timed call is a full MoCo-style logit step for a batch of
queries against a queue::

    q = normalize(z);  l_pos = q . k;  l_neg = q @ queue.T            # shared MoCo work
    syn = mochi_logits(q, queue, l_neg, impl=...)                     # the part under test
    cat([l_pos, l_neg, syn], 1).sum().backward()

The shared work is identical for both variants (and is also timed alone as ``moco``, the plain
MoCo baseline), so the ratio explicit/fused is a ratio of whole steps, and ``variant - moco`` is
what MoCHi adds. Variants are interleaved inside each repetition (with the order rotated between
repetitions) after a warm-up, and medians are reported.

Peak memory: ``tracemalloc`` does not see torch's allocations, so each variant is run in a fresh
``spawn`` subprocess that first runs the plain MoCo step twice (which also pays every one-off
allocation: thread pools, kernels, the inputs) and reads the resident high-water mark, then runs
the variant once and reads it again; the difference is the extra peak resident memory of the
variant over plain MoCo logits. The memory runs happen before the timing runs. Large tensors are
mmap-ed by glibc and returned on free, and every tensor measured is written (so resident); the
resolution is a few MiB of allocator noise.

Which high-water mark: on Linux ``VmHWM`` from ``/proc/self/status`` (the peak RSS of this
process's own address space). ``getrusage(RUSAGE_SELF).ru_maxrss`` is NOT usable there: Linux
carries it across ``execve``, so a spawned child starts with ``ru_maxrss`` equal to the RSS its
parent had when it forked (measured here: 1237 MiB in every child after the timing runs, hiding
the variants completely). ``ru_maxrss`` is only the fallback where ``/proc`` does not exist.

Examples::

    python benchmarks/bench_mixing.py --quick
    python benchmarks/bench_mixing.py          # B=256 K=65536 D=128 N=1024 s=1024 s'=256
    python benchmarks/bench_mixing.py --batch 64 --json benchmarks/results/mixing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
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

VARIANTS = ("moco", "explicit", "fused")
QUICK = dict(batch=8, queue=512, dim=32, num_hard=64, s=32, sp=16, reps=3, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="queries B (default 256)")
    p.add_argument("--queue", type=int, default=65536, help="queue size K (default 65536)")
    p.add_argument("--dim", type=int, default=128, help="embedding dim D (default 128)")
    p.add_argument("--num-hard", type=int, default=1024, help="hard negatives N (default 1024)")
    p.add_argument("--s", type=int, default=1024, help="pair-mixed points s (default 1024)")
    p.add_argument("--sp", type=int, default=256, help="query-mixed points s' (default 256)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per variant")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting: " + str(QUICK))
    p.add_argument("--json", type=str, default=None, help="also write the results to this path")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def config_of(args: argparse.Namespace) -> dict:
    keys = ("batch", "queue", "dim", "num_hard", "s", "sp", "reps", "warmup", "threads", "seed")
    return {k: getattr(args, k) for k in keys}


def make_inputs(cfg: dict):
    g = torch.Generator().manual_seed(cfg["seed"])
    b, k, d = cfg["batch"], cfg["queue"], cfg["dim"]
    z = torch.randn(b, d, generator=g).requires_grad_(True)
    keys = F.normalize(torch.randn(b, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, keys, queue


def step(variant: str, z: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, cfg: dict):
    """One forward+backward of the full logits; the shared MoCo work is identical for all."""
    z.grad = None
    q = F.normalize(z, dim=1)
    l_pos = (q * keys).sum(1, keepdim=True)
    l_neg = q @ queue.T
    parts = [l_pos, l_neg]
    if variant != "moco":
        parts.append(
            mochi_logits(
                q,
                queue,
                l_neg,
                num_hard=cfg["num_hard"],
                num_synthetic=cfg["s"],
                num_synthetic_query=cfg["sp"],
                generator=torch.Generator().manual_seed(cfg["seed"] + 1),
                impl=variant,
            )
        )
    torch.cat(parts, 1).sum().backward()


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (see the module docstring for why not ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _memory_worker(cfg: dict, variant: str) -> tuple[float, float]:
    """Runs in a fresh spawned process: (peak RSS after plain MoCo, peak RSS after variant)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    z, keys, queue = make_inputs(cfg)
    for _ in range(2):
        step("moco", z, keys, queue, cfg)
    before = _peak_rss_mib()
    step(variant, z, keys, queue, cfg)
    return before, _peak_rss_mib()


def measure_memory(cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for variant in VARIANTS:
        with ctx.Pool(processes=1) as pool:  # a fresh process per variant
            before, after = pool.apply(_memory_worker, (cfg, variant))
        out[variant] = {"baseline_peak_mib": before, "extra_peak_mib": after - before}
    return out


def time_variants(cfg: dict) -> dict:
    z, keys, queue = make_inputs(cfg)
    for _ in range(cfg["warmup"]):
        for variant in VARIANTS:
            step(variant, z, keys, queue, cfg)
    times = {v: [] for v in VARIANTS}
    for rep in range(cfg["reps"]):
        shift = rep % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            t0 = time.perf_counter()
            step(variant, z, keys, queue, cfg)
            times[variant].append(time.perf_counter() - t0)
    return times


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_of(args)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(
        "setting: B={batch} K={queue} D={dim} N={num_hard} s={s} s'={sp} "
        "reps={reps} warmup={warmup}".format(**cfg)
    )
    # Sanity: both implementations give the same logits on these inputs.
    z, _, queue = make_inputs(cfg)
    with torch.no_grad():
        q = F.normalize(z, dim=1)
        kw = dict(num_hard=cfg["num_hard"], num_synthetic=cfg["s"], num_synthetic_query=cfg["sp"])
        le = mochi_logits(
            q, queue, generator=torch.Generator().manual_seed(1), impl="explicit", **kw
        )
        lf = mochi_logits(q, queue, generator=torch.Generator().manual_seed(1), impl="fused", **kw)
    max_diff = (le - lf).abs().max().item() if le.numel() else 0.0
    print(f"max |explicit - fused| logits: {max_diff:.2e}")
    del z, queue, q, le, lf

    memory = None if args.no_memory else measure_memory(cfg)
    times = time_variants(cfg)
    med = {v: statistics.median(t) for v, t in times.items()}

    print()
    header = f"{'variant':<9} {'median s':>9} {'min s':>9} {'- moco s':>9} {'extra peak MiB':>15}"
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        extra = "" if memory is None else f"{memory[v]['extra_peak_mib']:15.1f}"
        print(f"{v:<9} {med[v]:9.4f} {min(times[v]):9.4f} {med[v] - med['moco']:9.4f} {extra}")
    ratio = med["explicit"] / med["fused"]
    add_e, add_f = med["explicit"] - med["moco"], med["fused"] - med["moco"]
    print(f"\nratio explicit/fused (whole step, medians): {ratio:.2f}x")
    if add_f > 0:
        print(f"ratio of MoCHi overheads over MoCo (explicit/fused): {add_e / add_f:.2f}x")
    if memory is not None:
        print(f"baseline (plain MoCo) peak RSS: {memory['moco']['baseline_peak_mib']:.0f} MiB")

    result = {
        "machine": info,
        "config": cfg,
        "max_abs_logit_diff": max_diff,
        "times_s": times,
        "median_s": med,
        "ratio_explicit_over_fused": ratio,
        "memory": memory,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
