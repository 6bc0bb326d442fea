"""GPU readiness, checked on the CPU.

* No host-device synchronisation inside a training step: the real engine loop runs with MoCHi on
  while every Python-level way of reading a tensor on the host (``item``, ``tolist``,
  ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``) raises, and a
  dispatch mode rejects the aten ops that make the host wait for an accelerator
  (``_local_scalar_dense``, ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``, ``equal``, device-to-host copies). The guard
  is on from the start of ``engine._contrastive_step`` to the end of ``queue.enqueue``
  (forward, loss, backward, optimiser step, momentum update, gather, enqueue), not during the
  logging steps. On a CUDA machine the same region also runs under
  ``torch.cuda.set_sync_debug_mode("error")``. Control tests plant syncs (also in backward
  and in the optimiser step) and check that they are caught.
* bf16 autocast: the loss is finite and close to float32, and all of MoCHi's elementwise mixing
  and normalisation arithmetic runs in float32.
* channels_last gives the same embeddings, loss and gradients as contiguous memory.
* ``torch.compile(mochi_logits, dynamic=False)`` matches eager; its only graph breaks are the
  draws from the explicit ``torch.Generator``. The inductor (C++ codegen) variant runs too
  (about 10 s of compilation on a 2-core CPU).
"""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from mochi_hub import engine
from mochi_hub.config import load_config
from mochi_hub.engine import pretrain
from mochi_hub.losses import MixingSpec, moco_v2_loss
from mochi_hub.mixing import mochi_logits
from mochi_hub.moco import MoCoV2, create_backbone
from mochi_hub.queue import MemoryQueue

aten = torch.ops.aten

# --------------------------------------------------------------------------- the sync guard

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_MISSING = object()


class HostSyncError(AssertionError):
    """A tensor was read on the host inside a guarded region."""


def _is_op(func, *packets) -> bool:
    return getattr(func, "overloadpacket", None) in packets


class _SyncOpDetector(TorchDispatchMode):
    """Rejects aten ops that make the host wait for the device on an accelerator."""

    SYNCING = (
        aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t)
        aten.nonzero,
        aten.masked_select,
        aten.unique_consecutive,
        aten._unique,
        aten._unique2,
        aten.unique_dim,
        aten.equal,
        aten.is_nonzero,
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_op(func, *self.SYNCING):
            raise HostSyncError(f"{func} synchronises host and device")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostSyncError(f"{func} without output_size synchronises")
        if _is_op(func, aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices or ()):  # fmt: skip
                raise HostSyncError(f"{func} with a boolean mask synchronises (nonzero)")
        if _is_op(func, aten._to_copy) and kwargs.get("device") is not None:
            if args[0].device.type != "cpu" and torch.device(kwargs["device"]).type == "cpu":
                raise HostSyncError(f"{func}: device-to-host copy")
        if _is_op(func, aten.copy_) and args[0].device.type == "cpu":
            if args[1].device.type != "cpu":
                raise HostSyncError(f"{func}: device-to-host copy")
        return func(*args, **kwargs)


def _raiser(name: str):
    def forbidden(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name}() inside the training step (host-device sync)")

    return forbidden


class SyncGuard:
    """Forbid host reads of tensors between :meth:`enter` and :meth:`exit`.

    Can be entered in one function and left in another (the engine's step spans several).
    """

    def __init__(self) -> None:
        self.active = False
        self.entered = 0
        self._saved: dict = {}
        self._mode: _SyncOpDetector | None = None
        self._cuda_mode = None

    def enter(self) -> None:
        assert not self.active, "guard entered twice"
        for name in HOST_READS:
            self._saved[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, _raiser(name))
        self._mode = _SyncOpDetector()
        self._mode.__enter__()
        if torch.cuda.is_available():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        self.active = True
        self.entered += 1

    def exit(self) -> None:
        if not self.active:
            return
        self.active = False
        if self._cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
            self._cuda_mode = None
        self._mode.__exit__(None, None, None)
        self._mode = None
        for name, orig in self._saved.items():
            if orig is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
        self._saved.clear()


@contextmanager
def forbid_host_sync():
    guard = SyncGuard()
    guard.enter()
    try:
        yield guard
    finally:
        guard.exit()


# --------------------------------------------------------------------------- helpers

TINY_BACKBONE = "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}"


