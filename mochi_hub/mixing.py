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

  - pairs: ``(a l_i + (1 - a) l_j) / |a n_i + (1 - a) n_j|``; the norms come from
    :func:`mixed_pair_norms`, a gather-and-sum over chunks of pairs (``embedding_bag``) that
    only ever holds one chunk of mixed points;
  - query mixes: ``(b (q . sg(q)) + (1 - b) l_j) / sqrt(b^2 + (1 - b)^2 + 2 b (1 - b) sg(l_j))``,
    where ``sg`` stops the gradient; ``q . sg(q)`` equals 1 for unit queries, and it makes the
    gradient with respect to ``q`` equal the detached explicit point exactly.

  Every fused logit is linear in the gathered ``l = q . n`` with constant coefficients, so its
  backward sends ``sum_t g_t w_t n_t`` straight to ``q`` (a weighted ``embedding_bag`` over each
  query's hard set, or over its drawn rows when those are fewer) instead of scattering into a
  (B, K) gradient of ``neg_logits``: besides one chunk of mixed points, the extra memory is
  O(B (S + S')) in the forward and O(B min(N, 2 S + S')) in the backward.

The hard-negative selection (:func:`hardest_negatives`) is shared; on the CPU, for long rows, it
first keeps the groups of 4 consecutive candidates with the N largest maxima (exact, see
:func:`hardest_negatives`), which roughly halves the cost of ``topk`` at K = 65536, N = 1024.

The normalisation always runs in at least float32, also under bf16/fp16 autocast.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MixingDraws",
    "draw_mixing",
    "hardest_negatives",
    "mixed_pair_norms",
    "mochi_logits",
    "pair_dot_products",
]

