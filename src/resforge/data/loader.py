"""Batches for the training loop: (x_u8 (B,C,H,W) on device, y (B,), index (B,)).

Two paths with one interface:
- TensorBatches: the whole split is one uint8 tensor on the training device (airbench style);
  a batch is an index_select, with no per-image Python at all.
- StreamBatches: a split too large for memory is decoded per batch by DataLoader workers.
The order of an epoch is a pure function of (seed, epoch), so resumed runs repeat it exactly.

Sharded (shard=True, under torch.distributed): batch_size stays the global batch and every rank
draws the same order; a training batch is this rank's share of each global batch, an evaluation
split this rank's contiguous slice (resforge.distributed: rank_share, eval_slice, gather_rows).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from resforge import distributed as D
from resforge.data.stream import FileImageDataset


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def _order(n: int, shuffle: bool, g: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=g, device=device) if shuffle else torch.arange(n, device=device)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class TensorBatches:
    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device,
                 batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 sample_weights: np.ndarray | None = None, shard: bool = False):
        self.sharded = shard and D.active()
        self.offset = 0
        if self.sharded and not shuffle:             # evaluation: this rank's contiguous slice
            self.offset, hi = D.eval_slice(len(labels))
            images, labels = images[self.offset:hi], labels[self.offset:hi]
        elif self.sharded:
            D.shard_check(batch_size)
        # One copy into (device) memory; a memmap from the cache is read sequentially here.
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.device, self.batch_size, self.shuffle = device, batch_size, shuffle
        # Dropping a last batch of one keeps BatchNorm's batch statistics defined.
        self.drop_last = drop_last and len(self.labels) > batch_size
        # Optional per-item draw weights (balanced sampling): an epoch is then N draws with
        # replacement, so rare classes are seen as often as common ones.
        self.weights = None if sample_weights is None else \
            torch.as_tensor(np.asarray(sample_weights, np.float64), dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return _num_batches(len(self.labels), self.batch_size, self.drop_last)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def batches(self, g: torch.Generator | None = None):
        if self.weights is not None and self.shuffle:
            order = torch.multinomial(self.weights, len(self.labels), replacement=True, generator=g)
        else:
            order = _order(len(self.labels), self.shuffle, g, self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.sharded and self.shuffle:
                idx = D.rank_share(idx)
            yield (self.images.index_select(0, idx), self.labels.index_select(0, idx),
                   idx + self.offset if self.offset else idx)


class StreamBatches:
    def __init__(self, dataset: FileImageDataset, device: torch.device, batch_size: int,
                 shuffle: bool = False, drop_last: bool = False, workers: int = 2, shard: bool = False):
        self.dataset, self.device, self.batch_size = dataset, device, batch_size
        self.shuffle, self.workers = shuffle, workers
        self.drop_last = drop_last and len(dataset) > batch_size
        self.sharded = shard and D.active()
        self.rows = range(len(dataset))
        if self.sharded and not shuffle:
            self.rows = range(*D.eval_slice(len(dataset)))
        elif self.sharded:
            D.shard_check(batch_size)

    def __len__(self) -> int:
        return _num_batches(len(self.dataset), self.batch_size, self.drop_last) if self.shuffle else \
            _num_batches(len(self.rows), self.batch_size, False)

    @property
    def num_images(self) -> int:
        return len(self.rows)

    def batches(self, g: torch.Generator | None = None):
        step = self.batch_size
        if self.shuffle:
            order = _order(len(self.dataset), True, g, "cpu")
            if self.sharded:         # the distributed sampler: this rank's share of every global batch
                order = torch.cat([D.rank_share(order[i * step:(i + 1) * step]) for i in range(len(self))])
                step = step // D.world_size()
            sampler = order.tolist()
        else:
            sampler = self.rows
        loader = DataLoader(_Indexed(self.dataset), batch_size=step, sampler=sampler,
                            drop_last=self.drop_last and not self.sharded, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y, idx in loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))


class _Indexed(torch.utils.data.Dataset):
    """Adds the dataset index to each item (alternating flip keys on it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def make_batches(bundle, split: str, device: torch.device, batch_size: int, *, train: bool,
                 workers: int = 2, shard: bool = False):
    """The batch source for one split of a DataBundle (in-memory or streamed); shard: this rank's
    part of it under torch.distributed (see the module's docstring)."""
    sp = bundle.splits[split]
    if sp.images is not None:
        return TensorBatches(sp.images, sp.labels, device, batch_size, shuffle=train, drop_last=train, shard=shard)
    ds = FileImageDataset(sp.files, sp.labels, bundle.image_size, bundle.channels,
                          bundle.extra.get("resize", "shorter-center-crop"))
    return StreamBatches(ds, device, batch_size, shuffle=train, drop_last=train, workers=workers, shard=shard)