def _tiny_moco(seed: int = 0, queue_size: int = 256) -> MoCoV2:
    torch.manual_seed(seed)
    backbone = create_backbone("resnet18", channels=[8, 8, 16, 16], stem_width=8)
    return MoCoV2(
        backbone, proj_dim=32, queue_size=queue_size, generator=torch.Generator().manual_seed(1)
    )


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


# --------------------------------------------------------------------------- (a) host syncs


def _read_in_backward(x: torch.Tensor) -> None:
    x.requires_grad_(True).register_hook(lambda g: g.sum().item())
    x.square().sum().backward()


@pytest.mark.parametrize(
    "read",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.sum() > 0),
        lambda x: float(x.sum()),
        lambda x: x.tolist(),
        lambda x: x.cpu(),
        lambda x: x.numpy(),
        lambda x: x[x > 0],  # boolean mask: a nonzero inside the kernel
        lambda x: torch.nonzero(x),
        lambda x: torch.unique(x),
        lambda x: x.repeat_interleave(torch.ones(x.shape[0], dtype=torch.long)),
        lambda x: _read_in_backward(x),
    ],
    ids=["item", "bool", "float", "tolist", "cpu", "numpy", "mask", "nonzero", "unique",
         "repeat_interleave", "in_backward"],
)  # fmt: skip
def test_guard_catches_each_kind_of_host_sync(read):
    x = torch.randn(6)
    with pytest.raises(HostSyncError), forbid_host_sync():
        read(x)
    assert x.detach().sum().item() == pytest.approx(float(x.detach().sum()))  # restored


def test_guard_lets_device_side_math_through():
    x = torch.randn(6, 4, requires_grad=True)
    with forbid_host_sync():
        y = torch.where(x > 0, x, x * 0.1)[torch.tensor([0, 2])]  # long index: no sync
        y.topk(2, dim=1, sorted=False).values.sum().backward()
    assert x.grad is not None


