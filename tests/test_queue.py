import pytest
import torch
import torch.nn.functional as F

from mochi_hub.queue import MemoryQueue


def test_initial_keys_are_unit_norm_and_persistent(gen):
    q = MemoryQueue(10, 4, generator=gen)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(10))
    sd = q.state_dict()
    assert set(sd) == {"keys", "ptr"}
    r = MemoryQueue(10, 4)
    r.load_state_dict(sd)
    assert torch.equal(r.keys, q.keys) and int(r.ptr) == 0


def test_enqueue_wraps_around_when_size_is_not_a_multiple(gen):
    q = MemoryQueue(5, 3, generator=gen)
    written = []
    for _ in range(4):  # 4 batches of 2 into 5 slots: wraps at step 2
        k = F.normalize(torch.randn(2, 3, generator=gen), dim=1)
        q.enqueue(k)
        written.append(k)
    all_keys = torch.cat(written)  # 8 keys, slot i holds the last key written at i (mod 5)
    expected = torch.empty(5, 3)
    for i in range(8):
        expected[i % 5] = all_keys[i]
    assert torch.equal(q.keys, expected)
    assert int(q.ptr) == 8 % 5


def test_enqueue_rejects_bad_shapes():
    q = MemoryQueue(4, 3)
    with pytest.raises(ValueError, match="at least as large as the global batch"):
        q.enqueue(torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape"):
        q.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="size"):
        MemoryQueue(0, 3)


def test_enqueue_never_tracks_gradient():
    q = MemoryQueue(4, 3)
    k = torch.randn(2, 3, requires_grad=True)
    q.enqueue(k)
    assert not q.keys.requires_grad
