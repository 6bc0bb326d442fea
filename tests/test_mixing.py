"""Tests of ``mochi_hub.mixing`` (MoCHi hard negative mixing), float64 and tiny sizes.

Every random number comes from a seeded ``torch.Generator``. ``mochi_logits`` calls ``topk`` first
(no randomness) and then ``draw_mixing`` (pair_index, alpha, query_index, beta, in that order), so
calling ``draw_mixing`` with a generator seeded identically reproduces the draws used inside.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mochi_hub.mixing as mixing_module
from mochi_hub.mixing import (
    MixingDraws,
    draw_mixing,
    hardest_negatives,
    mixed_pair_norms,
    mochi_logits,
    pair_dot_products,
)

F64 = torch.float64
SEED = 1234
# (num_synthetic, num_synthetic_query): pairs only, query mixing only, both.
COUNTS = [(5, 0), (0, 4), (5, 4)]
COUNT_IDS = ["pairs_only", "query_only", "both"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(batch=4, pool=24, dim=8, seed=0, dtype=F64, scale=2.5):
    """Un-normalised queries z (leaf, grad) and unit-norm negatives (the queue)."""
    g = gen(seed)
    z = (torch.randn(batch, dim, generator=g, dtype=F64) * scale).to(dtype).requires_grad_(True)
    negatives = F.normalize(torch.randn(pool, dim, generator=g, dtype=F64), dim=1).to(dtype)
    return z, negatives


def draws_for(batch, num_hard, s, sp, *, seed=SEED, max_beta=0.5, dtype=F64) -> MixingDraws:
    return draw_mixing(batch, num_hard, s, sp, max_beta=max_beta, dtype=dtype, generator=gen(seed))


def reference_logits(q, negatives, num_hard, draws: MixingDraws, order=None):
    """Straightforward float64 MoCHi, one query at a time, with explicit Python loops.

    The top-N *set* is found by a Python sort of the query's similarities. ``draw_mixing`` returns
    positions into the hard set as ``hardest_negatives`` orders it (an unsorted top-k), so, after
    checking that the sets agree, that order is used to turn positions into queue rows (``order``
    overrides it, e.g. with the order a float32 top-k produced).
    """
    q = q.detach().to(F64)
    negatives = negatives.detach().to(F64)
    batch, pool = q.shape[0], negatives.shape[0]
    if order is None:
        order = hardest_negatives(q @ negatives.T, num_hard)
    num_s, num_sp = draws.alpha.shape[1], draws.beta.shape[1]
    out = torch.empty(batch, num_s + num_sp, dtype=F64)
    for b in range(batch):
        qb = q[b]
        sims = [(float(torch.dot(qb, negatives[k])), k) for k in range(pool)]
        sims.sort(key=lambda t: t[0], reverse=True)
        top_set = {k for _, k in sims[:num_hard]}
        hard_b = [int(k) for k in order[b]]
        assert set(hard_b) == top_set
        for s in range(num_s):
            a = float(draws.alpha[b, s])
            n_i = negatives[hard_b[int(draws.pair_index[b, s, 0])]]
            n_j = negatives[hard_b[int(draws.pair_index[b, s, 1])]]
            h = a * n_i + (1.0 - a) * n_j
            h = h / math.sqrt(float(torch.dot(h, h)))
            out[b, s] = torch.dot(qb, h)
        for t in range(num_sp):
            beta = float(draws.beta[b, t])
            n_j = negatives[hard_b[int(draws.query_index[b, t])]]
            h = beta * qb + (1.0 - beta) * n_j
            h = h / math.sqrt(float(torch.dot(h, h)))
            out[b, num_s + t] = torch.dot(qb, h)
    return out


def span_residual(basis_rows: torch.Tensor, point: torch.Tensor) -> float:
    """Least-squares distance from ``point`` (D,) to the span of the rows of ``basis_rows``."""
    a = basis_rows.T.to(F64)  # (D, r)
    x = torch.linalg.lstsq(a, point.to(F64)[:, None]).solution
    return float((a @ x - point.to(F64)[:, None]).norm())


def pair_points_own_span_ok(points, hard, negatives, num_s, tol=1e-10) -> bool:
    """True iff every pair-mixed point of query b lies in span(query b's own hard negatives)."""
    return all(
        span_residual(negatives[hard[b]], points[b, s]) < tol
        for b in range(points.shape[0])
        for s in range(num_s)
    )


# --------------------------------------------------------------------------------------------
# 1. explicit == fused (values and gradients)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precomputed", [False, True], ids=["neg_logits_none", "neg_logits_given"])
@pytest.mark.parametrize(("s", "sp"), COUNTS, ids=COUNT_IDS)
def test_explicit_and_fused_agree_on_logits_and_grad_wrt_z(s, sp, precomputed):
    n_hard = 6
    z, negatives = make_inputs()
    weights = torch.randn(z.shape[0], s + sp, generator=gen(99), dtype=F64)
    results = {}
    for impl in ("explicit", "fused"):
        z.grad = None
        q = F.normalize(z, dim=1)
        neg_logits = q @ negatives.T if precomputed else None
        out = mochi_logits(
            q,
            negatives,
            neg_logits,
            num_hard=n_hard,
            num_synthetic=s,
            num_synthetic_query=sp,
            generator=gen(),
            impl=impl,
        )
        assert out.shape == (z.shape[0], s + sp)
        assert out.dtype == F64
        (weights * out).sum().backward()
        results[impl] = (out.detach(), z.grad.clone())
    (l_e, g_e), (l_f, g_f) = results["explicit"], results["fused"]
    assert (l_e - l_f).abs().max() <= 1e-10
    assert g_e.abs().max() > 1e-3  # the gradient is not trivially zero
    assert (g_e - g_f).abs().max() <= 1e-10


@pytest.mark.parametrize(("s", "sp"), COUNTS, ids=COUNT_IDS)
def test_explicit_and_fused_agree_on_grad_wrt_unit_query_leaf(s, sp):
    z, negatives = make_inputs()
    q0 = F.normalize(z.detach(), dim=1)
    weights = torch.randn(z.shape[0], s + sp, generator=gen(7), dtype=F64)
    grads = {}
    for impl in ("explicit", "fused"):
        q = q0.clone().requires_grad_(True)
        out = mochi_logits(
            q,
            negatives,
            num_hard=6,
            num_synthetic=s,
            num_synthetic_query=sp,
            generator=gen(),
            impl=impl,
        )
        (weights * out).sum().backward()
        grads[impl] = q.grad
    assert grads["explicit"].abs().max() > 1e-3
    assert (grads["explicit"] - grads["fused"]).abs().max() <= 1e-10


# --------------------------------------------------------------------------------------------
# 2. both against an independent per-query loop reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_beta", [0.5, 0.3])
@pytest.mark.parametrize(("s", "sp"), COUNTS, ids=COUNT_IDS)
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_matches_loop_reference(impl, s, sp, max_beta):
    n_hard = 6
    z, negatives = make_inputs(batch=5, pool=20, dim=7, seed=3)
    q = F.normalize(z, dim=1)
    out = mochi_logits(
        q,
        negatives,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        max_beta=max_beta,
        generator=gen(),
        impl=impl,
    )
    draws = draws_for(q.shape[0], n_hard, s, sp, max_beta=max_beta)
    ref = reference_logits(q, negatives, n_hard, draws)
    assert (out.detach() - ref).abs().max() <= 1e-10


# --------------------------------------------------------------------------------------------
# 3. span: each query mixes its OWN hard negatives
# --------------------------------------------------------------------------------------------


def test_points_lie_in_span_of_own_hard_negatives_only():
    batch, pool, dim, n_hard, s, sp = 4, 40, 32, 4, 8, 6
    z, negatives = make_inputs(batch=batch, pool=pool, dim=dim, seed=11)
    q = F.normalize(z, dim=1).detach()
    out, points = mochi_logits(
        q,
        negatives,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        generator=gen(),
        impl="explicit",
        return_points=True,
    )
    assert points.shape == (batch, s + sp, dim)
    hard = hardest_negatives(q @ negatives.T, n_hard)
    sets = [set(hard[b].tolist()) for b in range(batch)]
    assert all(sets[b] != sets[c] for b in range(batch) for c in range(b + 1, batch))

    # Pair-mixed points: in the span of the query's own N hardest negatives ...
    assert pair_points_own_span_ok(points, hard, negatives, s)
    # ... and, for every other query, at least one of them is far from that query's span.
    for b in range(batch):
        for c in range(batch):
            if c == b:
                continue
            worst = max(span_residual(negatives[hard[c]], points[b, k]) for k in range(s))
            assert worst > 0.1, (b, c, worst)

    # Query-mixed points: in span{q_b, own hard negatives}, and not in span{own hard} alone.
    draws = draws_for(batch, n_hard, s, sp)
    for b in range(batch):
        basis = torch.cat([q[b : b + 1], negatives[hard[b]]], dim=0)
        for t in range(sp):
            assert span_residual(basis, points[b, s + t]) < 1e-10
            if draws.beta[b, t] > 0.05:
                assert span_residual(negatives[hard[b]], points[b, s + t]) > 1e-3

    # The logits are the dot products of q with the returned points.
    assert torch.allclose(out, torch.einsum("bd,bsd->bs", q, points), atol=1e-12, rtol=0)


def test_span_check_detects_query0_indexing_bug():
    """The span check above fails for MaugrimEP-style points built from query 0's hard set."""
    batch, pool, dim, n_hard, s = 4, 40, 32, 4, 8
    z, negatives = make_inputs(batch=batch, pool=pool, dim=dim, seed=11)
    q = F.normalize(z, dim=1).detach()
    hard = hardest_negatives(q @ negatives.T, n_hard)
    draws = draws_for(batch, n_hard, s, 0)
    flat = negatives[hard].reshape(batch * n_hard, dim)  # (B*N, D)
    a = draws.alpha[..., None]
    buggy = a * flat[draws.pair_index[..., 0]] + (1 - a) * flat[draws.pair_index[..., 1]]
    buggy = F.normalize(buggy, dim=2)  # indices in [0, N) without offset: always query 0's set
    assert not pair_points_own_span_ok(buggy, hard, negatives, s)
    fixed = negatives[hard.gather(1, draws.pair_index[..., 0])] * a + negatives[
        hard.gather(1, draws.pair_index[..., 1])
    ] * (1 - a)
    assert pair_points_own_span_ok(F.normalize(fixed, dim=2), hard, negatives, s)


# --------------------------------------------------------------------------------------------
# 4. query-mixing bounds, unit-norm points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_beta", [0.5, 0.25])
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_query_mixed_logit_bounds(impl, max_beta):
    batch, n_hard, s, sp = 6, 5, 3, 40
    z, negatives = make_inputs(batch=batch, pool=30, dim=6, seed=5)
    q = F.normalize(z, dim=1).detach()
    out = mochi_logits(
        q,
        negatives,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        max_beta=max_beta,
        generator=gen(),
        impl=impl,
    )
    neg_logits = q @ negatives.T
    hard = hardest_negatives(neg_logits, n_hard)
    draws = draws_for(batch, n_hard, s, sp, max_beta=max_beta)
    source = hard.gather(1, draws.query_index)  # (B, S') queue rows the columns were mixed from
    c = neg_logits.gather(1, source)  # q . n_j
    mixed = out[:, s:]
    assert (mixed >= c - 1e-12).all()
    assert (mixed < torch.sqrt((1 + c) / 2)).all()  # cos(theta / 2)
    # Where beta is not tiny, the query-mixed point is strictly harder than its source.
    assert (mixed[draws.beta > 0.01] > c[draws.beta > 0.01]).all()
    # Source-free bound: never easier than the query's N-th hardest real negative (hence than
    # any negative outside the hard set).
    nth_hardest = neg_logits.topk(n_hard, dim=1).values[:, -1:]
    assert (mixed >= nth_hardest - 1e-12).all()
    outside = neg_logits.masked_fill(hard_mask(hard, negatives.shape[0]), -2.0)
    assert (nth_hardest >= outside.max(1, keepdim=True).values).all()


def hard_mask(hard: torch.Tensor, pool: int) -> torch.Tensor:
    mask = torch.zeros(hard.shape[0], pool, dtype=torch.bool)
    mask.scatter_(1, hard, True)
    return mask


def test_synthetic_points_are_unit_norm():
    z, negatives = make_inputs(batch=5, pool=25, dim=9, seed=8)
    _, points = mochi_logits(
        F.normalize(z, dim=1),
        negatives,
        num_hard=7,
        num_synthetic=11,
        num_synthetic_query=9,
        generator=gen(),
        impl="explicit",
        return_points=True,
    )
    assert points.shape == (5, 20, 9)
    assert not points.requires_grad
    assert torch.allclose(points.norm(dim=2), torch.ones(5, 20, dtype=F64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# 5. no synthesis == plain MoCo
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_hard", [0, 3])
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_no_synthesis_gives_plain_moco_logits(impl, num_hard):
    z, negatives = make_inputs()
    q = F.normalize(z, dim=1)
    k = F.normalize(torch.randn(z.shape, generator=gen(3), dtype=F64), dim=1)
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ negatives.T
    syn = mochi_logits(
        q, negatives, l_neg, num_hard=num_hard, num_synthetic=0, num_synthetic_query=0, impl=impl
    )
    assert syn.shape == (z.shape[0], 0)
    full = torch.cat([l_pos, l_neg, syn], 1)
    assert torch.equal(full, torch.cat([l_pos, l_neg], 1))
    if impl == "explicit":
        syn2, pts = mochi_logits(
            q,
            negatives,
            num_hard=num_hard,
            num_synthetic=0,
            num_synthetic_query=0,
            impl=impl,
            return_points=True,
        )
        assert syn2.shape == (z.shape[0], 0)
        assert pts.shape == (z.shape[0], 0, z.shape[1])


# --------------------------------------------------------------------------------------------
# 6. mask
# --------------------------------------------------------------------------------------------


def test_masked_entries_never_selected_and_never_mixed():
    batch, pool, dim, n_hard, s, sp = 4, 40, 32, 4, 8, 5
    z, negatives = make_inputs(batch=batch, pool=pool, dim=dim, seed=21)
    q = F.normalize(z, dim=1).detach()
    neg_logits = q @ negatives.T
    # Mask each query's 3 truly hardest negatives plus a few random ones.
    mask = torch.rand(batch, pool, generator=gen(4)) < 0.2
    mask.scatter_(1, neg_logits.topk(3, dim=1).indices, True)
    assert (mask.sum(1) <= pool - n_hard).all()

    hard = hardest_negatives(neg_logits, n_hard, mask)
    assert not mask.gather(1, hard).any()
    unmasked_hard = hardest_negatives(neg_logits, n_hard)
    for b in range(batch):
        # Independent expectation: the top-N among the unmasked entries.
        remaining = sorted(
            (k for k in range(pool) if not mask[b, k]), key=lambda k: -float(neg_logits[b, k])
        )
        assert set(hard[b].tolist()) == set(remaining[:n_hard])
        assert set(hard[b].tolist()) != set(unmasked_hard[b].tolist())

    _, points = mochi_logits(
        q,
        negatives,
        neg_logits,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        mask=mask,
        generator=gen(),
        impl="explicit",
        return_points=True,
    )
    for b in range(batch):
        expected = sorted(
            (k for k in range(pool) if not mask[b, k]), key=lambda k: -float(neg_logits[b, k])
        )[:n_hard]
        basis = negatives[expected]
        for k in range(s):
            assert span_residual(basis, points[b, k]) < 1e-10
        for t in range(sp):
            assert span_residual(torch.cat([q[b : b + 1], basis]), points[b, s + t]) < 1e-10
        # The truly hardest (masked) negatives are not what was mixed.
        worst = max(span_residual(negatives[unmasked_hard[b]], points[b, k]) for k in range(s))
        assert worst > 0.1

    fused = mochi_logits(
        q,
        negatives,
        neg_logits,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        mask=mask,
        generator=gen(),
    )
    explicit = mochi_logits(
        q,
        negatives,
        neg_logits,
        num_hard=n_hard,
        num_synthetic=s,
        num_synthetic_query=sp,
        mask=mask,
        generator=gen(),
        impl="explicit",
    )
    assert (fused - explicit).abs().max() <= 1e-10


def test_mask_leaving_fewer_than_num_hard_candidates_never_mixes_masked():
    """Docstring: 'True entries are never selected as hard negatives'.

    If a row keeps fewer than ``num_hard`` unmasked entries, the implementation must either refuse
    (ValueError) or still avoid the masked entries; mixing a masked entry (e.g. the positive key
    among in-batch negatives) silently is a bug.
    """
    batch, pool, dim, n_hard = 2, 6, 8, 4
    z, negatives = make_inputs(batch=batch, pool=pool, dim=dim, seed=0)
    q = F.normalize(z, dim=1).detach()
    mask = torch.zeros(batch, pool, dtype=torch.bool)
    mask[:, :3] = True  # only 3 < num_hard = 4 candidates are left per row
    try:
        _, points = mochi_logits(
            q,
            negatives,
            num_hard=n_hard,
            num_synthetic=6,
            num_synthetic_query=0,
            mask=mask,
            generator=gen(),
            impl="explicit",
            return_points=True,
        )
    except ValueError as err:
        assert "num_hard" in str(err) or "mask" in str(err)
        return
    allowed = negatives[3:]
    for b in range(batch):
        for k in range(points.shape[1]):
            assert span_residual(allowed, points[b, k]) < 1e-10, "a masked negative was mixed"


# --------------------------------------------------------------------------------------------
# 7. reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_reproducible_with_seed_and_global_rng_untouched(impl):
    z, negatives = make_inputs()
    q = F.normalize(z, dim=1).detach()
    kw = dict(num_hard=6, num_synthetic=5, num_synthetic_query=4, impl=impl)
    state = torch.get_rng_state()
    a = mochi_logits(q, negatives, generator=gen(5), **kw)
    b = mochi_logits(q, negatives, generator=gen(5), **kw)
    c = mochi_logits(q, negatives, generator=gen(6), **kw)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG when a generator is given
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - c).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# 8. validation errors
# --------------------------------------------------------------------------------------------


def _base_args():
    z, negatives = make_inputs(batch=3, pool=10, dim=5)
    q = F.normalize(z, dim=1).detach()
    kw = dict(num_hard=4, num_synthetic=2, num_synthetic_query=2, generator=gen())
    return q, negatives, kw


def _err_num_hard_too_big(q, n, kw):
    mochi_logits(q, n, **{**kw, "num_hard": 11})


def _err_neg_s(q, n, kw):
    mochi_logits(q, n, **{**kw, "num_synthetic": -1})


def _err_neg_sp(q, n, kw):
    mochi_logits(q, n, **{**kw, "num_synthetic_query": -2})


def _err_query_not_unit(q, n, kw):
    mochi_logits(q * 1.5, n, check_inputs=True, **kw)


def _err_negatives_not_unit(q, n, kw):
    mochi_logits(q, n * 0.5, check_inputs=True, **kw)


def _err_dtype(q, n, kw):
    mochi_logits(q, n.float(), **kw)


def _err_neg_logits_shape(q, n, kw):
    mochi_logits(q, n, (q @ n.T)[:, :-1], **kw)


def _err_mask_dtype(q, n, kw):
    mochi_logits(q, n, mask=torch.zeros(3, 10, dtype=torch.uint8), **kw)


def _err_mask_shape(q, n, kw):
    mochi_logits(q, n, mask=torch.zeros(3, 9, dtype=torch.bool), **kw)


def _err_impl(q, n, kw):
    mochi_logits(q, n, impl="Fused", **kw)


def _err_return_points_fused(q, n, kw):
    mochi_logits(q, n, impl="fused", return_points=True, **kw)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_err_num_hard_too_big, r"num_hard"),
        (_err_neg_s, r"^num_synthetic must be >= 0"),
        (_err_neg_sp, r"^num_synthetic_query must be >= 0"),
        (_err_query_not_unit, r"^query rows must be L2-normalised"),
        (_err_negatives_not_unit, r"^negatives rows must be L2-normalised"),
        (_err_dtype, r"dtype"),
        (_err_neg_logits_shape, r"^neg_logits must have shape"),
        (_err_mask_dtype, r"^mask must be a bool"),
        (_err_mask_shape, r"^mask must be a bool tensor of shape"),
        (_err_impl, r"^impl must be one of"),
        (_err_return_points_fused, r"return_points"),
    ],
    ids=[
        "num_hard_gt_pool",
        "negative_num_synthetic",
        "negative_num_synthetic_query",
        "query_not_unit",
        "negatives_not_unit",
        "dtype_mismatch",
        "neg_logits_shape",
        "mask_dtype",
        "mask_shape",
        "bad_impl",
        "return_points_fused",
    ],
)
def test_validation_errors(call, match):
    q, n, kw = _base_args()
    with pytest.raises(ValueError, match=match):
        call(q, n, kw)


