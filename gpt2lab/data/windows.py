"""Windows over a split's token file: fixed-length ones for training, the sampler that resumes their shuffled order,
and evaluation's windows that score every token once, shared out over DDP ranks without repeats."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from gpt2lab.errors import ConfigError

BLANK = -1  # EvalSampler's index for a window that scores nothing (BlankPadded)


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
    """Windows for evaluation that score every token of ``tokens`` exactly once, whatever the stride, so that
    strides compare on the same tokens and bytes. The first window scores all its labels; each later one scores
    the next ``stride`` labels (fewer at the end) with the window's full context before them, so its last window is
    aligned to the end of the text rather than cut short. ``stride=None`` is ``block_size``: non-overlapping
    windows, the last one scoring what remains. With ``prefix`` (the end-of-text id) the text is read after it, so
    its first token is scored too, as lm-evaluation-harness does (its rolling windows are these, with
    ``stride`` its prediction length).

    Item ``i`` is one int64 tensor of ``block_size + 1`` tokens, as ``MaskedWindowDataset``'s: a token whose
    label is not scored (context that an earlier window scored, padding after a short window) is stored as
    ``~id`` (``split_batch``)."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int | None = None, prefix: int | None = None):
        stride = block_size if stride is None else stride
        if not 1 <= stride <= block_size:
            raise ConfigError(f"eval.stride={stride}: expected 1 to the context length ({block_size}), or null")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride
        self.prefix = prefix
        self.labels = len(tokens) - (prefix is None)  # the tokens scored: all, or all but the first without prefix

    def __len__(self) -> int:
        if self.labels <= 0:
            return 0
        return 1 + -(-max(self.labels - self.block_size, 0) // self.stride)  # the first window, then one per stride

    def _end(self, i: int) -> int:
        """How many labels windows 0..i score together (the last scored label's position in the text read)."""
        return min(self.block_size + i * self.stride, self.labels)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")  # also ends iteration over the dataset
        window = torch.full((self.block_size + 1,), ~0, dtype=torch.int64)  # padding: id 0, not scored
        end = self._end(i)
        first_scored = 0 if i == 0 else self.block_size - (end - self._end(i - 1))  # labels before it: context
        start = max(end - self.block_size, 0)  # in the text read, the prefix (if any) at position 0
        if self.prefix is None:
            ids = self.tokens[start : end + 1].astype(np.int64)
        else:
            ids = self.tokens[max(start - 1, 0) : end].astype(np.int64)
            ids = np.concatenate([[self.prefix], ids]) if start == 0 else ids
        window[: len(ids)] = torch.from_numpy(ids)
        window[: first_scored + 1] = ~window[: first_scored + 1]  # the first input and the context's labels
        return window

    def scored_tokens(self) -> np.ndarray:
        """The tokens the windows score, in order: the whole text (without ``prefix``, all but its first token)."""
        return self.tokens if self.prefix is not None else self.tokens[1:]


class EvalSampler(DistributedSampler):
    """Each rank's share of the evaluation windows, every window on exactly one rank. Lightning would put a
    ``DistributedSampler`` here, which repeats windows so that the ranks get as many, and so scores their tokens
    twice; here every rank also gets as many, but a rank that runs short gets index ``BLANK``, a window that
    scores nothing (``BlankPadded``). Without ``num_replicas`` and ``rank`` the ranks are
    read from ``torch.distributed`` when iterated: the dataloader is made before the processes of ``trainer=ddp``
    start. Being a ``DistributedSampler``, Lightning uses it as it is."""

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas or 1, rank=rank or 0, shuffle=False)
        self.fixed = (num_replicas, rank) if num_replicas is not None else None

    def _ranks(self) -> tuple[int, int]:
        if self.fixed is not None:
            return self.fixed[0], self.fixed[1] or 0
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self._ranks()[0])

    def __iter__(self) -> Iterator[int]:
        replicas, rank = self._ranks()
        share = list(range(rank, len(self.dataset), replicas))
        return iter(share + [BLANK] * (len(self) - len(share)))


class BlankPadded(Dataset):
    """``dataset`` (windows of ``width`` tokens, those not scored stored as ``~id``) and, at index ``BLANK``, a
    window that scores nothing: what ``EvalSampler`` gives a rank that has run out of windows."""

    def __init__(self, dataset: Dataset, width: int) -> None:
        self.dataset, self.width = dataset, width

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.width,), ~0, dtype=torch.int64) if i == BLANK else self.dataset[i]

    def scored_tokens(self) -> np.ndarray:
        return self.dataset.scored_tokens()


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
