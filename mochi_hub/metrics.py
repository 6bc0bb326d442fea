"""Embedding-quality metrics used for monitoring (Wang & Isola, ICML 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["alignment", "uniformity"]


@torch.no_grad()
def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """``E ||x_i - y_i||^alpha`` over positive pairs of unit vectors; lower is better.

    Args:
        x: (B, D) unit-norm embeddings.
        y: (B, D) unit-norm embeddings of the positives.
        alpha: Exponent (2 in the paper).

    Returns:
        0-dim tensor.
    """
    return (x.float() - y.float()).norm(dim=1).pow(alpha).mean()


@torch.no_grad()
def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """``log E_{i != j} exp(-t ||x_i - x_j||^2)`` over unit vectors; lower is better.

    Args:
        x: (B, D) unit-norm embeddings, B >= 2.
        t: Temperature (2 in the paper).

    Returns:
        0-dim tensor.
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least two embeddings")
    sq = torch.pdist(x.float(), p=2).pow(2)  # (B (B - 1) / 2,)
    return sq.mul(-t).exp().mean().log()