@pytest.mark.parametrize("max_beta", [0, 0.0, 0.6, -0.1, 1.0])
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_max_beta_validation(max_beta, impl):
    q, n, kw = _base_args()
    with pytest.raises(ValueError, match=r"max_beta"):
        mochi_logits(q, n, max_beta=max_beta, impl=impl, **kw)
    with pytest.raises(ValueError, match=r"max_beta"):
        draw_mixing(3, 4, 2, 2, max_beta=max_beta, generator=gen())


def test_valid_inputs_pass_check_inputs():
    q, n, kw = _base_args()
    out = mochi_logits(q, n, check_inputs=True, max_beta=0.5, **kw)
    assert out.shape == (3, 4)


# --------------------------------------------------------------------------------------------
# 9. gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precomputed", ["none", "from_detached_negatives"])
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_negatives_receive_no_gradient(impl, precomputed):
    z, negatives = make_inputs()
    negatives = negatives.clone().requires_grad_(True)
    q = F.normalize(z, dim=1)
    neg_logits = None if precomputed == "none" else q @ negatives.detach().T
    if impl == "fused" and neg_logits is not None:
        # the fused path cannot tell where neg_logits came from: grad-carrying negatives are
        # refused whenever logits are passed in
        with pytest.raises(ValueError, match="negatives must not require grad"):
            mochi_logits(q, negatives, neg_logits, num_hard=6, num_synthetic=5,
                         num_synthetic_query=4, generator=gen(), impl=impl)  # fmt: skip
        return
    out = mochi_logits(
        q,
        negatives,
        neg_logits,
        num_hard=6,
        num_synthetic=5,
        num_synthetic_query=4,
        generator=gen(),
        impl=impl,
    )
    (torch.randn(out.shape, generator=gen(2), dtype=F64) * out).sum().backward()
    assert z.grad is not None and z.grad.abs().max() > 0
    assert negatives.grad is None or not negatives.grad.any()


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_negatives_receive_no_gradient_even_through_grad_carrying_neg_logits(impl):
    """Module doc: 'Synthetic points carry no gradient into the negatives'.

    In a MoCo training step ``l_neg = q @ negatives.T`` is computed once and passed as
    ``neg_logits``; if the negatives carry gradient (e.g. in-batch negatives that were not
    detached), the synthetic logits must still not send gradient into them, exactly as with
    ``impl="explicit"``.
    """
    z, negatives = make_inputs()
    negatives = negatives.clone().requires_grad_(True)
    q = F.normalize(z, dim=1)
    neg_logits = q @ negatives.T
    kwargs = dict(num_hard=6, num_synthetic=5, num_synthetic_query=4, generator=gen(), impl=impl)
    if impl == "fused":
        # the closed form reuses neg_logits, so grad-carrying negatives are refused outright
        with pytest.raises(ValueError, match="negatives must not require grad"):
            mochi_logits(q, negatives, neg_logits, **kwargs)
        kwargs["generator"] = gen()
        out = mochi_logits(q, negatives.detach(), q @ negatives.detach().T, **kwargs)
    else:
        out = mochi_logits(q, negatives, neg_logits, **kwargs)
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().max() > 0
    assert negatives.grad is None or not negatives.grad.any()


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_gradcheck_pair_mixing_wrt_z(impl):
    z, negatives = make_inputs(batch=2, pool=10, dim=5, seed=13)
    z = z.detach().requires_grad_(True)

    def fn(zz):
        return mochi_logits(
            F.normalize(zz, dim=1),
            negatives,
            num_hard=4,
            num_synthetic=3,
            num_synthetic_query=0,
            generator=gen(17),
            impl=impl,
        )

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_query_mixing_gradient_is_the_detached_one():
    """Spec 2.2: d(q.h')/dz = (1-beta)/D (I - q q^T) n_j / |z|, D = |beta q + (1-beta) n_j|.

    The beta*q part contributes nothing, so the gradient is deliberately NOT the total derivative
    of the logit value (gradcheck against finite differences must fail).
    """
    batch, n_hard, sp = 3, 4, 3
    z, negatives = make_inputs(batch=batch, pool=10, dim=5, seed=13)
    z = z.detach().requires_grad_(True)
    q = F.normalize(z, dim=1)
    out = mochi_logits(
        q, negatives, num_hard=n_hard, num_synthetic=0, num_synthetic_query=sp, generator=gen()
    )
    qd = q.detach()
    hard = hardest_negatives(qd @ negatives.T, n_hard)
    draws = draws_for(batch, n_hard, 0, sp)
    for t in range(sp):
        (grad,) = torch.autograd.grad(out[:, t].sum(), z, retain_graph=True)
        n_j = negatives[hard.gather(1, draws.query_index)[:, t]]  # (B, D)
        beta = draws.beta[:, t : t + 1]
        c = (qd * n_j).sum(1, keepdim=True)
        d = torch.sqrt(beta**2 + (1 - beta) ** 2 + 2 * beta * (1 - beta) * c)
        tangential = n_j - c * qd
        expected = (1 - beta) / d * tangential / z.detach().norm(dim=1, keepdim=True)
        assert (grad - expected).abs().max() <= 1e-10

    def fn(zz):
        return mochi_logits(
            F.normalize(zz, dim=1),
            negatives,
            num_hard=n_hard,
            num_synthetic=0,
            num_synthetic_query=sp,
            generator=gen(),
        )

    assert not torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, raise_exception=False)


