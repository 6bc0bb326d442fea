"""MoCo-v2 and MoCo-v3 models around any timm backbone.

The modules compute; they never change their own state in ``forward``. The training engine calls
:meth:`momentum_update` and ``queue.enqueue`` explicitly, in a visible order. The momentum
encoder and the queue are persistent, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mochi_hub import distributed
from mochi_hub.heads import mocov2_projector, mocov3_mlp
from mochi_hub.queue import MemoryQueue

__all__ = ["MoCoV2", "MoCoV3", "create_backbone", "momentum_cosine"]


def create_backbone(arch: str, **kwargs) -> nn.Module:
    """A timm model without classifier, its pooled width in ``num_features``.

    Args:
        arch: Any timm architecture name (``resnet50``, ``vit_small_patch16_224``, ...).
        **kwargs: Passed to :func:`timm.create_model` (``img_size``, ``channels``, ...).

    Returns:
        The backbone, mapping images (B, 3, H, W) to features (B, num_features).
    """
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r}")
    kwargs.setdefault("num_classes", 0)
    if kwargs["num_classes"] != 0:
        raise ValueError("a MoCo backbone has no classifier: num_classes must be 0")
    return timm.create_model(arch, pretrained=False, **kwargs)


def momentum_cosine(base: float, progress: float) -> float:
    """MoCo-v3's momentum ramp ``1 - (1 - base) * (1 + cos(pi * progress)) / 2``.

    Args:
        base: Momentum at the start (0.99 in MoCo-v3).
        progress: Fraction of training done, in [0, 1].

    Returns:
        The momentum; ``base`` at 0 and 1.0 at the end.
    """
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _freeze_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class _MomentumModel(nn.Module):
    """Shared momentum-encoder logic: online modules and their EMA copies."""

    def _momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """EMA of the parameters: ``theta_k <- m * theta_k + (1 - m) * theta_q``.

        Only parameters are averaged (BatchNorm running statistics are the momentum encoder's
        own), as in MoCo. Call it once per step on the unwrapped model.

        Args:
            momentum: m in [0, 1].
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        online, target = [], []
        for q_mod, k_mod in self._momentum_pairs():
            online += list(q_mod.parameters())
            target += list(k_mod.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)


