"""The MoCo memory queue: a ring buffer of past keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MemoryQueue"]


class MemoryQueue(nn.Module):
    """Ring buffer of K unit-norm keys, the negatives of MoCo-v2 and the pool of MoCHi.

    Both the keys and the write pointer are persistent buffers, so they are saved and restored
    with the model's state dict (a resumed run continues with the same negatives). The queue is
    filled with random unit vectors at start, as in MoCo; only real keys are ever written, and
    writing wraps around when K is not a multiple of the batch. Enqueueing is an explicit call
    (never part of ``forward``) and has no host-device synchronisation.

    Args:
        size: Number K of stored keys.
        dim: Key dimension D.
        generator: Optional generator for the random initial keys.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"queue dim must be >= 1, got {dim}")
        keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", keys)  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number K of stored keys."""
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (B, D) over the oldest entries and advance the pointer by B.

        Call it with the keys of *all* processes (see :func:`mochi_hub.distributed.gather_no_grad`)
        so that every rank's queue stays identical.

        Raises:
            ValueError: If B exceeds the queue size or D does not match.
        """
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"keys must have shape (B, {self.keys.shape[1]}), got {tuple(keys.shape)}"
            )
        if n > self.size:
            raise ValueError(
                f"cannot enqueue {n} keys into a queue of size {self.size}; "
                "the queue must be at least as large as the global batch"
            )
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size  # (B,)
        self.keys.index_copy_(0, idx, keys.detach().to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:  # noqa: D102
        return f"size={self.size}, dim={self.keys.shape[1]}"