# --------------------------------------------------------------------------------------------
# 10. dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_float32_in_float32_out(impl):
    z, negatives = make_inputs(dtype=torch.float32)
    q = F.normalize(z, dim=1)
    out = mochi_logits(
        q, negatives, num_hard=6, num_synthetic=5, num_synthetic_query=4, generator=gen(), impl=impl
    )
    assert out.dtype == torch.float32
    # float32 draws (a float32 rand consumes the generator differently from a float64 one) and
    # the float32 top-k order; the arithmetic of the reference runs in float64.
    draws = draws_for(z.shape[0], 6, 5, 4, dtype=torch.float32)
    order = hardest_negatives(q @ negatives.T, 6)
    ref = reference_logits(q.double(), negatives.double(), 6, draws, order=order)
    assert (out.double() - ref).abs().max() < 1e-5


def _separated_inputs(batch=3, pool=10, dim=16):
    """Queries e_0..e_{B-1}; every query's logits are distinct multiples of 0.1 apart, so bf16
    rounding cannot change any comparison made by the top-k."""
    levels = torch.linspace(-0.45, 0.45, pool, dtype=F64)
    g = gen(31)
    negatives = torch.zeros(pool, dim, dtype=F64)
    for b in range(batch):
        negatives[:, b] = levels[torch.randperm(pool, generator=g)]
    rest = torch.randn(pool, dim - batch, generator=g, dtype=F64)
    rest_norm = torch.sqrt(1 - (negatives[:, :batch] ** 2).sum(1, keepdim=True))
    negatives[:, batch:] = F.normalize(rest, dim=1) * rest_norm
    q = torch.eye(batch, dim, dtype=F64)
    return q, negatives


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_bfloat16_in_float32_out_close_to_float32(impl):
    q, negatives = _separated_inputs()
    q16, n16 = q.bfloat16().requires_grad_(True), negatives.bfloat16()
    kw = dict(num_hard=4, num_synthetic=6, num_synthetic_query=5, impl=impl)
    out16 = mochi_logits(q16, n16, generator=gen(), **kw)
    assert out16.dtype == torch.float32
    out16.sum().backward()  # the gradient flows back into the bf16 leaf
    assert q16.grad is not None and q16.grad.dtype == torch.bfloat16
    q32, n32 = q16.detach().float(), n16.float()
    # Same selection (and same unsorted order) in both precisions, by construction.
    assert torch.equal(hardest_negatives(q16 @ n16.T, 4), hardest_negatives(q32 @ n32.T, 4))
    out32 = mochi_logits(q32, n32, generator=gen(), **kw)
    assert out32.dtype == torch.float32
    assert (out16.detach() - out32).abs().max() < 2e-2