class MoCoV2(_MomentumModel):
    """MoCo-v2: query encoder, momentum key encoder with the same MLP head, and a memory queue.

    Args:
        backbone: Feature extractor with a ``num_features`` attribute (see :func:`create_backbone`).
        proj_dim: Embedding dimension (128).
        proj_hidden_dim: Hidden width of the MLP head; the backbone width when None.
        queue_size: Number K of negatives in the queue (65536).
        generator: Optional generator for the queue's random initial keys.
        queue_labels: The queue also keeps the class labels of its keys (analysis, oracle).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_dim: int = 128,
        proj_hidden_dim: int | None = None,
        queue_size: int = 65536,
        generator: torch.Generator | None = None,
        queue_labels: bool = False,
    ) -> None:
        super().__init__()
        width = int(backbone.num_features)
        self.backbone = backbone
        self.projector = mocov2_projector(width, proj_hidden_dim or width, proj_dim)
        self.momentum_backbone = _freeze_copy(backbone)
        self.momentum_projector = _freeze_copy(self.projector)
        self.queue = MemoryQueue(
            queue_size, proj_dim, generator=generator, track_labels=queue_labels
        )

    def _momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        yield self.backbone, self.momentum_backbone
        yield self.projector, self.momentum_projector

    def embed_query(self, x: Tensor) -> Tensor:
        """Unit-norm query embeddings (B, proj_dim) in float32, with gradient."""
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    @torch.no_grad()
    def _encode_keys(self, x: Tensor, splits: int) -> Tensor:
        chunks = x.chunk(splits) if splits > 1 else (x,)  # separate BatchNorm statistics
        z = torch.cat([self.momentum_projector(self.momentum_backbone(c)) for c in chunks])
        return F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def embed_key(self, x: Tensor, perm: Tensor | None = None, splits: int = 1) -> Tensor:
        """Unit-norm key embeddings (B, proj_dim) in float32 from the momentum encoder.

        Shuffle-BN (MoCo's guard against BatchNorm "cheating"): with ``perm``, a permutation of
        the global batch identical on every rank, each process encodes a shuffled share of all
        processes' images, so the key encoder's BatchNorm statistics come from other images
        than the query encoder's; the keys are then returned in the original order. In one
        process the shuffle alone changes nothing for BatchNorm; ``splits`` > 1 then encodes the
        shuffled batch in that many chunks, each with its own statistics (split-BN).

        Args:
            x: Key view of this process (B, 3, H, W).
            perm: Permutation of ``range(world_size * B)``, the same on all ranks; or None.
            splits: Number of chunks the (shuffled) batch is encoded in.

        Returns:
            This process's keys (B, proj_dim), in the order of ``x``.
        """
        if perm is None:
            return self._encode_keys(x, splits)
        world, b = distributed.world_size(), x.shape[0]
        if perm.numel() != world * b:
            raise ValueError(f"perm must have world_size * B = {world * b} entries")
        x_all = distributed.gather_no_grad(x)  # (W * B, 3, H, W)
        mine = perm.view(world, b)[distributed.rank()]  # global images this rank encodes
        k_all = distributed.gather_no_grad(self._encode_keys(x_all[mine], splits))  # perm order
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return k_all[inverse].view(world, b, -1)[distributed.rank()]

    def forward(
        self, x_q: Tensor, x_k: Tensor, key_perm: Tensor | None = None, key_splits: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Embed two views; no side effects.

        Args:
            x_q: Query view (B, 3, H, W).
            x_k: Key view (B, 3, H, W).
            key_perm: Shuffle-BN permutation of the global batch (see :meth:`embed_key`).
            key_splits: Split-BN chunks of the key batch (see :meth:`embed_key`).

        Returns:
            Unit-norm query and key embeddings, each (B, proj_dim).
        """
        return self.embed_query(x_q), self.embed_key(x_k, key_perm, key_splits)


class MoCoV3(_MomentumModel):
    """MoCo-v3: backbone + projector + predictor, momentum backbone + projector, no queue.

    Args:
        backbone: Feature extractor with a ``num_features`` attribute.
        proj_layers: Projector depth: 3 for ViT, 2 for ResNet.
        hidden_dim: Hidden width of projector and predictor (4096).
        dim: Output dimension (256).
        pred_last_bn: Whether the predictor ends with BatchNorm (True for ViT, False for ResNet).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_layers: int = 3,
        hidden_dim: int = 4096,
        dim: int = 256,
        pred_last_bn: bool = True,
    ) -> None:
        super().__init__()
        width = int(backbone.num_features)
        self.backbone = backbone
        self.projector = mocov3_mlp(proj_layers, width, hidden_dim, dim, last_bn=True)
        self.predictor = mocov3_mlp(2, dim, hidden_dim, dim, last_bn=pred_last_bn)
        self.momentum_backbone = _freeze_copy(backbone)
        self.momentum_projector = _freeze_copy(self.projector)

    def _momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        yield self.backbone, self.momentum_backbone
        yield self.projector, self.momentum_projector

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Embed two views with both encoders; no side effects.

        Args:
            x1: First view (B, 3, H, W).
            x2: Second view (B, 3, H, W).

        Returns:
            Unit-norm float32 (q1, q2, k1, k2), each (B, dim); the keys carry no gradient.
        """
        # Separate passes per view, as in MoCo-v3: BatchNorm statistics stay per view.
        q1, q2 = (
            F.normalize(self.predictor(self.projector(self.backbone(x))).float(), dim=1)
            for x in (x1, x2)
        )
        with torch.no_grad():
            k1, k2 = (
                F.normalize(self.momentum_projector(self.momentum_backbone(x)).float(), dim=1)
                for x in (x1, x2)
            )
        return q1, q2, k1, k2
