"""Worker of tests/test_distributed.py, started once per rank by torchrun (gloo, CPU)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from mochi_hub.distributed import gather_no_grad, gather_with_grad, rank, world_size
from mochi_hub.losses import MixingSpec, moco_v2_loss
from mochi_hub.moco import MoCoV2, create_backbone


def main(out_dir: str) -> None:
    acc = Accelerator(
        cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]
    )
    torch.manual_seed(0)  # same initial weights and queue on every rank
    model = MoCoV2(
        create_backbone("resnet18", channels=(8, 8, 8, 8), stem_width=8),
        proj_dim=8,
        queue_size=24,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    net = acc.unwrap_model(model)
    data_gen = torch.Generator().manual_seed(100 + acc.process_index)  # different images per rank
    mix_gen = torch.Generator().manual_seed(7 + acc.process_index)
    shuffle_gen = torch.Generator().manual_seed(3)  # the same permutation on both ranks
    seen_keys, first_key = [], None
    for _ in range(4):  # 4 steps x global batch 8 > queue 24: wraps around
        x = torch.randn(4, 3, 32, 32, generator=data_gen)
        perm = torch.randperm(8, generator=shuffle_gen)  # shuffle-BN across the two ranks
        q, k = model(x, x + 0.1 * torch.randn(x.shape, generator=data_gen), key_perm=perm)
        first_key = k[0].tolist() if first_key is None else first_key
        out = moco_v2_loss(
            q, k, net.queue.keys, temperature=0.2, mixing=MixingSpec(4, 3, 2), generator=mix_gen
        )
        opt.zero_grad()
        acc.backward(out.loss)
        opt.step()
        net.momentum_update(0.9)
        all_keys = gather_no_grad(k)
        seen_keys.append(all_keys)
        net.queue.enqueue(all_keys)
    queues = gather_no_grad(net.queue.keys[None])
    ptrs = gather_no_grad(net.queue.ptr[None])
    params = gather_no_grad(torch.cat([p.detach().flatten() for p in net.parameters()])[None])
    v = torch.full((2, 3), float(acc.process_index), requires_grad=True)
    gathered = gather_with_grad(v)
    gathered.sum().backward()
    start = (4 * 8 - 8) % 24
    result = {
        "rank": rank(),
        "world": world_size(),
        "queues_equal": bool(all(torch.equal(queues[0], qq) for qq in queues)),
        "ptrs": ptrs.tolist(),
        "params_equal": bool(all(torch.equal(params[0], pp) for pp in params)),
        "last_keys_in_queue": bool(torch.equal(net.queue.keys[start : start + 8], seen_keys[-1])),
        "first_rows_from_rank0": bool(torch.equal(gathered[:2], torch.zeros(2, 3))),
        "grad": v.grad.tolist(),
        "loss_finite": bool(torch.isfinite(out.loss).item()),
        "first_key": first_key,
    }
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group: no gloo thread left running at exit


if __name__ == "__main__":
    main(sys.argv[1])
