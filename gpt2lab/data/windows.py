"""Fixed-length windows over a split's token file, and the sampler that resumes their shuffled order."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from gpt2lab.errors import ConfigError


class TokenBlockDataset(Dataset):
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs plus the shifted targets)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))


class SlidingWindowDataset(Dataset):
    """Windows of ``block_size + 1`` tokens every ``stride`` tokens, for evaluation: each token is predicted
    with up to a full context. Item ``i`` is ``(window, first_scored)``: the window's labels before
    ``first_scored`` were scored by the window before it and serve as context only. With ``stride ==
    block_size`` these are ``TokenBlockDataset``'s windows, every label scored."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int) -> None:
        if not 1 <= stride <= block_size:
            raise ConfigError(f"eval.stride={stride}: expected 1 to the context length ({block_size}), or null")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        n = len(self.tokens) - 1 - self.block_size  # where the last full window may start
        return n // self.stride + 1 if n >= 0 else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        start = i * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window, 0 if i == 0 else self.block_size - self.stride


class ResumableRandomSampler(DistributedSampler):
    """This rank's share of a seeded permutation per epoch, able to start part-way through, so that a
    resumed run sees the same batches, in the same order, as an uninterrupted one.

    Each epoch is ``torch.randperm`` seeded by ``seed + epoch`` (Lightning calls ``set_epoch``), less
    the tail that does not split evenly, and rank ``r`` takes every ``num_replicas``-th index from
    ``r``: ``DistributedSampler(shuffle=True, drop_last=True)``. With one replica that is the whole
    permutation. It is a ``DistributedSampler`` so that Lightning uses it as is under DDP; any other
    sampler gets wrapped in ``DistributedSamplerWrapper``, which splits the sampler's own order across
    ranks and so cannot start mid-epoch. ``len()`` stays the full epoch, so that Lightning's count of
    the epoch's batches is the same in a resumed run as in the run it resumes."""

    def __init__(self, dataset: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0  # samples of this rank's current epoch already consumed (set on resume)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(order)