Impl = Literal["fused", "explicit"]
_IMPLS = ("fused", "explicit")
# Pair dot products and mixed-pair norms gather at most this many (pairs * D) elements at once:
# 1 << 20 float32 elements are 4 MiB; of 2^18 .. 2^22 this was the fastest on a 2-core CPU (the
# larger chunks fall out of the caches, the smaller ones pay more per-call overhead).
_PAIR_CHUNK_ELEMENTS = 1 << 20
# CPU selection: rows of n >= _GROUP_MIN_RATIO * k candidates are first reduced to the maxima of
# groups of _GROUP consecutive entries (see hardest_negatives).
_GROUP = 4
_GROUP_MIN_RATIO = 32


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

    Selection only needs membership, so the top-k is unsorted and runs on detached logits; the
    order of the returned indices is unspecified (but deterministic for given inputs and device).

    On the CPU, when a row has at least ``32 * num_hard`` candidates (and a multiple of 4), the
    row is first cut into groups of 4 consecutive candidates and only the ``num_hard`` groups
    with the largest maxima are kept (recursively), then the top ``num_hard`` of those
    ``4 * num_hard`` candidates is taken. This is exact: every value above the N-th largest
    value ``t`` of the row sits in a group whose maximum exceeds the N-th largest group maximum
    (which is ``<= t``), so its group is kept, and the kept groups whose maximum equals ``t``
    supply enough entries equal to ``t``. The selected values are those of ``topk``; only the
    choice among tied values and the order can differ. On accelerators ``topk`` runs directly.

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
        scores = torch.where(mask, float("-inf"), scores)  # one pass, unlike masked_fill's two
    return _top_indices(scores, num_hard)


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Unsorted indices (B, k) of the k largest entries of each row of ``scores`` (B, n).

    See :func:`hardest_negatives` for the grouped CPU path and why it is exact.
    """
    batch, n = scores.shape
    if scores.device.type != "cpu" or n % _GROUP or n < _GROUP_MIN_RATIO * k:
        return scores.topk(k, dim=1, sorted=False).indices
    groups = scores.reshape(batch, n // _GROUP, _GROUP).amax(dim=2)  # (B, n / 4)
    kept = _top_indices(groups, k)  # (B, k) group numbers
    offsets = torch.arange(_GROUP, device=scores.device)
    candidates = (kept.unsqueeze(2) * _GROUP + offsets).view(batch, k * _GROUP)  # (B, 4k)
    best = scores.gather(1, candidates).topk(k, dim=1, sorted=False).indices  # (B, k)
    return candidates.gather(1, best)


def _chunk_rows(count: int, dim: int, chunk_elements: int) -> int:
    """Rows of ``dim`` elements per chunk so that a chunk holds at most ``chunk_elements``."""
    return max(1, min(count, chunk_elements // max(1, dim)))


def pair_dot_products(
    negatives: Tensor, index_i: Tensor, index_j: Tensor, chunk_elements: int = _PAIR_CHUNK_ELEMENTS
) -> Tensor:
    """``n_i . n_j`` for pairs of rows of ``negatives``, gathered chunk by chunk.

    The pairs are flattened and processed in chunks of at most ``chunk_elements // D`` pairs, so
    at most two (chunk, D) blocks exist at a time, never (B, S, D). Each dot product is computed
    the same way whatever the chunking, so results do not depend on ``chunk_elements``.

    Args:
        negatives: (K, D) rows.
        index_i: (B, S) long indices into the rows.
        index_j: (B, S) long indices into the rows.
        chunk_elements: Upper bound on the elements gathered at once per side (pairs * D).

    Returns:
        (B, S) dot products, in the dtype of ``negatives``, without gradient.
    """
    shape = index_i.shape
    flat_i, flat_j = index_i.reshape(-1), index_j.reshape(-1)
    count = flat_i.numel()
    step = _chunk_rows(count, negatives.shape[1], chunk_elements)
    out = negatives.new_empty(count)
    with torch.no_grad():
        negatives = negatives.detach()
        for start in range(0, count, step):
            rows_i = negatives.index_select(0, flat_i[start : start + step])  # (chunk, D)
            rows_j = negatives.index_select(0, flat_j[start : start + step])
            torch.sum(rows_i.mul_(rows_j), dim=1, out=out[start : start + step])
    return out.view(shape)


def mixed_pair_norms(
    negatives: Tensor, pairs: Tensor, alpha: Tensor, chunk_elements: int = _PAIR_CHUNK_ELEMENTS
) -> Tensor:
    """``|a n_i + (1 - a) n_j|`` for pairs of rows of ``negatives``, chunk by chunk.

    The mixed points are built by ``embedding_bag`` (a gather and weighted sum in one kernel) for
    at most ``chunk_elements // D`` pairs at a time and reduced to their norms, so no (B, S, D)
    tensor ever exists. Each pair is computed the same way whatever the chunking, so results do
    not depend on ``chunk_elements``.

    Args:
        negatives: (K, D) rows.
        pairs: (B, S, 2) long indices into the rows: ``pairs[..., 0]`` is i, ``pairs[..., 1]`` j.
        alpha: (B, S) mixing coefficients; their dtype is the dtype of the result (the rows are
            converted to it when they differ).
        chunk_elements: Upper bound on the elements of mixed points held at once (pairs * D).

    Returns:
        (B, S) norms, in the dtype of ``alpha``, without gradient.
    """
    with torch.no_grad():
        coef = torch.stack([alpha, 1 - alpha], dim=-1)  # (B, S, 2)
        weight = negatives.detach().to(alpha.dtype)  # (K, D); no copy when the dtypes agree
        return _mixed_pair_norms(weight, pairs, coef, chunk_elements)


def _mixed_pair_norms(weight: Tensor, pairs: Tensor, coef: Tensor, chunk_elements: int) -> Tensor:
    """``|coef[..., 0] n_i + coef[..., 1] n_j|`` (B, S) for ``pairs`` (B, S, 2) into ``weight``."""
    shape = pairs.shape[:-1]
    bags, coef = pairs.reshape(-1, 2), coef.reshape(-1, 2)  # (B * S, 2)
    total = bags.shape[0]
    step = _chunk_rows(total, weight.shape[1], chunk_elements)
    out = coef.new_empty(total)
    for start in range(0, total, step):
        stop = start + step
        mixed = F.embedding_bag(  # (chunk, D) unnormalised mixed points
            bags[start:stop], weight, per_sample_weights=coef[start:stop], mode="sum"
        )
        torch.linalg.vector_norm(mixed, dim=1, out=out[start:stop])
    return out.view(shape)


def _check_mask_leaves_enough(
    mask: Tensor, hard: Tensor, num_hard: int, check_inputs: bool
) -> None:
    """Every row must keep at least ``num_hard`` unmasked candidates.

    Checked after the selection, in O(B N): masked entries score -inf, so a row picks one only
    when it has fewer than ``num_hard`` unmasked candidates. On the CPU (or with
    ``check_inputs``) this raises ValueError; on an accelerator it is an asynchronous
    device-side assertion, so the training step never waits on the host.
    """
    picked_masked = mask.gather(1, hard).any()  # 0-dim
    if check_inputs or mask.device.type == "cpu":
        if bool(picked_masked):
            remaining = int((~mask).sum(dim=1).min())  # only on the error path: (B, K) work
            raise ValueError(
                f"mask leaves {remaining} candidates in some row, fewer than "
                f"num_hard={num_hard}; masked entries would be selected as hard negatives"
            )
    else:
        torch._assert_async(~picked_masked, "mask leaves fewer than num_hard candidates")


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
        if neg_logits is not None:
            low = torch.float16, torch.bfloat16
            tol = 1e-2 if query.dtype in low or neg_logits.dtype in low else 1e-4
            with torch.no_grad():
                expected = query.detach().float() @ negatives.detach().float().T
                if not torch.allclose(neg_logits.float(), expected, atol=tol, rtol=0):
                    raise ValueError("neg_logits must equal query @ negatives.T")


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
        neg_logits: ``query @ negatives.T`` (B, K) when already computed (e.g. MoCo's
            ``l_neg``); computed here (without gradient) when None. It is only read: for the
            selection and, with ``impl="fused"``, for the values ``q . n`` of the hard negatives,
            whose gradient the fused path sends straight to ``query``. So it must equal
            ``query @ negatives.T`` (up to its dtype's rounding); whether it carries gradient
            does not matter.
        num_hard: N, the hardest negatives kept per query.
        num_synthetic: S, points mixed from pairs of hard negatives.
        num_synthetic_query: S', points mixed from the query and one hard negative.
        max_beta: Upper bound of the query weight in query mixing, in (0, 0.5].
        mask: Optional boolean (B, K); True entries are never selected as hard negatives.
        generator: Source of randomness (must live on the query's device); global RNG when None.
        impl: ``"fused"`` (closed form, no (B, S + S', D) tensor) or ``"explicit"`` (reference).
        return_points: With ``impl="explicit"``, also return the detached synthetic points.
        check_inputs: Also check that query and negatives rows are unit-norm and that
            ``neg_logits`` equals ``query @ negatives.T`` (costs a matmul and a sync).

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
            "closed form reads q . n from neg_logits and treats the negatives as constants, so "
            "a gradient-carrying pool is refused rather than silently cut off (detach them; "
            "MoCHi's negatives are constants)"
        )
    negatives = negatives.detach()
    if neg_logits is None:
        with torch.no_grad():  # only read: selection, and the fused values
            neg_logits = query @ negatives.T  # (B, K)
    hard = hardest_negatives(neg_logits, num_hard, mask)  # (B, N)
    if mask is not None:
        _check_mask_leaves_enough(mask, hard, num_hard, check_inputs)
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
    with torch.no_grad():
        idx_p = hard.gather(1, draws.pair_index.flatten(1))  # (B, 2S) queue rows: i, j, i, j...
        idx_q = hard.gather(1, draws.query_index)  # (B, S')

    if impl == "explicit":
        idx_i, idx_j = idx_p[:, 0::2], idx_p[:, 1::2]  # (B, S) each
        return _explicit(query, negatives, idx_i, idx_j, idx_q, draws, cdtype, return_points)
    with torch.autocast(query.device.type, enabled=False):  # float32 (or float64) math
        return _FusedSyntheticLogits.apply(
            query, neg_logits.detach(), negatives, hard, idx_p, idx_q, draws
        )


class _FusedSyntheticLogits(torch.autograd.Function):
    """Closed-form synthetic logits with a gradient into ``query`` only.

    Forward (no (B, S + S', D) tensor), with ``l = q . n`` read from ``neg_logits``::

        pairs:   w_i l_i + w_j l_j,             w_i = a / |h|, w_j = (1 - a) / |h|,
                 h = a n_i + (1 - a) n_j        (mixed_pair_norms, chunked)
        queries: w_q l_j + c (q . q),           w_q = (1 - b) / r, c = b / r,
                 r = sqrt(b^2 + (1 - b)^2 + 2 b (1 - b) l_j)

    The coefficients are constants (the synthetic points are detached), so the gradient of
    ``q . n`` being ``n``, backward returns ``grad_q = sum_t G_t w_t n_t + (sum c G) sg(q)``.
    The first sum is one weighted ``embedding_bag``: per query over its N hard negatives after
    summing the weights of repeated draws (when N < 2S + S'), else over the drawn rows.
    """

    @staticmethod
    def forward(ctx, query, neg_logits, negatives, hard, idx_p, idx_q, draws):
        """Synthetic logits (B, S + S'), pair-mixed columns first; see the class docstring.

        Args:
            ctx: Autograd context.
            query: (B, D) queries; the only input that receives a gradient.
            neg_logits: (B, K) ``query @ negatives.T`` (detached).
            negatives: (K, D) constant negatives.
            hard: (B, N) indices of each query's hard negatives into K.
            idx_p: (B, 2S) rows of the pairs, interleaved i, j (``hard`` at ``pair_index``).
            idx_q: (B, S') rows of the query mixes (``hard`` at ``query_index``).
            draws: The :class:`MixingDraws` (alpha, beta give the compute dtype).
        """
        batch, num_pairs = draws.alpha.shape
        cdtype = draws.alpha.dtype
        weight = negatives.to(cdtype)  # (K, D); no copy when the dtypes agree
        q = query.to(cdtype)
        # Pairs: (B, S, 2) weights [w_i, w_j] and gathered logits [l_i, l_j]; the norm is
        # clamped like F.normalize's (eps 1e-12), as in the explicit path.
        coef = torch.stack([draws.alpha, 1 - draws.alpha], dim=-1)  # (B, S, 2): a, 1 - a
        pairs = idx_p.view(batch, num_pairs, 2)
        norm = _mixed_pair_norms(weight, pairs, coef, _PAIR_CHUNK_ELEMENTS)  # (B, S)
        w_p = coef.div_(norm.clamp_min_(1e-12).unsqueeze(-1))  # (B, S, 2), in place of coef
        l_p = neg_logits.gather(1, idx_p).to(cdtype).view(batch, num_pairs, 2)
        out_p = torch.linalg.vecdot(w_p, l_p)  # (B, S)
        # Query mixes: closed-form norm from sg(l_j).
        b = draws.beta
        l_q = neg_logits.gather(1, idx_q).to(cdtype)  # (B, S')
        inv_q = torch.rsqrt((b * b + (1 - b) ** 2 + 2 * b * (1 - b) * l_q).clamp_min_(1e-24))
        w_q, c_q = (1 - b) * inv_q, b * inv_q  # (B, S')
        q_self = (q * q).sum(dim=1, keepdim=True)  # (B, 1), == 1 for unit queries
        out_q = w_q * l_q + c_q * q_self  # (B, S')
        ctx.query_dtype = query.dtype
        ctx.per_hard = hard.shape[1] < idx_p.shape[1] + idx_q.shape[1]
        rows = (hard, draws.pair_index, draws.query_index) if ctx.per_hard else (idx_p, idx_q)
        ctx.save_for_backward(q, weight, w_p, w_q, c_q, *rows)
        return torch.cat([out_p, out_q], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """Gradient (B, D) into ``query``; none into the other inputs."""
        q, weight, w_p, w_q, c_q, *rows = ctx.saved_tensors
        batch, num_pairs = w_p.shape[:2]
        with torch.autocast(q.device.type, enabled=False):
            grad = grad.to(w_p.dtype)
            g_p = (grad[:, :num_pairs, None] * w_p).view(batch, 2 * num_pairs)  # (B, 2S)
            g_q = grad[:, num_pairs:] * w_q  # (B, S')
            if ctx.per_hard:  # sum the weights of repeated draws, then N rows per query
                hard, pair_index, query_index = rows
                coef = torch.zeros(hard.shape, dtype=w_p.dtype, device=w_p.device)  # (B, N)
                coef.scatter_add_(1, pair_index.view(batch, 2 * num_pairs), g_p)
                coef.scatter_add_(1, query_index, g_q)
                index = hard
            else:  # fewer draws than hard negatives: the drawn rows directly
                coef = torch.cat([g_p, g_q], dim=1)  # (B, 2S + S')
                index = torch.cat(rows, dim=1)
            grad_q = F.embedding_bag(index, weight, per_sample_weights=coef, mode="sum")
            grad_q = grad_q + (grad[:, num_pairs:] * c_q).sum(dim=1, keepdim=True) * q
        return grad_q.to(ctx.query_dtype), None, None, None, None, None, None


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