# --------------------------------------------------------------------------------------------
# 11. chunked pair dot products
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1, 7 * 5, 3 * 7 * 5 + 1, 10**9])
def test_pair_dot_products_chunked_equals_unchunked(chunk_elements):
    batch, count, pool, dim = 3, 11, 13, 5
    negatives = torch.randn(pool, dim, generator=gen(1), dtype=F64)
    idx_i = torch.randint(pool, (batch, count), generator=gen(2))
    idx_j = torch.randint(pool, (batch, count), generator=gen(3))
    out = pair_dot_products(negatives, idx_i, idx_j, chunk_elements=chunk_elements)
    expected = torch.empty(batch, count, dtype=F64)
    for b in range(batch):
        for s in range(count):
            expected[b, s] = torch.dot(negatives[idx_i[b, s]], negatives[idx_j[b, s]])
    assert out.shape == (batch, count)
    assert out.dtype == F64
    assert (out - expected).abs().max() <= 1e-12
    unchunked = pair_dot_products(negatives, idx_i, idx_j)
    assert (out - unchunked).abs().max() <= 1e-12


# --------------------------------------------------------------------------------------------
# 12. statistics of the draws
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("max_beta", [0.5, 0.2])
def test_draw_statistics(max_beta, dtype):
    batch, n_hard, s, sp = 64, 7, 200, 150
    d = draw_mixing(batch, n_hard, s, sp, max_beta=max_beta, dtype=dtype, generator=gen(3))
    assert d.pair_index.shape == (batch, s, 2) and d.pair_index.dtype == torch.long
    assert d.query_index.shape == (batch, sp) and d.query_index.dtype == torch.long
    assert d.alpha.shape == (batch, s) and d.alpha.dtype == dtype
    assert d.beta.shape == (batch, sp) and d.beta.dtype == dtype

    assert (d.alpha >= 0).all() and (d.alpha < 1).all()
    assert abs(d.alpha.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / d.alpha.numel())
    assert (d.beta >= 0).all() and (d.beta < max_beta).all()
    tol = 5 * max_beta * math.sqrt(1 / 12 / d.beta.numel())
    assert abs(d.beta.double().mean().item() - max_beta / 2) < tol
    assert d.beta.max() > 0.95 * max_beta  # the whole range is used

    for idx in (d.pair_index, d.query_index):
        assert idx.min() == 0 and idx.max() == n_hard - 1
        counts = torch.bincount(idx.flatten(), minlength=n_hard).double()
        expected = idx.numel() / n_hard
        assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    # i == j is allowed (sampling with replacement) and happens about 1/N of the time.
    same = (d.pair_index[..., 0] == d.pair_index[..., 1]).double().mean().item()
    assert abs(same - 1 / n_hard) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_draw_order_is_pair_index_alpha_query_index_beta(dtype):
    """The documented consumption order of the generator, which both implementations rely on."""
    batch, n_hard, s, sp, max_beta = 3, 5, 4, 6, 0.4
    d = draw_mixing(batch, n_hard, s, sp, max_beta=max_beta, dtype=dtype, generator=gen(8))
    g = gen(8)
    pair_index = torch.randint(n_hard, (batch, s, 2), generator=g)
    alpha = torch.rand(batch, s, dtype=dtype, generator=g)
    query_index = torch.randint(n_hard, (batch, sp), generator=g)
    beta = torch.rand(batch, sp, dtype=dtype, generator=g) * max_beta
    assert torch.equal(d.pair_index, pair_index)
    assert torch.equal(d.alpha, alpha)
    assert torch.equal(d.query_index, query_index)
    assert torch.equal(d.beta, beta)


