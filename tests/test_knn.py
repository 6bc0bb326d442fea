import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mochi_hub.data import load_digits_dataset
from mochi_hub.knn import extract_features, knn_accuracy, weighted_knn_scores


def _separable(n_per_class=30, num_classes=4, dim=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(dim)[:num_classes] * 5.0  # orthogonal, far apart
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = means[labels] + noise * torch.randn(labels.shape[0], dim, generator=g)
    return feats, labels


def _reference_scores(train, train_labels, queries, num_classes, k, temperature):
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    queries = queries.double() / queries.double().norm(dim=1, keepdim=True)
    k = min(k, train.shape[0])
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    for i in range(queries.shape[0]):
        sims = [(float(queries[i] @ train[j]), j) for j in range(train.shape[0])]
        sims.sort(key=lambda s: -s[0])
        for sim, j in sims[:k]:
            out[i, int(train_labels[j])] += np.exp(sim / temperature)
    return out


def test_separable_features_top1_100():
    train, train_labels = _separable(seed=0)
    test, test_labels = _separable(n_per_class=10, seed=1)
    acc = knn_accuracy(train, train_labels, test, test_labels, k=20)
    assert acc == {"top1": 100.0, "top5": 100.0}  # top5 clipped to 4 classes


def test_scores_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(23, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (23,), generator=g)
    queries = torch.randn(7, 5, generator=g, dtype=torch.float64)
    for k in (1, 4, 23, 100):  # 100 is clipped to N = 23
        got = weighted_knn_scores(train, labels, queries, num_classes=3, k=k, temperature=0.5)
        assert got.dtype == torch.float64 and got.shape == (7, 3)
        torch.testing.assert_close(
            got, _reference_scores(train, labels, queries, 3, k, 0.5), rtol=1e-12, atol=0
        )


def test_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(200, 12, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    queries = torch.randn(37, 12, generator=g)
    full = weighted_knn_scores(train, labels, queries, num_classes=5, k=15)
    full64 = weighted_knn_scores(train.double(), labels, queries.double(), num_classes=5, k=15)
    for chunk in (1, 5, 36, 37, 1000):
        part = weighted_knn_scores(train, labels, queries, num_classes=5, k=15, chunk_size=chunk)
        # float32 GEMMs of different heights may round differently; exp(sim / T) amplifies it
        torch.testing.assert_close(part, full, rtol=1e-4, atol=0)
        assert torch.equal(part.argmax(1), full.argmax(1))
        part64 = weighted_knn_scores(
            train.double(), labels, queries.double(), num_classes=5, k=15, chunk_size=chunk
        )
        torch.testing.assert_close(part64, full64, rtol=1e-12, atol=0)


def test_scores_invariant_to_feature_scale():
    train, labels = _separable()
    q = train[:5]
    a = weighted_knn_scores(train, labels, q, num_classes=4, k=10)
    b = weighted_knn_scores(train * 7.0, labels, q * 0.1, num_classes=4, k=10)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_validation_errors():
    train, labels = _separable()
    with pytest.raises(ValueError, match="train_labels"):
        weighted_knn_scores(train, labels[:-1], train, num_classes=4)
    with pytest.raises(ValueError, match="query"):
        weighted_knn_scores(train, labels, train[:, :3], num_classes=4)
    with pytest.raises(ValueError, match="train_features"):
        weighted_knn_scores(train[0], labels, train, num_classes=4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        weighted_knn_scores(train, labels, train, num_classes=3)
    with pytest.raises(ValueError, match="k must"):
        weighted_knn_scores(train, labels, train, num_classes=4, k=0)
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(train, labels, train, labels[:3])


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Dropout(0.5)

    def forward(self, x):
        return self.frozen(self.lin(self.bn(x))) * 10.0


def test_extract_features_restores_modes_and_normalises():
    torch.manual_seed(0)
    model = _Embed()
    model.train()
    model.frozen.eval()  # a submodule deliberately kept in eval mode
    x = torch.randn(10, 4)
    y = torch.arange(10)
    dict_loader = [{"image": x[:6], "label": y[:6]}, {"image": x[6:], "label": y[6:]}]
    feats, labels = extract_features(model, dict_loader)
    assert model.training and model.bn.training and not model.frozen.training
    assert feats.shape == (10, 3) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert labels.dtype == torch.int64 and torch.equal(labels, y)
    # eval mode was used: deterministic and equal to a manual eval-mode forward
    model.eval()
    torch.testing.assert_close(feats, F.normalize(model(x), dim=1))
    model.train()
    tuple_feats, _ = extract_features(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    torch.testing.assert_close(tuple_feats, feats)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])
    assert model.training


def test_knn_on_digits_raw_pixels():
    ds = load_digits_dataset(image_size=8)

    def as_features(split):
        images = np.stack([np.asarray(im)[..., 0] for im in ds[split]["image"]])
        feats = F.normalize(torch.from_numpy(images).float().flatten(1), dim=1)  # (N, 64)
        return feats, torch.tensor(ds[split]["label"])

    train, train_labels = as_features("train")
    test, test_labels = as_features("test")
    acc = knn_accuracy(train, train_labels, test, test_labels)  # k = 200, T = 0.07
    # measured: top1 94.4, top5 99.7 (360 test images; k = 5 gives 98.6)
    assert acc["top1"] > 92.0 and acc["top5"] > 99.0
    assert knn_accuracy(train, train_labels, test, test_labels, k=5)["top1"] > 97.0


def test_extract_features_gathers_each_batch_and_uses_autocast():
    model = torch.nn.Flatten()
    loader = [{"image": torch.randn(4, 1, 2, 2), "label": torch.arange(4)} for _ in range(3)]
    calls = {"gather": 0, "autocast": 0}

    def gather(pair):  # stands in for accelerator.gather_for_metrics over 2 processes
        calls["gather"] += 1
        feats, labels = pair
        return torch.cat([feats, feats]), torch.cat([labels, labels])

    def autocast():
        calls["autocast"] += 1
        return contextlib.nullcontext()

    feats, labels = extract_features(model, loader, gather=gather, autocast=autocast)
    assert calls == {"gather": 3, "autocast": 3}
    assert feats.shape == (24, 4) and labels.tolist() == [0, 1, 2, 3] * 6
