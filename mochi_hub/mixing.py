"""MoCHi hard negative mixing (Kalantidis et al., NeurIPS 2020, arXiv:2010.01028).

Pure tensor math: no module state, no distributed calls, no global RNG. Every random number comes
from the optional ``generator`` argument.

Shape legend (the paper's letters):

====  =====================================================================
B     number of queries
D     embedding dimension
K     number of candidate negatives (the memory queue, or the gathered batch)
N     hardest negatives kept per query (``num_hard``)
S     synthetic points mixed from pairs of hard negatives (``num_synthetic``, the paper's s)
S'    synthetic points mixed from the query and a hard negative (``num_synthetic_query``, s')
====  =====================================================================

For every query independently, MoCHi keeps its N most similar negatives and adds, as extra
negatives for that query only,

* S points ``normalize(a * n_i + (1 - a) * n_j)``, ``n_i, n_j`` drawn uniformly (with replacement)
  from the query's own N hardest and ``a ~ U(0, 1)`` per point;
* S' points ``normalize(b * q + (1 - b) * n_j)``, ``b ~ U(0, max_beta)``, ``max_beta <= 0.5`` so the
  query always weighs less than the negative; ``q`` is detached inside the mix.

Synthetic points carry no gradient into the negatives and never enter the queue. Only their logits
``q . h`` are returned, to be appended to the InfoNCE logits.

Two implementations consume the same random draws (:func:`draw_mixing`):

* ``"explicit"`` materialises the (B, S + S', D) points; the readable reference.
* ``"fused"`` (default) gets the same logits in closed form from the already computed ``q . n``
  logits, never holding a (B, S + S', D) tensor:

  - pairs: ``(a l_i + (1 - a) l_j) / sqrt(a^2 + (1 - a)^2 + 2 a (1 - a) n_i . n_j)``;
  - query mixes: ``(b (q . sg(q)) + (1 - b) l_j) / sqrt(b^2 + (1 - b)^2 + 2 b (1 - b) sg(l_j))``,
    where ``sg`` stops the gradient; ``q . sg(q)`` equals 1 for unit queries, and it makes the
    gradient with respect to ``q`` equal the detached explicit point exactly.

The normalisation always runs in at least float32, also under bf16/fp16 autocast.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MixingDraws",
    "draw_mixing",
    "hardest_negatives",
    "mochi_logits",
    "pair_dot_products",
]

Impl = Literal["fused", "explicit"]
_IMPLS = ("fused", "explicit")
# Pair dot products are gathered in chunks of at most this many (B * chunk * D) elements.
_PAIR_CHUNK_ELEMENTS = 1 << 22


class MixingDraws(NamedTuple):
    """The random draws of one MoCHi step, shared by both implementations.

    Attributes:
        pair_index: Positions into each query's hard set for pair mixing, (B, S, 2), in [0, N).
        alpha: Pair-mixing coefficients, (B, S), in [0, 1).
        query_index: Positions into each query's hard set for query mixing, (B, S'), in [0, N).
        beta: Query-mixing coefficients, (B, S'), in [0, max_beta).
    """

    pair_index: Tensor
    alpha: Tensor
    query_index: Tensor
    beta: Tensor


def _check_counts(num_hard: int, num_synthetic: int, num_synthetic_query: int, pool: int) -> None:
    for name, value in (
        ("num_hard", num_hard),
        ("num_synthetic", num_synthetic),
        ("num_synthetic_query", num_synthetic_query),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if num_synthetic + num_synthetic_query > 0 and num_hard < 1:
        raise ValueError(
            f"num_hard must be >= 1 when synthetic points are asked for, got {num_hard}"
        )
    if num_hard > pool:
        raise ValueError(
            f"num_hard (N={num_hard}) is larger than the pool of negatives (K={pool}); "
            "choose num_hard <= the queue size (or the number of in-batch negatives)"
        )


def _check_max_beta(max_beta: float) -> None:
    if not isinstance(max_beta, (int, float)) or isinstance(max_beta, bool):
        raise ValueError(f"max_beta must be a float, got {type(max_beta).__name__}")
    if not 0.0 < max_beta <= 0.5:
        raise ValueError(f"max_beta must be in (0, 0.5], got {max_beta}")


def draw_mixing(
    batch: int,
    num_hard: int,
    num_synthetic: int,
    num_synthetic_query: int,
    *,
    max_beta: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> MixingDraws:
    """Draw the indices and coefficients of one MoCHi step.

    The draws are made in a fixed order (pair indices, alpha, query indices, beta) so that a given
    generator state always yields the same synthetic points, whichever implementation uses them.

    Args:
        batch: Number of queries B.
        num_hard: Size N of each query's hard set.
        num_synthetic: Number S of pair-mixed points per query.
        num_synthetic_query: Number S' of query-mixed points per query.
        max_beta: Upper bound of the query-mixing coefficient, in (0, 0.5].
        device: Device of the draws; must match the generator's device.
        dtype: Floating dtype of alpha and beta.
        generator: Source of randomness; the global RNG when None.

    Returns:
        The draws, see :class:`MixingDraws`.
    """
    _check_max_beta(max_beta)
    kw = dict(device=device, generator=generator)
    pair_index = torch.randint(num_hard, (batch, num_synthetic, 2), **kw)
    alpha = torch.rand(batch, num_synthetic, dtype=dtype, **kw)
    query_index = torch.randint(num_hard, (batch, num_synthetic_query), **kw)
    beta = torch.rand(batch, num_synthetic_query, dtype=dtype, **kw) * max_beta
    return MixingDraws(pair_index, alpha, query_index, beta)


def hardest_negatives(neg_logits: Tensor, num_hard: int, mask: Tensor | None = None) -> Tensor:
    """Indices of each query's ``num_hard`` most similar negatives.

    Selection only needs membership, so the top-k is unsorted and runs on detached logits.

    Args:
        neg_logits: Query-negative similarities, (B, K).
        num_hard: Number N of negatives to keep per query.
        mask: Optional boolean (B, K); True entries are removed before the selection (the positive
            key among in-batch negatives, or known false negatives).

    Returns:
        Long tensor (B, N) of indices into the K negatives.
    """
    scores = neg_logits.detach()
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.topk(num_hard, dim=1, sorted=False).indices


def pair_dot_products(
    negatives: Tensor, index_i: Tensor, index_j: Tensor, chunk_elements: int = _PAIR_CHUNK_ELEMENTS
) -> Tensor:
    """``n_i . n_j`` for pairs of rows of ``negatives``, gathered chunk by chunk.

    Args:
        negatives: (K, D) rows.
        index_i: (B, S) long indices into the rows.
        index_j: (B, S) long indices into the rows.
        chunk_elements: Upper bound on the elements gathered at once (B * chunk * D).

    Returns:
        (B, S) dot products, in the dtype of ``negatives``, without gradient.
    """
    batch, count = index_i.shape
    dim = negatives.shape[1]
    step = max(1, chunk_elements // max(1, batch * dim))
    with torch.no_grad():
        if step >= count:
            return torch.einsum("bsd,bsd->bs", negatives[index_i], negatives[index_j])
        parts = [
            torch.einsum(
                "bsd,bsd->bs",
                negatives[index_i[:, s : s + step]],
                negatives[index_j[:, s : s + step]],
            )
            for s in range(0, count, step)
        ]
        return torch.cat(parts, dim=1)


def _check_mask_leaves_enough(mask: Tensor, num_hard: int, check_inputs: bool) -> None:
    """Every row must keep at least ``num_hard`` unmasked candidates.

    On the CPU (or with ``check_inputs``) this raises ValueError; on an accelerator it is an
    asynchronous device-side assertion, so the training step never waits on the host.
    """
    remaining = (~mask).sum(dim=1).min()  # 0-dim
    if check_inputs or mask.device.type == "cpu":
        if int(remaining) < num_hard:
            raise ValueError(
                f"mask leaves {int(remaining)} candidates in some row, fewer than "
                f"num_hard={num_hard}; masked entries would be selected as hard negatives"
            )
    else:
        torch._assert_async(remaining >= num_hard, "mask leaves fewer than num_hard candidates")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate(
    query: Tensor,
    negatives: Tensor,
    neg_logits: Tensor | None,
    mask: Tensor | None,
    check_inputs: bool,
) -> None:
    if query.dim() != 2:
        raise ValueError(f"query must be 2-D (B, D), got shape {tuple(query.shape)}")
    if negatives.dim() != 2:
        raise ValueError(f"negatives must be 2-D (K, D), got shape {tuple(negatives.shape)}")
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives have dimension {negatives.shape[1]} but query has {query.shape[1]}"
        )
    if not query.is_floating_point() or not negatives.is_floating_point():
        raise ValueError("query and negatives must be floating point tensors")
    if negatives.device != query.device:
        raise ValueError(f"negatives are on {negatives.device} but query is on {query.device}")
    if negatives.dtype != query.dtype:
        raise ValueError(f"negatives have dtype {negatives.dtype} but query has {query.dtype}")
    expected = (query.shape[0], negatives.shape[0])
    if neg_logits is not None:
        if tuple(neg_logits.shape) != expected:
            raise ValueError(
                f"neg_logits must have shape {expected}, got {tuple(neg_logits.shape)}"
            )
        if neg_logits.device != query.device:
            raise ValueError(
                f"neg_logits are on {neg_logits.device} but query is on {query.device}"
            )
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"mask must be a bool tensor of shape {expected}")
        if mask.device != query.device:
            raise ValueError(f"mask is on {mask.device} but query is on {query.device}")
    if check_inputs:
        tol = 1e-3 if query.dtype in (torch.float16, torch.bfloat16) else 1e-4
        for name, t in (("query", query), ("negatives", negatives)):
            norms = t.detach().float().norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=tol, rtol=0):
                raise ValueError(f"{name} rows must be L2-normalised (norms deviate from 1)")


def mochi_logits(
    query: Tensor,
    negatives: Tensor,
    neg_logits: Tensor | None = None,
    *,
    num_hard: int,
    num_synthetic: int,
    num_synthetic_query: int,
    max_beta: float = 0.5,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    impl: Impl = "fused",
    return_points: bool = False,
    check_inputs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Logits of MoCHi's synthetic hard negatives, one row of S + S' per query.

    Args:
        query: Unit-norm queries (B, D); they may carry gradient.
        negatives: Unit-norm candidate negatives (K, D), treated as constants (the queue).
        neg_logits: ``query @ negatives.T`` (B, K) when already computed (it must carry the
            query's gradient); computed here when None.
        num_hard: N, the hardest negatives kept per query.
        num_synthetic: S, points mixed from pairs of hard negatives.
        num_synthetic_query: S', points mixed from the query and one hard negative.
        max_beta: Upper bound of the query weight in query mixing, in (0, 0.5].
        mask: Optional boolean (B, K); True entries are never selected as hard negatives.
        generator: Source of randomness (must live on the query's device); global RNG when None.
        impl: ``"fused"`` (closed form, no (B, S + S', D) tensor) or ``"explicit"`` (reference).
        return_points: With ``impl="explicit"``, also return the detached synthetic points.
        check_inputs: Also check that query and negatives rows are unit-norm (costs a sync).

    Returns:
        Logits (B, S + S'): pair-mixed columns first, then query-mixed ones; not divided by the
        temperature. With ``return_points``, a tuple (logits, points (B, S + S', D)).

    Raises:
        ValueError: On an invalid argument; the message names it.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if return_points and impl != "explicit":
        raise ValueError("return_points=True needs impl='explicit'")
    _validate(query, negatives, neg_logits, mask, check_inputs)
    _check_counts(num_hard, num_synthetic, num_synthetic_query, negatives.shape[0])
    _check_max_beta(max_beta)

    batch, dim = query.shape
    cdtype = _compute_dtype(query.dtype)
    if num_synthetic + num_synthetic_query == 0:
        empty = query.new_zeros(batch, 0, dtype=cdtype)
        return (empty, query.new_zeros(batch, 0, dim, dtype=cdtype)) if return_points else empty

    if neg_logits is not None and negatives.requires_grad and impl == "fused":
        raise ValueError(
            "negatives must not require grad when neg_logits is given with impl='fused': the "
            "closed form reuses neg_logits, which would carry gradient into the negatives "
            "(detach them; MoCHi's negatives are constants)"
        )
    if mask is not None:
        _check_mask_leaves_enough(mask, num_hard, check_inputs)
    negatives = negatives.detach()
    if neg_logits is None:
        neg_logits = query @ negatives.T  # (B, K)
    hard = hardest_negatives(neg_logits, num_hard, mask)  # (B, N)
    draws = draw_mixing(
        batch,
        num_hard,
        num_synthetic,
        num_synthetic_query,
        max_beta=max_beta,
        device=query.device,
        dtype=cdtype,
        generator=generator,
    )
    idx_i = hard.gather(1, draws.pair_index[..., 0])  # (B, S) indices into K
    idx_j = hard.gather(1, draws.pair_index[..., 1])  # (B, S)
    idx_q = hard.gather(1, draws.query_index)  # (B, S')

    if impl == "explicit":
        return _explicit(query, negatives, idx_i, idx_j, idx_q, draws, cdtype, return_points)
    return _fused(query, negatives, neg_logits, idx_i, idx_j, idx_q, draws, cdtype)


def _fused(
    query: Tensor,
    negatives: Tensor,
    neg_logits: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    idx_q: Tensor,
    draws: MixingDraws,
    cdtype: torch.dtype,
) -> Tensor:
    """Closed-form synthetic logits from the existing (B, K) logits; see the module docstring."""
    logits = neg_logits.to(cdtype)
    out = []
    if idx_i.shape[1] > 0:
        a = draws.alpha  # (B, S)
        l_i, l_j = logits.gather(1, idx_i), logits.gather(1, idx_j)  # (B, S), carry grad
        n_ij = pair_dot_products(negatives, idx_i, idx_j).to(cdtype)  # (B, S), constant
        norm_sq = a * a + (1 - a) ** 2 + 2 * a * (1 - a) * n_ij
        out.append((a * l_i + (1 - a) * l_j) * torch.rsqrt(norm_sq.clamp_min(1e-24)))
    if idx_q.shape[1] > 0:
        b = draws.beta  # (B, S')
        l_j = logits.gather(1, idx_q)  # (B, S'), carries grad
        q = query.to(cdtype)
        q_self = (q * q.detach()).sum(dim=1, keepdim=True)  # (B, 1) == 1; grad is sg(q)
        norm_sq = b * b + (1 - b) ** 2 + 2 * b * (1 - b) * l_j.detach()
        out.append((b * q_self + (1 - b) * l_j) * torch.rsqrt(norm_sq.clamp_min(1e-24)))
    return torch.cat(out, dim=1)


def _explicit(
    query: Tensor,
    negatives: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    idx_q: Tensor,
    draws: MixingDraws,
    cdtype: torch.dtype,
    return_points: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference: materialise the synthetic points, then take their dot products with q."""
    q = query.to(cdtype)
    neg = negatives.to(cdtype)
    with torch.no_grad():
        a = draws.alpha[..., None]  # (B, S, 1)
        pairs = a * neg[idx_i] + (1 - a) * neg[idx_j]  # (B, S, D)
        b = draws.beta[..., None]  # (B, S', 1)
        mixes = b * q.detach()[:, None, :] + (1 - b) * neg[idx_q]  # (B, S', D)
        points = torch.nn.functional.normalize(torch.cat([pairs, mixes], dim=1), dim=2)
    logits = torch.einsum("bd,bsd->bs", q, points)  # (B, S + S')
    return (logits, points) if return_points else logits