# --------------------------------------------------------------------------------------------
# 13. grouped CPU selection (hardest_negatives on long rows)
# --------------------------------------------------------------------------------------------


def _assert_valid_top_k(scores: torch.Tensor, idx: torch.Tensor, k: int) -> None:
    """``idx`` (B, k) holds k distinct columns per row whose values are the k largest."""
    assert idx.shape == (scores.shape[0], k) and idx.dtype == torch.long
    assert (torch.sort(idx, dim=1).values.diff(dim=1) > 0).all()  # distinct
    picked = torch.sort(scores.gather(1, idx), dim=1).values
    expected = torch.sort(scores.topk(k, dim=1).values, dim=1).values
    assert torch.equal(picked, expected)


def _grouped_depth(n: int, k: int) -> int:
    depth = 0
    while n % mixing_module._GROUP == 0 and n >= mixing_module._GROUP_MIN_RATIO * k:
        n //= mixing_module._GROUP
        depth += 1
    return depth


@pytest.mark.parametrize(
    ("batch", "pool", "k", "depth"),
    [(5, 1024, 4, 2), (3, 4096, 8, 3), (4, 256, 4, 1), (6, 130, 4, 0), (2, 1024, 1, 3)],
)
@pytest.mark.parametrize("kind", ["distinct", "ties", "all_equal", "masked"])
def test_grouped_selection_picks_the_top_k_values(batch, pool, k, depth, kind):
    assert _grouped_depth(pool, k) == depth  # the cases cover 0 to 3 grouping levels
    g = gen(41)
    if kind == "distinct":
        scores = torch.randn(batch, pool, generator=g, dtype=F64)
    elif kind == "ties":  # few distinct values: ties straddle the k-th value
        scores = torch.randint(0, 5, (batch, pool), generator=g).to(F64)
    elif kind == "all_equal":
        scores = torch.full((batch, pool), 0.25, dtype=F64)
    else:
        scores = torch.randn(batch, pool, generator=g, dtype=F64)
    mask = None
    if kind == "masked":  # mask the true top 2k and a random tenth of the rest
        mask = torch.rand(batch, pool, generator=g) < 0.1
        mask.scatter_(1, scores.topk(2 * k, dim=1).indices, True)
    idx = hardest_negatives(scores, k, mask)
    reference = scores if mask is None else scores.masked_fill(mask, float("-inf"))
    _assert_valid_top_k(reference, idx, k)
    if mask is not None:
        assert not mask.gather(1, idx).any()


