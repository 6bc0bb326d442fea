"""Helpers shared by the step, pipeline and distributed benchmarks (not a benchmark itself).

House style (see ``bench_mixing.py``): a benchmark is a standalone script; the baseline and the
candidate run in the same process on the same inputs, interleaved inside each repetition with
the order rotated between repetitions, after an untimed warm-up; medians are reported, and the
results go to a JSON file with the machine and the exact command.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(ROOT))


def add_run_args(parser, quick_help: str) -> None:
    """The options every benchmark shares: ``--seed``, ``--quick``, ``--json``, ``--no-json``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"smoke setting: {quick_help}")
    parser.add_argument("--json", default=None, help="results path (default: benchmarks/results)")
    parser.add_argument("--no-json", action="store_true", help="do not write the results file")


def machine(device: torch.device | str = "cpu") -> dict:
    """Description of the machine, the libraries and the torch thread settings."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LAUNCHER_ENV = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "OMP_NUM_THREADS",
    "ACCELERATE_MIXED_PRECISION",
    "CUDA_VISIBLE_DEVICES",
)


def command_line() -> str:
    """The command that started this run; under torchrun, the torchrun command line."""
    script = shlex.join(sys.argv)
    if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        nproc = os.environ["LOCAL_WORLD_SIZE"]
        return f"torchrun --standalone --nproc_per_node {nproc} {script}"
    return shlex.join([sys.executable, *sys.argv])


def launch_info() -> dict:
    """This process's exact command and the launcher's environment variables."""
    return {
        "process_command": shlex.join([sys.executable, *sys.argv]),
        "env": {k: os.environ[k] for k in LAUNCHER_ENV if k in os.environ},
    }


def print_machine(info: dict) -> None:
    """One line with the machine description."""
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU), so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: Sequence[str], run: Callable[[str], float | dict], reps: int, warmup: int
) -> dict[str, list]:
    """Run each variant ``warmup`` times untimed, then ``reps`` times interleaved.

    Repetition ``r`` runs the variants in the order rotated by ``r``, so no variant always runs
    first (or right after the same other one).

    Args:
        variants: Names of the variants.
        run: ``run(variant)`` does one timed unit and returns its time (or a dict of times).
        reps: Timed repetitions per variant.
        warmup: Untimed calls per variant before the timed ones.

    Returns:
        ``{variant: [result of each timed call]}``.
    """
    for _ in range(warmup):
        for v in variants:
            run(v)
    out: dict[str, list] = {v: [] for v in variants}
    n = len(variants)
    for rep in range(reps):
        shift = rep % n
        for v in list(variants[shift:]) + list(variants[:shift]):
            out[v].append(run(v))
    return out


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn()`` in seconds, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    """The median (NaN for an empty sequence)."""
    return statistics.median(values) if values else float("nan")


def default_json(name: str, device: torch.device | str, quick: bool) -> Path | None:
    """``benchmarks/results/<name>_<device type>.json``; None for ``--quick`` smoke runs."""
    return None if quick else RESULTS / f"{name}_{torch.device(device).type}.json"


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    """Write ``result`` (with the command that produced it) to ``path`` if given."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "launch": launch_info(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
