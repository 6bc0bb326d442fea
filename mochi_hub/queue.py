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

    With ``track_labels`` the queue also stores each key's class label (-1: unknown, e.g. the
    random initial keys), for the class-oracle analysis and the oracle training mode; labels are
    never used by the contrastive loss itself.

    Args:
        size: Number K of stored keys.
        dim: Key dimension D.
        generator: Optional generator for the random initial keys.
        track_labels: Also keep a (K,) ``labels`` buffer.
    """

    keys: Tensor
    ptr: Tensor
    labels: Tensor | None

    def __init__(
        self,
        size: int,
        dim: int,
        generator: torch.Generator | None = None,
        track_labels: bool = False,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"queue dim must be >= 1, got {dim}")
        keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", keys)  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        labels = torch.full((size,), -1, dtype=torch.long) if track_labels else None
        self.register_buffer("labels", labels)  # a None buffer is not in the state dict

    @property
    def size(self) -> int:
        """Number K of stored keys."""
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Write ``keys`` (B, D) over the oldest entries and advance the pointer by B.

        Call it with the keys of *all* processes (see :func:`mochi_hub.distributed.gather_no_grad`)
        so that every rank's queue stays identical.

        Args:
            keys: (B, D) keys.
            labels: (B,) class labels of the keys, kept when the queue tracks labels (-1 is
                written when they are not given).

        Raises:
            ValueError: If B exceeds the queue size, D does not match, or ``labels`` do not have
                shape (B,).
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
        if self.labels is not None:
            if labels is None:
                labels = torch.full((n,), -1, dtype=torch.long, device=self.keys.device)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
            self.labels.index_copy_(0, idx, labels.to(self.labels.device, torch.long))
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:  # noqa: D102
        labels = ", track_labels=True" if self.labels is not None else ""
        return f"size={self.size}, dim={self.keys.shape[1]}{labels}"