def test_grouped_selection_on_a_non_contiguous_view_and_float32():
    wide = torch.randn(4, 2048 + 3, generator=gen(5))
    scores = wide[:, 3:]  # (4, 2048), row stride 2051
    assert not scores.is_contiguous()
    idx = hardest_negatives(scores, 16)
    _assert_valid_top_k(scores, idx, 16)
    assert torch.equal(idx, hardest_negatives(scores.contiguous(), 16))


def test_grouped_selection_is_deterministic_and_matches_topk_sets_at_scale():
    """The in1k shape ratio (K = 64 N) on a small batch: same set as torch.topk (no ties)."""
    scores = torch.randn(3, 8192, generator=gen(6))
    idx = hardest_negatives(scores, 128)
    assert torch.equal(idx, hardest_negatives(scores, 128))
    ref = scores.topk(128, dim=1, sorted=False).indices
    assert torch.equal(torch.sort(idx, dim=1).values, torch.sort(ref, dim=1).values)


@pytest.mark.parametrize(("s", "sp"), COUNTS, ids=COUNT_IDS)
def test_explicit_and_fused_agree_with_grouped_selection(s, sp):
    """pool >= 32 N: the grouped selection runs; both impls still agree in float64."""
    n_hard, pool = 4, 256
    assert _grouped_depth(pool, n_hard) >= 1
    z, negatives = make_inputs(batch=5, pool=pool, dim=16, seed=9)
    weights = torch.randn(5, s + sp, generator=gen(10), dtype=F64)
    results = {}
    for impl in ("explicit", "fused"):
        z.grad = None
        q = F.normalize(z, dim=1)
        out = mochi_logits(
            q,
            negatives,
            q @ negatives.T,
            num_hard=n_hard,
            num_synthetic=s,
            num_synthetic_query=sp,
            generator=gen(),
            impl=impl,
        )
        (weights * out).sum().backward()
        results[impl] = (out.detach(), z.grad.clone())
    (l_e, g_e), (l_f, g_f) = results["explicit"], results["fused"]
    assert (l_e - l_f).abs().max() <= 1e-12
    assert (g_e - g_f).abs().max() <= 1e-12
    draws = draws_for(5, n_hard, s, sp)
    ref = reference_logits(F.normalize(z, dim=1), negatives, n_hard, draws)
    assert (l_f - ref).abs().max() <= 1e-12


