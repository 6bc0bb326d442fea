"""Weighted k-nearest-neighbour classification of embeddings (the MoCo / InstDisc monitor).

A query's class scores are the sums, per class, of ``exp(cos_sim / T)`` over its k most
similar training embeddings (Wu et al. 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"; k = 200, T = 0.07 by default as in the MoCo
monitors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_accuracy", "weighted_knn_scores"]


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _split_batch(batch: Any, image_key: str, label_key: str) -> tuple[Tensor, Tensor]:
    """Return (images, labels) from a dict batch or an ``(images, labels, ...)`` sequence."""
    if isinstance(batch, Mapping):
        missing = [k for k in (image_key, label_key) if k not in batch]
        if missing:
            raise ValueError(f"batch is missing key(s) {missing}; available keys: {list(batch)}")
        return batch[image_key], torch.as_tensor(batch[label_key])
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise TypeError(
        f"batches must be dicts with {image_key!r}/{label_key!r} or (images, labels) sequences, "
        f"got {type(batch).__name__}"
    )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    gather: Callable[[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, Tensor]:
    """Embed every batch of ``loader`` with ``model`` and L2-normalise the embeddings.

    The model runs in eval mode; afterwards every submodule gets back its own previous
    ``training`` flag (so, e.g., BatchNorm layers deliberately frozen in eval mode stay so).

    Args:
        model: Maps images (B, 3, H, W) to embeddings (B, D) (outputs with more dimensions
            are flattened to (B, -1)).
        loader: Iterable of dict batches (``image_key``/``label_key``) or ``(images, labels)``
            sequences.
        device: Where to run the model; defaults to the device of its parameters.
        image_key: Key of the images in dict batches.
        label_key: Key of the labels in dict batches.
        gather: With a loader sharded over processes, a function collecting each batch's
            ``(features, labels)`` from all of them (``accelerator.gather_for_metrics``), so
            that every process returns the whole set once.
        autocast: Context manager factory for the forward pass (``accelerator.autocast``).

    Returns:
        ``(features, labels)``: unit-norm float32 features (M, D) and int64 labels (M,),
        both on the CPU.

    Raises:
        ValueError: If the loader is empty, a key is missing, or outputs/labels mismatch.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for batch in loader:
            images, y = _split_batch(batch, image_key, label_key)
            with autocast():
                out = model(images.to(device, non_blocking=True))
            if not isinstance(out, Tensor):
                raise TypeError(f"model must return a tensor, got {type(out).__name__}")
            out = out.flatten(1) if out.dim() > 2 else out
            if out.dim() != 2 or out.shape[0] != y.shape[0]:
                raise ValueError(
                    f"model output {tuple(out.shape)} does not match {y.shape[0]} labels"
                )
            out, y = F.normalize(out.float(), dim=1), y.to(out.device).reshape(-1).long()
            if gather is not None:
                out, y = gather((out, y))
            feats.append(out.cpu())
            labels.append(y.cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def _check_bank(train_features: Tensor, train_labels: Tensor, query_features: Tensor) -> None:
    """Validate the shapes of a (N, D) bank, its (N,) labels and (Q, D) queries."""
    if train_features.dim() != 2:
        raise ValueError(f"train_features must be (N, D), got {tuple(train_features.shape)}")
    if train_labels.dim() != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(
            f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty")
    if query_features.dim() != 2 or query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"query features must be (Q, {train_features.shape[1]}), "
            f"got {tuple(query_features.shape)}"
        )


def weighted_knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores of each query (InstDisc / MoCo monitor).

    Features are L2-normalised here (a no-op for unit-norm inputs), so similarities are
    cosines. For each query, the ``min(k, N)`` most similar training samples vote for their
    class with weight ``exp(sim / temperature)``. Queries are processed ``chunk_size`` at a
    time, so memory is O(chunk_size * N).

    Args:
        train_features: Training (bank) embeddings, shape (N, D).
        train_labels: Their integer labels in [0, num_classes), shape (N,).
        query_features: Query embeddings, shape (Q, D).
        num_classes: Number of classes C.
        k: Number of neighbours (clipped to N).
        temperature: Softmax-like temperature T > 0 of the vote weights.
        chunk_size: Queries per chunk.

    Returns:
        Class scores (Q, C) in the promoted floating dtype of the features (at least float32),
        on the features' device.

    Raises:
        ValueError: On inconsistent shapes, labels out of range or invalid hyperparameters.
    """
    _check_bank(train_features, train_labels, query_features)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = train_labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes}), got {labels.unique()}")

    dtype = torch.promote_types(
        torch.promote_types(train_features.dtype, query_features.dtype), torch.float32
    )
    bank = F.normalize(train_features.to(dtype), dim=1)  # (N, D)
    queries = F.normalize(query_features.to(device=bank.device, dtype=dtype), dim=1)  # (Q, D)
    labels = labels.to(bank.device)
    k = min(k, bank.shape[0])
    scores = torch.zeros(queries.shape[0], num_classes, dtype=dtype, device=bank.device)
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T  # (c, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        weights = (top_sim / temperature).exp()  # (c, k)
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return scores


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.07,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy (percent) of the weighted kNN classifier on a labelled test set.

    Args:
        train_features: Bank embeddings, shape (N, D).
        train_labels: Bank labels, shape (N,).
        test_features: Test embeddings, shape (M, D).
        test_labels: Test labels, shape (M,).
        num_classes: Number of classes C; defaults to 1 + the largest label seen.
        k: Number of neighbours (clipped to N).
        temperature: Vote temperature T > 0.
        topk: Which top-k accuracies to report; each k is clipped to C (so "top5" with 3
            classes is the top-3 accuracy, i.e. 100).

    Returns:
        ``{"top1": ..., "top5": ...}`` (one ``f"top{k}"`` entry per requested k), in percent.

    Raises:
        ValueError: On inconsistent shapes, an empty test set, or invalid arguments.
    """
    _check_bank(train_features, train_labels, test_features)
    if test_labels.dim() != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"test_labels must be ({test_features.shape[0]},), got {tuple(test_labels.shape)}"
        )
    if test_features.shape[0] == 0:
        raise ValueError("test_features is empty")
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be a non-empty sequence of ints >= 1, got {topk}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = weighted_knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
    )  # (M, C)
    target = test_labels.to(scores.device).long()
    ranked = scores.topk(min(max(topk), num_classes), dim=1).indices  # (M, kmax)
    hits = ranked == target[:, None]  # (M, kmax)
    n = hits.shape[0]
    correct = {t: int(hits[:, : min(t, num_classes)].any(dim=1).sum()) for t in topk}
    return {f"top{t}": 100.0 * c / n for t, c in correct.items()}
