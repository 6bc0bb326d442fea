import pytest
import torch
import torch.nn.functional as F

from mochi_hub.losses import MixingSpec, contrastive_diagnostics, moco_v2_loss, moco_v3_loss
from mochi_hub.moco import MoCoV2, MoCoV3, create_backbone, momentum_cosine


def tiny_resnet():
    return create_backbone("resnet18", channels=(8, 8, 8, 8), stem_width=8)


def test_backbone_has_no_classifier_and_reports_width():
    b = tiny_resnet()
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, b.num_features) == (2, 8)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_backbone("resnet_does_not_exist")
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("resnet18", num_classes=10)


def test_vit_backbone_works_with_mocov3():
    b = create_backbone(
        "vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1, embed_dim=32, num_heads=2
    )
    m = MoCoV3(b, proj_layers=3, hidden_dim=16, dim=8, pred_last_bn=True)
    q1, q2, k1, k2 = m(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    for t in (q1, q2, k1, k2):
        assert t.shape == (4, 8)
        torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    assert q1.requires_grad and not k1.requires_grad


def test_mocov2_structure_and_forward_has_no_side_effects():
    torch.manual_seed(0)
    m = MoCoV2(tiny_resnet(), proj_dim=16, queue_size=32)
    # MoCo-v2 head: Linear -> ReLU -> Linear, biases, no BatchNorm
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "ReLU", "Linear"] and m.projector[0].bias is not None
    assert all(not p.requires_grad for p in m.momentum_backbone.parameters())
    assert all(not p.requires_grad for p in m.momentum_projector.parameters())
    # the momentum encoder starts as an exact copy
    for a, b in zip(m.backbone.parameters(), m.momentum_backbone.parameters(), strict=True):
        assert torch.equal(a, b)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k}
    m.eval()
    q, k = m(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    after = {k: v for k, v in m.state_dict().items() if "running" not in k}
    assert all(torch.equal(before[n], after[n]) for n in before)  # queue, ptr, weights unchanged
    assert q.shape == k.shape == (4, 16) and q.requires_grad and not k.requires_grad
    # state dict carries queue and momentum encoder (resume needs them)
    keys = m.state_dict().keys()
    assert "queue.keys" in keys and "queue.ptr" in keys
    assert any(k.startswith("momentum_backbone.") for k in keys)


def test_momentum_update_is_an_ema_of_parameters_only():
    torch.manual_seed(0)
    m = MoCoV2(tiny_resnet(), proj_dim=8, queue_size=16)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    old_k = [p.clone() for p in m.momentum_backbone.parameters()]
    q_params = list(m.backbone.parameters())
    m.momentum_update(0.9)
    for pk, ok, pq in zip(m.momentum_backbone.parameters(), old_k, q_params, strict=True):
        torch.testing.assert_close(pk, 0.9 * ok + 0.1 * pq)
    m.momentum_update(1.0)  # m = 1 keeps the key encoder
    m.momentum_update(0.0)  # m = 0 copies the query encoder
    for pk, pq in zip(m.momentum_backbone.parameters(), q_params, strict=True):
        assert torch.equal(pk, pq)
    with pytest.raises(ValueError, match="momentum"):
        m.momentum_update(1.5)


def test_momentum_cosine_schedule():
    assert momentum_cosine(0.99, 0.0) == pytest.approx(0.99)
    assert momentum_cosine(0.99, 1.0) == pytest.approx(1.0)
    assert momentum_cosine(0.99, 0.5) == pytest.approx(0.995)


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def test_moco_v2_loss_matches_the_reference_formula(gen):
    q, k, queue = unit(6, 8, gen=gen), unit(6, 8, gen=gen), unit(20, 8, gen=gen)
    out = moco_v2_loss(q, k, queue, temperature=0.2)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1).float() / 0.2
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)))
    assert out.num_synthetic == 0


def test_moco_v2_with_zero_synthetic_equals_plain_moco(gen):
    q, k, queue = unit(6, 8, gen=gen), unit(6, 8, gen=gen), unit(20, 8, gen=gen)
    plain = moco_v2_loss(q, k, queue, temperature=0.2)
    zero = moco_v2_loss(q, k, queue, temperature=0.2, mixing=MixingSpec(4, 0, 0))
    assert torch.equal(plain.logits, zero.logits) and torch.equal(plain.loss, zero.loss)


def test_moco_v2_mochi_appends_synthetic_columns_and_raises_loss(gen):
    q, k, queue = unit(6, 8, gen=gen), unit(6, 8, gen=gen), unit(20, 8, gen=gen)
    plain = moco_v2_loss(q, k, queue, temperature=0.2)
    out = moco_v2_loss(q, k, queue, temperature=0.2, mixing=MixingSpec(4, 5, 3), generator=gen)
    assert out.logits.shape == (6, 1 + 20 + 8) and out.num_synthetic == 8
    assert torch.equal(out.logits[:, :21], plain.logits)
    assert out.loss > plain.loss  # extra negatives can only add to the softmax denominator


def test_moco_v3_loss_labels_and_masked_positive(gen):
    q, k_all = unit(4, 8, gen=gen), unit(8, 8, gen=gen)  # 2 "ranks" of 4
    out = moco_v3_loss(q, k_all, temperature=0.2, rank=1)
    assert torch.equal(out.labels, torch.arange(4) + 4)
    ref = F.cross_entropy((q @ k_all.T).float() / 0.2, out.labels) * 0.4
    torch.testing.assert_close(out.loss, ref)
    # with MoCHi the positive column is never mixed: make the positive the only hard negative
    # candidate that would dominate, and check the synthetic logits stay below the positive
    mixed = moco_v3_loss(
        q, k_all, temperature=0.2, rank=1, mixing=MixingSpec(7, 6, 0), generator=gen
    )
    assert mixed.logits.shape == (4, 8 + 6)
    assert torch.equal(mixed.logits[:, :8], out.logits)


def test_moco_v3_mochi_never_mixes_the_positive(gen):
    # keys equal to the queries: the positive is by far the most similar "negative"
    q = unit(4, 16, gen=gen)
    k_all = torch.cat([unit(4, 16, gen=gen), q])  # rank 1: positives are rows 4..7
    out = moco_v3_loss(q, k_all, temperature=1.0, rank=1, mixing=MixingSpec(1, 0, 4), generator=gen)
    syn = out.logits[:, -4:]
    # query-mixed with the positive (q itself) would give logit 1; with a real negative it is < 1
    assert (syn < 1 - 1e-6).all()


def test_diagnostics(gen):
    q, queue = unit(6, 8, gen=gen), unit(20, 8, gen=gen)
    out = moco_v2_loss(q, q, queue, temperature=0.2, mixing=MixingSpec(4, 3, 3), generator=gen)
    d = contrastive_diagnostics(out, 0.2, num_hard=4)
    assert d["proxy_acc_real"].item() == 100.0  # positive == query: cosine 1 beats everything
    expect = (q @ queue.T).max(1).values.mean().float()
    torch.testing.assert_close(d["hardest_neg_sim"], expect)
    assert 0.0 <= d["syn_share_topn"].item() <= 100.0
    assert all(v.dim() == 0 for v in d.values())