# --------------------------------------------------------------------------------------------
# 14. chunked mixed-pair norms and the fused path's chunking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1, 5, 2 * 5 + 1, 7 * 5, 10**9])
def test_mixed_pair_norms_chunked_equals_unchunked_exactly(chunk_elements):
    batch, count, pool, dim = 3, 11, 13, 5
    negatives = torch.randn(pool, dim, generator=gen(1), dtype=F64)
    pairs = torch.randint(pool, (batch, count, 2), generator=gen(2))
    alpha = torch.rand(batch, count, generator=gen(3), dtype=F64)
    out = mixed_pair_norms(negatives, pairs, alpha, chunk_elements=chunk_elements)
    assert out.shape == (batch, count) and out.dtype == F64
    assert torch.equal(out, mixed_pair_norms(negatives, pairs, alpha))
    for b in range(batch):
        for s in range(count):
            a = float(alpha[b, s])
            h = a * negatives[pairs[b, s, 0]] + (1 - a) * negatives[pairs[b, s, 1]]
            assert abs(float(out[b, s]) - math.sqrt(float(torch.dot(h, h)))) <= 1e-12


def test_mixed_pair_norms_low_precision_rows_give_float32():
    negatives = F.normalize(torch.randn(9, 16, generator=gen(4)), dim=1)
    pairs = torch.randint(9, (2, 5, 2), generator=gen(5))
    alpha = torch.rand(2, 5, generator=gen(6))
    out = mixed_pair_norms(negatives.bfloat16(), pairs, alpha)
    assert out.dtype == torch.float32
    ref = mixed_pair_norms(negatives.bfloat16().float(), pairs, alpha)
    assert torch.equal(out, ref)  # the rows are upcast, the math runs in float32


