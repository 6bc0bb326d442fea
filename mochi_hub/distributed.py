"""Collectives that are the identity in one process.

Modules call these helpers instead of ``torch.distributed`` so that they behave the same on one
process and on many; device placement and process-group setup are Accelerate's job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_no_grad", "gather_with_grad", "rank", "world_size"]


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient.

    Args:
        x: (B, ...) tensor with the same shape on every rank.

    Returns:
        (world_size * B, ...) tensor, rank 0's rows first; ``x`` itself in one process.
    """
    n = world_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size(), dim=0)[rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_no_grad`, but gradients flow back to each rank's own rows."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)