def _quickstart(tmp_path, *extra):
    return load_config(
        "quickstart",
        [
            "train.log_with=none",
            "train.log_every=1000",  # the loop's logging step (its host syncs) is the last one
            "eval.at_start=false",
            "eval.at_end=false",
            "data.num_workers=0",
            "data.batch_size=32",
            "model.queue_size=256",
            "mixing.start_epoch=0",
            "mixing.num_hard=16",
            "mixing.num_synthetic=8",
            "mixing.num_synthetic_query=4",
            "train.checkpoint_every_epochs=0",
            TINY_BACKBONE,
            f"train.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def test_training_steps_with_mochi_make_no_host_sync(tmp_path, monkeypatch):
    # key_bn_splits=2 also runs the shuffled key path (permutation, split-BN) in the step.
    cfg = _quickstart(tmp_path, "train.max_steps=3", "mixing.impl=fused", "model.key_bn_splits=2")
    guard = SyncGuard()
    synthetic = []
    real_step, real_enqueue = engine._contrastive_step, MemoryQueue.enqueue

    def guarded_step(*args, **kwargs):
        guard.enter()  # left again at the end of the step's enqueue
        out = real_step(*args, **kwargs)
        synthetic.append(out.first.num_synthetic)
        return out

    def enqueue_then_release(self, *args, **kwargs):
        real_enqueue(self, *args, **kwargs)
        assert guard.active, "enqueue ran outside the guarded step"
        guard.exit()

    monkeypatch.setattr(engine, "_contrastive_step", guarded_step)
    monkeypatch.setattr(MemoryQueue, "enqueue", enqueue_then_release)
    try:
        result = pretrain(cfg)
    finally:
        guard.exit()
    assert result.steps == 3 and guard.entered == 3
    assert synthetic == [8 + 4] * 3  # MoCHi was on in every guarded step


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_mochi_loss_and_backward_make_no_host_sync(impl):
    # (A class-oracle mask is left out: on the CPU its "enough candidates" check reads the
    # count on the host by design; on accelerators it is torch._assert_async.)
    q = _unit(16, 32, seed=0).requires_grad_(True)
    k, queue = _unit(16, 32, seed=1), _unit(512, 32, seed=2)
    spec = MixingSpec(64, 32, 16, impl=impl)
    with forbid_host_sync():
        out = moco_v2_loss(
            q, k, queue, temperature=0.2, mixing=spec, generator=torch.Generator().manual_seed(5)
        )
        out.loss.backward()
    assert out.num_synthetic == 48 and q.grad is not None


def test_guard_reaches_the_optimizer_step_of_the_engine_loop(tmp_path, monkeypatch):
    # Control for the test above: a sync planted in the optimiser step is caught.
    cfg = _quickstart(tmp_path, "train.max_steps=1")
    guard = SyncGuard()
    real_step = engine._contrastive_step

    def guarded_step(*args, **kwargs):
        guard.enter()
        return real_step(*args, **kwargs)

    def planted(optimizer, args, kwargs):
        optimizer.param_groups[0]["params"][0].grad.abs().sum().item()

    monkeypatch.setattr(engine, "_contrastive_step", guarded_step)
    handle = register_optimizer_step_pre_hook(planted)
    try:
        with pytest.raises(HostSyncError, match="item"):
            pretrain(cfg)
    finally:
        handle.remove()
        guard.exit()
    assert guard.entered == 1


# --------------------------------------------------------------------------- (b) bf16


class _DtypeRecorder(TorchDispatchMode):
    """Records the floating-point input dtypes of selected aten ops."""

    def __init__(self, *packets):
        super().__init__()
        self.packets = packets
        self.dtypes: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_op(func, *self.packets):
            name = func.overloadpacket.__name__
            seen = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.dtypes.setdefault(name, set()).update(seen)
        return func(*args, **(kwargs or {}))


# Elementwise and reduction arithmetic: what MoCHi's mixing and normalisation are made of (the
# matmuls that autocast lowers on purpose and pure selection / indexing / casts are not listed).
ARITHMETIC = tuple(
    getattr(aten, name)
    for name in (
        "add", "sub", "rsub", "mul", "div", "pow", "sqrt", "rsqrt", "reciprocal", "clamp",
        "clamp_min", "sum", "linalg_vector_norm", "addcmul", "lerp", "exp", "log",
        "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only",
    )
    if hasattr(aten, name)
)  # fmt: skip
MATMULS = (aten.mm, aten.bmm, aten.addmm, aten.matmul, aten.baddbmm)


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_loss_under_bf16_autocast_is_finite_and_close_to_float32(impl):
    q, k, queue = _unit(16, 32, seed=0), _unit(16, 32, seed=1), _unit(512, 32, seed=2)
    spec = MixingSpec(64, 32, 16, impl=impl)

    def loss():
        return moco_v2_loss(
            q, k, queue, temperature=0.2, mixing=spec, generator=torch.Generator().manual_seed(5)
        )

    ref = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16), _DtypeRecorder(*MATMULS) as rec:
        out = loss()
    assert torch.bfloat16 in set().union(*rec.dtypes.values())  # autocast was really on
    assert torch.isfinite(out.loss) and out.num_synthetic == 48
    syn = out.logits[:, -out.num_synthetic :].float() * 0.2  # cosines of unit vectors
    assert syn.abs().max() <= 1.0 + 1e-2
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=0)


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_mixing_arithmetic_under_bf16_autocast_runs_in_float32(impl):
    q, queue = _unit(16, 32, seed=0), _unit(512, 32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        neg = q @ queue.T  # (B, K) bf16, as moco_v2_loss makes it under autocast
        assert neg.dtype == torch.bfloat16
        with _DtypeRecorder(*ARITHMETIC) as rec:
            mochi_logits(
                q, queue, neg, num_hard=64, num_synthetic=32, num_synthetic_query=16,
                generator=torch.Generator().manual_seed(5), impl=impl,
            )  # fmt: skip
    dtypes = set().union(*rec.dtypes.values())
    assert rec.dtypes and dtypes == {torch.float32}, rec.dtypes  # mixing and normalisation


def test_fused_synthetic_logits_under_bf16_autocast_are_float32_and_close():
    q, queue = _unit(16, 32, seed=0), _unit(512, 32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        neg = (q @ queue.T).float()  # (B, K) as autocast makes it, exactly upcast
    kw = dict(num_hard=64, num_synthetic=32, num_synthetic_query=16)
    # The same neg_logits and generator state: the same hard sets and draws in both runs.
    ref = mochi_logits(q, queue, neg, generator=torch.Generator().manual_seed(5), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        syn = mochi_logits(q, queue, neg, generator=torch.Generator().manual_seed(5), **kw)
    assert syn.dtype == torch.float32
    # Only the pair dot products n_i . n_j are autocast to bf16 (a relative error of ~4e-3
    # in a term weighted by 2 a (1 - a) <= 1/2 of the squared norm).
    torch.testing.assert_close(syn, ref, atol=5e-3, rtol=0)


def test_bf16_autocast_training_step_matches_float32():
    # As Accelerate runs it: the model's forward under autocast, the loss outside, fp32 embeddings.
    x1, x2 = (torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    spec = MixingSpec(32, 16, 8)
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny_moco()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            with _DtypeRecorder(aten.convolution) as rec:
                q, k = model(x1, x2)
        assert rec.dtypes["convolution"] == {dtype}
        assert q.dtype == k.dtype == torch.float32
        out = moco_v2_loss(
            q, k, model.queue.keys, temperature=0.2, mixing=spec,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        out.loss.backward()
        assert torch.isfinite(out.loss)
        g = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
        assert torch.isfinite(g).all()
        losses[dtype], grads[dtype] = out.loss.detach(), g
    torch.testing.assert_close(losses[torch.bfloat16], losses[torch.float32], rtol=2e-2, atol=0)
    cos = F.cosine_similarity(grads[torch.bfloat16], grads[torch.float32], dim=0)
    assert cos > 0.9


# --------------------------------------------------------------------------- (c) channels_last


def test_channels_last_matches_contiguous():
    x1, x2 = (torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    spec = MixingSpec(32, 16, 8)
    base = _tiny_moco()
    models = {"contiguous": base, "channels_last": copy.deepcopy(base)}
    models["channels_last"].to(memory_format=torch.channels_last)
    assert models["channels_last"].backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    res = {}
    for name, model in models.items():
        fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
        q, k = model(x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt))
        out = moco_v2_loss(
            q, k, model.queue.keys, temperature=0.2, mixing=spec,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        out.loss.backward()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt.step()
        model.momentum_update(0.9)
        model.queue.enqueue(k)
        res[name] = (q.detach(), k, out.loss.detach(), model)
    (q_a, k_a, loss_a, m_a), (q_b, k_b, loss_b, m_b) = res["contiguous"], res["channels_last"]
    torch.testing.assert_close(q_b, q_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k_b, k_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-4)
    state_a, state_b = m_a.state_dict(), m_b.state_dict()
    for key in state_a:  # weights after the step, momentum encoder, BN statistics, queue
        torch.testing.assert_close(state_b[key], state_a[key], atol=1e-5, rtol=1e-4, msg=key)
    w = m_b.momentum_backbone.conv1.weight  # the step keeps the layout
    assert w.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- (d) torch.compile


def _mixing_case(fn):
    q = _unit(8, 32, seed=0).requires_grad_(True)
    queue = _unit(256, 32, seed=1)
    neg = q @ queue.T
    out = fn(
        q, queue, neg, num_hard=32, num_synthetic=16, num_synthetic_query=8,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    (out.square().sum() + neg.sum()).backward()
    return out.detach(), q.grad


def test_compiled_mochi_logits_match_eager_and_break_only_at_the_generator():
    torch._dynamo.reset()
    eager, grad = _mixing_case(mochi_logits)
    compiled = torch.compile(mochi_logits, dynamic=False, backend="aot_eager")
    for _ in range(2):  # the second call reuses the compiled graphs
        out, g = _mixing_case(compiled)
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g, grad, atol=1e-6, rtol=1e-5)
    explain = torch._dynamo.explain(mochi_logits)(
        _unit(8, 32, seed=0), _unit(256, 32, seed=1), num_hard=32, num_synthetic=16,
        num_synthetic_query=8, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert explain.graph_count >= 1 and explain.op_count > 0
    reasons = [str(b.reason) for b in explain.break_reasons]
    assert all("Generator" in r for r in reasons), reasons  # randomness only
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_mochi_logits_match_eager():
    """Inductor (the default backend) compiles MoCHi's op; 10-20 s of C++ compilation on CPU."""
    torch._dynamo.reset()
    eager, grad = _mixing_case(mochi_logits)
    out, g = _mixing_case(torch.compile(mochi_logits, dynamic=False))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g, grad, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