@pytest.mark.parametrize("chunk_elements", [1, 8 * 3 + 1, 8 * 17])
def test_pair_dot_products_do_not_depend_on_chunking(chunk_elements):
    negatives = torch.randn(13, 8, generator=gen(1), dtype=F64)
    idx_i = torch.randint(13, (4, 9), generator=gen(2))
    idx_j = torch.randint(13, (4, 9), generator=gen(3))
    out = pair_dot_products(negatives, idx_i, idx_j, chunk_elements=chunk_elements)
    assert torch.equal(out, pair_dot_products(negatives, idx_i, idx_j))
    expected = (negatives[idx_i] * negatives[idx_j]).sum(-1)
    assert (out - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("chunk_elements", [1, 3 * 8 + 1, 10**9])
def test_fused_logits_and_grad_do_not_depend_on_chunk_size(monkeypatch, chunk_elements):
    z, negatives = make_inputs(batch=4, pool=24, dim=8, seed=12)
    weights = torch.randn(4, 9, generator=gen(13), dtype=F64)

    def run():
        z.grad = None
        q = F.normalize(z, dim=1)
        out = mochi_logits(
            q, negatives, num_hard=6, num_synthetic=5, num_synthetic_query=4, generator=gen()
        )
        (weights * out).sum().backward()
        return out.detach(), z.grad.clone()

    reference = run()
    monkeypatch.setattr(mixing_module, "_PAIR_CHUNK_ELEMENTS", chunk_elements)
    chunked = run()
    assert torch.equal(chunked[0], reference[0])
    assert torch.equal(chunked[1], reference[1])


# --------------------------------------------------------------------------------------------
# 15. fused backward: both routes, no double counting, nothing of size (B, S, D) saved
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_hard", "s", "sp"),
    [(6, 5, 4), (20, 3, 2), (20, 0, 3), (20, 4, 0)],
    ids=["per_hard_set", "drawn_rows", "drawn_query_only", "drawn_pairs_only"],
)
def test_fused_backward_routes_match_explicit(n_hard, s, sp):
    """N < 2S + S': weights summed per hard negative; otherwise per drawn row."""
    z, negatives = make_inputs(batch=4, pool=30, dim=8, seed=14)
    weights = torch.randn(4, s + sp, generator=gen(15), dtype=F64)
    grads = {}
    for impl in ("explicit", "fused"):
        z.grad = None
        out = mochi_logits(
            F.normalize(z, dim=1),
            negatives,
            num_hard=n_hard,
            num_synthetic=s,
            num_synthetic_query=sp,
            generator=gen(),
            impl=impl,
        )
        (weights * out).sum().backward()
        grads[impl] = z.grad.clone()
    assert grads["explicit"].abs().max() > 1e-3
    assert (grads["explicit"] - grads["fused"]).abs().max() <= 1e-12


def test_fused_gradient_is_not_doubled_through_grad_carrying_neg_logits():
    """The fused path reads neg_logits' values only; its gradient goes straight to q."""
    z, negatives = make_inputs(seed=16)
    grads = []
    for detach in (False, True):
        z.grad = None
        q = F.normalize(z, dim=1)
        neg_logits = q @ negatives.T
        out = mochi_logits(
            q,
            negatives,
            neg_logits.detach() if detach else neg_logits,
            num_hard=6,
            num_synthetic=5,
            num_synthetic_query=4,
            generator=gen(),
        )
        out.sum().backward()
        grads.append(z.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_fused_saves_nothing_of_size_b_s_d_for_backward():
    batch, pool, dim, n_hard, s, sp = 8, 64, 32, 16, 40, 24
    z, negatives = make_inputs(batch=batch, pool=pool, dim=dim, seed=17)
    q = F.normalize(z, dim=1)
    neg_logits = q @ negatives.T
    for impl, expect_big in (("fused", False), ("explicit", True)):
        sizes: list[int] = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = mochi_logits(
                q,
                negatives,
                neg_logits,
                num_hard=n_hard,
                num_synthetic=s,
                num_synthetic_query=sp,
                generator=gen(),
                impl=impl,
            )
        out.sum().backward(retain_graph=True)
        big = batch * s * dim  # the size of one (B, S, D) tensor
        assert (max(sizes) >= big) is expect_big, (impl, max(sizes), big)


# --------------------------------------------------------------------------------------------
# 16. autocast and check_inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_cpu_bf16_autocast_gives_float32_logits_close_to_float32(impl):
    z, negatives = make_inputs(batch=4, pool=40, dim=16, seed=18, dtype=torch.float32)
    kw = dict(num_hard=8, num_synthetic=6, num_synthetic_query=5, impl=impl)
    q = F.normalize(z, dim=1)
    ref = mochi_logits(q, negatives, q @ negatives.T, generator=gen(), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        neg_logits = q @ negatives.T  # bf16 under autocast, as in a training step
        assert neg_logits.dtype == torch.bfloat16
        out = mochi_logits(q, negatives, neg_logits, generator=gen(), **kw)
    if impl == "fused":
        assert out.dtype == torch.float32
    out.float().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # bf16 logits may reorder near-ties in the selection: compare only if the sets agree
    hard32 = hardest_negatives(q @ negatives.T, 8)
    hard16 = hardest_negatives(neg_logits, 8)
    if torch.equal(hard32, hard16):
        assert (out.float() - ref).abs().max() < 2e-2


def test_check_inputs_rejects_inconsistent_neg_logits():
    q, n, kw = _base_args()
    good = q @ n.T
    out = mochi_logits(q, n, good, check_inputs=True, **kw)
    assert out.shape == (3, 4)
    with pytest.raises(ValueError, match="neg_logits must equal query @ negatives.T"):
        mochi_logits(q, n, good + 0.1, check_inputs=True, **kw)
