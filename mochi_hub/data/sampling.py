"""Deterministic data order and augmentation randomness, for exact resume.

The order of an epoch and the random augmentation of every image depend only on
``(seed, epoch, index)``: not on the number of loader workers, on which worker decodes an
image, or on where a run was interrupted. A resumed run skips the batches already seen and
continues with exactly the images, and the exact crops, of an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

__all__ = ["EpochSampler", "SeededDataset", "StreamingViews"]

logger = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant, decorrelates nearby seeds


def _seed_of(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 1) % (1 << 63)
    return h


class EpochSampler(Sampler[int]):
    """A permutation of ``range(size)`` per epoch, seeded by ``(seed, epoch)``.

    Indices are yielded as ``epoch * size + i`` so that :class:`SeededDataset` knows the epoch
    of every item even inside persistent loader workers.

    Args:
        size: Number of items in the data set.
        seed: Base seed of the run.
        shuffle: Permute each epoch (True) or keep the natural order.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size < 1:
            raise ValueError(f"the data set is empty (size {size})")
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next (called by Accelerate's loaders)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        offset = self.epoch * self.size
        return iter((order + offset).tolist())


class SeededDataset(Dataset):
    """Runs ``dataset[i]`` under a CPU RNG seeded by ``(seed, epoch, i)``.

    The global RNG state of the calling process is restored afterwards, so the wrapper has no
    side effect on the training process when the loader has no workers.

    Args:
        dataset: Map-style data set whose ``__getitem__`` draws from torch's global RNG.
        seed: Base seed of the run.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), len(self.dataset))
        rng = torch.default_generator  # the CPU generator the transforms draw from
        saved = rng.get_state()
        rng.manual_seed(_seed_of(self.seed, epoch, i))  # (torch.manual_seed also seeds devices)
        try:
            return self.dataset[i]
        finally:
            rng.set_state(saved)


class StreamingViews(IterableDataset):
    """Two augmented views of a streamed data set, sharded by process, seeded by position.

    For data sets too large for the disk (``datasets.IterableDataset`` from
    ``load_image_source(..., streaming=True)``). Each process reads its own part
    (``split_dataset_by_node``); each epoch the stream is shuffled through a buffer seeded by
    ``(seed, epoch)``; the augmentation of the j-th image a loader worker yields is seeded by
    ``(seed, epoch, rank, worker, j)``. An epoch therefore replays identically for a given
    number of loader workers, which is what exact resume relies on (the engine skips the
    batches already seen by reading them again). Undecodable images are dropped with a warning
    and counted in the next item's ``"corrupt"``.

    Args:
        stream: Iterable data set with an undecoded ``"image"`` column.
        transform: Two-view transform, image -> (view1, view2).
        seed: Base seed of the run.
        rank: This process's rank.
        world_size: Number of processes.
        shuffle_buffer: Size of the shuffle buffer (0: stream order).
    """

    def __init__(
        self,
        stream,
        transform,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
    ) -> None:
        from datasets.distributed import split_dataset_by_node

        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        self.transform, self.seed, self.rank = transform, seed, rank
        self.shuffle_buffer, self.epoch = shuffle_buffer, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced next (before creating an iterator)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        from mochi_hub.data.sources import _DECODE_ERRORS, decode_image

        stream = self.stream
        if self.shuffle_buffer > 0:
            stream = stream.shuffle(
                seed=_seed_of(self.seed, self.epoch) % (1 << 32), buffer_size=self.shuffle_buffer
            )
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng, skipped = torch.default_generator, 0
        for j, row in enumerate(stream):
            saved = rng.get_state()
            rng.manual_seed(_seed_of(self.seed, self.epoch, self.rank, worker, j))
            try:
                view1, view2 = self.transform(decode_image(row["image"]))
            except _DECODE_ERRORS as err:
                skipped += 1
                logger.warning(
                    "skipping corrupt streamed image %d: %s: %s", j, type(err).__name__, err
                )
                continue
            finally:
                rng.set_state(saved)
            yield {"view1": view1, "view2": view2, "corrupt": skipped}
            skipped = 0
