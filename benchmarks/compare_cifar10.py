"""MoCo-v2 against MoCo-v2 + MoCHi on a CIFAR-10 subset: same code, budget and seeds.

Pretrains both methods for every seed with ``benchmarks/cifar10/mochi.yaml`` (the baseline with
``mixing.enabled=false``), then evaluates every backbone with weighted kNN and the logistic
probe (``mochi-hub eval``) on the test split, and writes the table with mean and spread over the
seeds to ``benchmarks/results/cifar10_mocov2_vs_mochi.{json,md}`` with the commands that made it.

    python benchmarks/compare_cifar10.py --seeds 0 1 2            # pretrain + evaluate (~1 h)
    python benchmarks/compare_cifar10.py --seeds 0 1 2 --phase eval   # evaluate finished runs

On 2 cores the fastest way is one method per process, one thread each, in parallel::

    OMP_NUM_THREADS=1 python benchmarks/compare_cifar10.py --phase pretrain --methods mocov2 &
    OMP_NUM_THREADS=1 python benchmarks/compare_cifar10.py --phase pretrain --methods mochi
    python benchmarks/compare_cifar10.py --phase eval

Runs are resumable: a finished pretraining run (``results.json`` present) is not repeated.
Needs ../shared/data/cifar10 (Parquet) beside the checkout; see its README (lossy JPEG copies:
compare the methods with each other, not with published CIFAR-10 numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "cifar10" / "mochi.yaml"
DATA = ROOT.parent / "shared" / "data" / "cifar10"
METHODS = {"mocov2": ["mixing.enabled=false"], "mochi": []}


def _run(cmd: list[str], log: Path) -> None:
    print("+", shlex.join(cmd), flush=True)
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {shlex.join(cmd)}")


def pretrain_cmd(method: str, seed: int, run_dir: Path, epochs: int) -> list[str]:
    """The ``mochi-hub pretrain`` command of one run."""
    return [
        sys.executable, "-m", "mochi_hub", "pretrain", str(RECIPE.relative_to(ROOT)),
        f"train.seed={seed}", f"train.epochs={epochs}", f"train.output_dir={run_dir}",
        "train.log_with=none", *METHODS[method],
    ]  # fmt: skip


def eval_cmd(run_dir: Path, protocol: str, out: Path) -> list[str]:
    """The ``mochi-hub eval`` command of one run and protocol."""
    return [
        sys.executable, "-m", "mochi_hub", "eval", str(run_dir), "--data", str(DATA),
        "--protocol", protocol, "--train-split", "train", "--val-split", "test",
        "--max-train-images", "10000", "--out", str(out),
    ]  # fmt: skip


def _rows(path: Path) -> dict[str, float]:
    return {row["metric"]: float(row["value"]) for row in json.loads(path.read_text())}


def _summary(values: list[float]) -> dict[str, float]:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values)}


def main() -> int:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="pretrain only these (e.g. one method per process, in parallel, one thread each)",
    )
    p.add_argument("--phase", choices=["all", "pretrain", "eval"], default="all")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "cifar10_compare")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the CIFAR-10 Parquet copy lies beside the checkout")
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "commands.log"
    table: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    per_run = []
    for seed in args.seeds:
        for method in args.methods:
            run = args.runs / f"{method}_seed{seed}"
            if args.phase in ("all", "pretrain") and not (run / "results.json").is_file():
                _run(pretrain_cmd(method, seed, run, args.epochs), log)
            if args.phase == "pretrain":
                continue
            result = json.loads((run / "results.json").read_text())
            row = {"method": method, "seed": seed, "pretrain_s": result["wall_seconds"]}
            for protocol in ("knn", "probe"):
                out = run / f"eval_{protocol}.json"
                if not out.is_file():
                    _run(eval_cmd(run, protocol, out), log)
                for metric, value in _rows(out).items():
                    row[f"{protocol}_{metric}"] = value
                    table[method].setdefault(f"{protocol}_{metric}", []).append(value)
            per_run.append(row)
            print(json.dumps(row), flush=True)
    if args.phase == "pretrain":
        return 0
    summary = {m: {k: _summary(v) for k, v in metrics.items()} for m, metrics in table.items()}
    report = {
        "what": "MoCo-v2 vs MoCo-v2 + MoCHi (256, 256, 128) on a CIFAR-10 subset, same budget",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "commands": {
            "pretrain": shlex.join(pretrain_cmd("mochi", 0, Path("RUN"), args.epochs)),
            "evaluate": shlex.join(eval_cmd(Path("RUN"), "probe", Path("OUT"))),
            "this table": "python benchmarks/compare_cifar10.py --seeds "
            + " ".join(map(str, args.seeds)),
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "runs": per_run,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cifar10_mocov2_vs_mochi.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| method | kNN top-1 (%) | probe top-1 (%) | seeds |",
        "|---|---|---|---|",
    ]
    for method, metrics in summary.items():
        knn, probe = metrics["knn_top1"], metrics["probe_top1"]
        lines.append(
            f"| {method} | {knn['mean']:.2f} ± {knn['std']:.2f} | "
            f"{probe['mean']:.2f} ± {probe['std']:.2f} | {len(args.seeds)} |"
        )
    (args.out / "cifar10_mocov2_vs_mochi.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
