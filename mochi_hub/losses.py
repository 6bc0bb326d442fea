"""InfoNCE losses of MoCo-v2 and MoCo-v3 with optional MoCHi synthetic negatives.

Shape legend: B queries, D embedding dim, K queue size (MoCo-v2) or gathered keys (MoCo-v3),
S + S' synthetic negatives per query (see :mod:`mochi_hub.mixing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mochi_hub.mixing import Impl, _check_max_beta, mochi_logits

__all__ = [
    "ContrastiveOutput",
    "MixingSpec",
    "contrastive_diagnostics",
    "false_negative_mask",
    "false_negative_share",
    "hardness_profile",
    "moco_v2_loss",
    "moco_v3_loss",
]


@dataclass(frozen=True)
class MixingSpec:
    """MoCHi (N, s, s') settings.

    Attributes:
        num_hard: N, hardest negatives kept per query.
        num_synthetic: s, points mixed from pairs of hard negatives.
        num_synthetic_query: s', points mixed from the query and a hard negative.
        max_beta: Upper bound of the query weight in query mixing, in (0, 0.5].
        impl: ``"fused"`` or ``"explicit"``, see :func:`mochi_hub.mixing.mochi_logits`.
    """

    num_hard: int
    num_synthetic: int
    num_synthetic_query: int
    max_beta: float = 0.5
    impl: Impl = "fused"

    def __post_init__(self) -> None:
        for name in ("num_hard", "num_synthetic", "num_synthetic_query"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        _check_max_beta(self.max_beta)

    @property
    def num_points(self) -> int:
        """S + S', the number of synthetic logits per query."""
        return self.num_synthetic + self.num_synthetic_query


class ContrastiveOutput(NamedTuple):
    """Result of one InfoNCE loss.

    Attributes:
        loss: Scalar loss.
        logits: (B, C) logits divided by the temperature; the last ``num_synthetic`` columns are
            MoCHi's synthetic negatives.
        labels: (B,) index of each row's positive.
        num_synthetic: Number of synthetic columns at the end of ``logits``.
    """

    loss: Tensor
    logits: Tensor
    labels: Tensor
    num_synthetic: int


def _with_synthetic(
    q: Tensor,
    negatives: Tensor,
    neg_logits: Tensor,
    mixing: MixingSpec | None,
    mask: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor | None:
    if mixing is None or mixing.num_points == 0:
        return None
    return mochi_logits(
        q,
        negatives,
        neg_logits,
        num_hard=mixing.num_hard,
        num_synthetic=mixing.num_synthetic,
        num_synthetic_query=mixing.num_synthetic_query,
        max_beta=mixing.max_beta,
        mask=mask,
        generator=generator,
        impl=mixing.impl,
    )


def moco_v2_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    *,
    temperature: float,
    mixing: MixingSpec | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ContrastiveOutput:
    """MoCo-v2 InfoNCE: positive at column 0, then the queue, then MoCHi's synthetic negatives.

    Args:
        q: Unit-norm queries (B, D), with gradient.
        k: Unit-norm keys (B, D), the positives; no gradient flows into them.
        queue: Unit-norm negatives (K, D); constants.
        temperature: Softmax temperature T.
        mixing: MoCHi settings; None (or s = s' = 0) gives plain MoCo-v2.
        mask: Optional (B, K) bool; True queue entries are never picked as hard negatives.
        generator: Source of MoCHi's randomness.

    Returns:
        The loss, logits (B, 1 + K + S + S') / T and labels (all zero).
    """
    q = q.float()
    l_pos = torch.einsum("bd,bd->b", q, k.detach().float())[:, None]  # (B, 1)
    queue = queue.detach().float()
    l_neg = torch.einsum("bd,kd->bk", q, queue)  # (B, K)
    columns = [l_pos, l_neg]
    syn = _with_synthetic(q, queue, l_neg, mixing, mask, generator)
    if syn is not None:
        columns.append(syn)  # (B, S + S')
    logits = torch.cat(columns, dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return ContrastiveOutput(
        F.cross_entropy(logits, labels), logits, labels, 0 if syn is None else syn.shape[1]
    )


def moco_v3_loss(
    q: Tensor,
    k_all: Tensor,
    *,
    temperature: float,
    rank: int = 0,
    mixing: MixingSpec | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ContrastiveOutput:
    """One direction of MoCo-v3's symmetric loss, ``ctr(q, k)``, scaled by 2T.

    Negatives are the other keys of the global batch. With MoCHi the positive column is masked
    before the hard-negative selection, and the synthetic logits are appended after the keys.

    Args:
        q: Unit-norm predictions of this process (B, D), with gradient.
        k_all: Unit-norm momentum keys gathered from all processes (W * B, D).
        temperature: Softmax temperature T.
        rank: This process's rank; its positives sit at columns ``rank * B + i``.
        mixing: MoCHi settings; None (or s = s' = 0) gives plain MoCo-v3.
        mask: Optional (B, W * B) bool; True keys are never picked as hard negatives (the
            positive is always excluded).
        generator: Source of MoCHi's randomness.

    Returns:
        The loss (already multiplied by 2T), logits (B, W * B + S + S') / T and labels.
    """
    q = q.float()
    k_all = k_all.detach().float()
    batch = q.shape[0]
    labels = torch.arange(batch, device=q.device) + rank * batch  # (B,)
    sims = torch.einsum("bd,kd->bk", q, k_all)  # (B, W * B)
    columns = [sims]
    if mixing is not None and mixing.num_points > 0:
        positive = F.one_hot(labels, k_all.shape[0]).bool()  # the positive is no negative
        mask = positive if mask is None else mask | positive
    syn = _with_synthetic(q, k_all, sims, mixing, mask, generator)
    if syn is not None:
        columns.append(syn)
    logits = torch.cat(columns, dim=1) / temperature
    loss = F.cross_entropy(logits, labels) * (2 * temperature)
    return ContrastiveOutput(loss, logits, labels, 0 if syn is None else syn.shape[1])


@torch.no_grad()
def contrastive_diagnostics(
    out: ContrastiveOutput, temperature: float, num_hard: int = 1024
) -> dict[str, Tensor]:
    """MoCHi's training diagnostics as 0-dim tensors (no host synchronisation).

    Args:
        out: A loss output.
        temperature: The temperature its logits were divided by.
        num_hard: Size of the top-N window for the synthetic share.

    Returns:
        ``proxy_acc`` (positive beats every real and synthetic negative, %), ``proxy_acc_real``
        (positive beats every real negative, %), ``hardest_neg_sim`` (mean cosine similarity of
        each query's hardest real negative) and, when synthetic columns exist,
        ``max_syn_minus_max_real`` (mean over queries of the hardest synthetic minus the hardest
        real cosine) and ``syn_share_topn`` (share of synthetic points among each query's top-N
        negatives, %).
    """
    logits, labels, n_syn = out.logits.detach() * temperature, out.labels, out.num_synthetic
    real = logits[:, : logits.shape[1] - n_syn]
    rows = torch.arange(logits.shape[0], device=logits.device)
    pos = real[rows, labels]  # (B,)
    real_neg = real.clone()
    real_neg[rows, labels] = float("-inf")
    max_real = real_neg.max(dim=1).values  # (B,)
    stats = {
        "proxy_acc_real": (pos > max_real).float().mean() * 100,
        "hardest_neg_sim": max_real.mean(),
    }
    if n_syn > 0:
        syn = logits[:, -n_syn:]
        max_syn = syn.max(dim=1).values
        stats["proxy_acc"] = ((pos > max_real) & (pos > max_syn)).float().mean() * 100
        stats["max_syn_minus_max_real"] = (max_syn - max_real).mean()
        negs = torch.cat([real_neg, syn], dim=1)
        top = negs.topk(min(num_hard, negs.shape[1]), dim=1, sorted=False).indices
        stats["syn_share_topn"] = (top >= real.shape[1]).float().mean() * 100
    else:
        stats["proxy_acc"] = stats["proxy_acc_real"]
    return stats


def _real_negative_logits(out: ContrastiveOutput) -> Tensor:
    """(B, C_real) real logits (positive and real negatives) with each positive set to -inf."""
    logits = out.logits.detach()
    real = logits[:, : logits.shape[1] - out.num_synthetic].clone()
    rows = torch.arange(real.shape[0], device=real.device)
    real[rows, out.labels] = float("-inf")
    return real


def false_negative_mask(labels: Tensor, negative_labels: Tensor) -> Tensor:
    """Which negatives share the query's class (the class oracle).

    Args:
        labels: (B,) class labels of the queries.
        negative_labels: (K,) class labels of the negatives; -1 marks an unknown label.

    Returns:
        (B, K) bool, True where the negative is of the query's class.
    """
    known = negative_labels >= 0
    return (labels[:, None] == negative_labels[None, :]) & known[None, :]


@torch.no_grad()
def hardness_profile(out: ContrastiveOutput, top: int = 1024) -> Tensor:
    """The paper's Fig. 2a: softmax probability of each query's hardest negatives, averaged.

    The softmax is the one of the real logits (positive and real negatives, without MoCHi's
    synthetic points), so MoCo and MoCHi runs are compared on the same distribution.

    Args:
        out: A loss output.
        top: How many of the most probable negatives to keep per query.

    Returns:
        (min(top, C_real - 1),) mean over queries of the sorted (descending) probabilities.
    """
    logits = out.logits.detach().float()
    real = logits[:, : logits.shape[1] - out.num_synthetic]
    probs = real.softmax(dim=1)
    rows = torch.arange(real.shape[0], device=real.device)
    probs[rows, out.labels] = -1.0  # the positive is not a negative
    k = min(top, real.shape[1] - 1)
    return probs.topk(k, dim=1, sorted=True).values.mean(dim=0)


@torch.no_grad()
def false_negative_share(out: ContrastiveOutput, same_class: Tensor, top: int = 1024) -> Tensor:
    """Share (%) of same-class points among each query's ``top`` hardest real negatives.

    Args:
        out: A loss output.
        same_class: (B, C_real) bool aligned with the real columns of ``out.logits`` (see
            :func:`false_negative_mask`); the positive's column is ignored.
        top: Size of the window of hardest negatives.

    Returns:
        0-dim tensor, the mean over queries in percent.
    """
    real = _real_negative_logits(out)
    if same_class.shape != real.shape:
        raise ValueError(
            f"same_class must have the shape of the real logits {tuple(real.shape)}, "
            f"got {tuple(same_class.shape)}"
        )
    k = min(top, real.shape[1] - 1)
    idx = real.topk(k, dim=1, sorted=False).indices
    return same_class.gather(1, idx).float().mean() * 100
