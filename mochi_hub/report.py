"""Plots of a run's training analysis, rendered from its logs (``mochi-hub report``).

A run directory holds ``metrics.jsonl`` (one line per logged step: loss, proxy-task accuracy
with and without MoCHi's synthetic points, the synthetic share among the hardest negatives,
hardest synthetic minus hardest real similarity, alignment and uniformity, the share of
same-class negatives among the hardest, kNN accuracy) and ``analysis.jsonl`` (one line per epoch:
the hardness profile, the paper's Fig. 2a). Several runs can be drawn on the same axes, e.g. a
MoCo-v2 baseline against MoCHi. matplotlib is an optional dependency (``pip install
mochi_hub[plots]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PANELS", "read_analysis", "read_metrics", "render_report"]

# (title, y label, [(metric key, legend suffix)])
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("InfoNCE loss", "loss", (("train/loss", ""),)),
    (
        "Proxy-task accuracy",
        "%",
        (("train/proxy_acc", "with synthetic"), ("train/proxy_acc_real", "real negatives only")),
    ),
    ("kNN top-1 (held-out)", "%", (("knn/top1", ""),)),
    ("Hardest real negative", "cosine similarity", (("train/hardest_neg_sim", ""),)),
    ("Synthetic share among the top-N", "%", (("train/syn_share_topn", ""),)),
    (
        "Hardest synthetic - hardest real",
        "cosine difference",
        (("train/max_syn_minus_max_real", ""),),
    ),
    ("Alignment (lower is better)", "alignment", (("train/alignment", ""),)),
    ("Uniformity (lower is better)", "uniformity", (("train/uniformity", ""),)),
    ("Class oracle: same class in the top-N", "%", (("train/false_neg_share_topn", ""),)),
)
# Logged by every run, but only meaningful when the run mixes (a baseline logs the real value).
_NEEDS_SYNTHETIC = {"train/proxy_acc"}


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Per metric, the (step, value) pairs of ``metrics.jsonl``, in the order they were logged.

    Lines appended by a resumed run after a rewind replace the earlier values of the same
    steps, so every step appears once.

    Raises:
        FileNotFoundError: If the run has no ``metrics.jsonl``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a mochi_hub run directory?")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = row.pop("step", None)
        for key, value in row.items():
            if isinstance(value, int | float) and step is not None:
                series.setdefault(key, {})[int(step)] = float(value)
    return {key: sorted(values.items()) for key, values in series.items()}


def read_analysis(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``analysis.jsonl`` (the last one of each epoch), oldest first."""
    path = Path(run_dir) / "analysis.jsonl"
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'mochi_hub[plots]' (or pip install matplotlib)"
        ) from e
    return plt


def _curves_figure(plt, runs: dict[str, dict], path: Path) -> Path:
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    for ax, (title, ylabel, keys) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for label, metrics in runs.items():
            for key, suffix in keys:
                points = metrics.get(key)
                if not points or (
                    key in _NEEDS_SYNTHETIC and "train/syn_share_topn" not in metrics
                ):
                    continue
                steps, values = zip(*points, strict=True)
                name = " ".join(p for p in (label if len(runs) > 1 else "", suffix) if p)
                marker = "o" if len(points) < 30 else None
                ax.plot(steps, values, label=name or None, marker=marker, markersize=3)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _profile_figure(plt, analyses: dict[str, list[dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(analyses), figsize=(6 * len(analyses), 4.5), squeeze=False)
    for ax, (label, rows) in zip(axes.flat, analyses.items(), strict=True):
        cmap = plt.get_cmap("viridis")
        for i, row in enumerate(rows):
            profile = row["hardness_profile"]
            color = cmap(i / max(1, len(rows) - 1))
            ax.plot(range(1, len(profile) + 1), profile, color=color, label=f"epoch {row['epoch']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank of the negative (hardest first)")
        ax.set_ylabel("mean softmax probability")
        ax.set_title(f"Hardness profile {label}".strip())
        ax.grid(alpha=0.3, which="both")
        if len(rows) <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_report(
    run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Draw the training curves and the hardness profile of one or several runs as PNG files.

    Args:
        run_dirs: A run directory or several (drawn on the same axes).
        out_dir: Where the images go; ``<first run>/report`` by default.
        labels: Legend names of the runs; their directory names by default.

    Returns:
        The written files: ``training_curves.png`` and, when an ``analysis.jsonl`` exists,
        ``hardness_profile.png``.

    Raises:
        FileNotFoundError: If a run has no ``metrics.jsonl``.
        ValueError: If ``labels`` does not name every run.
    """
    dirs = (
        [Path(run_dirs)] if isinstance(run_dirs, str | os.PathLike) else list(map(Path, run_dirs))
    )
    if not dirs:
        raise ValueError("no run directory given")
    names = list(labels) if labels is not None else [d.name for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"{len(names)} labels for {len(dirs)} runs")
    runs = {name: read_metrics(d) for name, d in zip(names, dirs, strict=True)}
    analyses = {name: read_analysis(d) for name, d in zip(names, dirs, strict=True)}
    analyses = {name: rows for name, rows in analyses.items() if rows}
    out = Path(out_dir) if out_dir is not None else dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = [_curves_figure(plt, runs, out / "training_curves.png")]
    if analyses:
        written.append(_profile_figure(plt, analyses, out / "hardness_profile.png"))
    return written
