"""Data order and multi-process training (`torchrun --nproc_per_node N train.py ...`).

The global order of micro-batches is one seeded permutation per epoch. With N processes each
micro-batch of `batch_size` images is cut into N equal slices, one per rank, so the global batch,
the data order and (after DDP's gradient all-reduce, a mean over ranks) the gradients are those of
the single-process run:

    epoch permutation ─► [b0 b1 b2 ... ] micro-batches of batch_size
                         b_i = [rank0 slice | rank1 slice | ...]        (batch_size / N each)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of every micro-batch of a seeded per-epoch shuffle (drop_last, as the
    paper). `skip` resumes mid-epoch after that many micro-batches.

    weights (one per dataset index, e.g. balance.sampling_weights): instead of a permutation, each epoch
    draws n indices with replacement, P(i) ∝ weights[i] (`--sampler balanced`). The draw is seeded by
    (seed, epoch) like the permutation, so every rank computes the same global order and slices it as
    above, and a resumed epoch skips into the same order."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, weights=None):
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and (self.weights.shape != (n,) or not (self.weights >= 0).all()
                                         or self.weights.sum() <= 0):
            raise ValueError(f"MicroBatchSampler: weights must be {n} non-negative numbers, not all zero")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def num_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches() - self.skip

    def order(self) -> list[int]:
        """The epoch's global order of dataset indices (the same on every rank)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        return torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))

    def __iter__(self):
        order = self.order()
        per_rank = self.batch_size // self.world
        for b in range(self.skip, self.num_batches()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(batch) < self.batch_size:  # only without drop_last: split the remainder evenly
                yield batch[self.rank::self.world]
            else:
                yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return rank, world, local


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over the ranks (identity when single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
