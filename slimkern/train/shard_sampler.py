r"""Which samples each rank of a data-parallel run trains on (``DistributedSampler``'s job).

One global batch of :math:`W b` samples is split into :math:`W` rank batches of :math:`b`.
Every epoch, all ranks draw the *same* permutation :math:`\pi` of the :math:`n` samples from
the trainer's data generator (it starts from the same seed on every rank and is checkpointed),
exactly as the single-process loader (``DataLoader(shuffle=True, generator=g)``) does, and rank
``r`` takes the interleaved share :math:`\pi[r], \pi[r+W], \pi[r+2W], \dots` (torch's
``DistributedSampler`` layout). Its ``k``-th batch is :math:`\{\pi[Wi + r] : kb \le i < (k+1)b\}`,
so the union over ranks of the ``k``-th batches is :math:`\pi[kWb, (k+1)Wb)` — the single
process's ``k``-th batch of size :math:`Wb`. With equal rank batches, the mean over ranks of
the per-rank mean losses is the mean over the global batch.

Sizes mirror the single-process ``drop_last = n > batch``: with :math:`n > Wb` the tail of
:math:`n \bmod Wb` samples is dropped (every rank runs :math:`\lfloor n/(Wb)\rfloor` full
batches); with :math:`n \le Wb` there is one global batch of :math:`n - (n \bmod W)` samples,
:math:`\lfloor n/W \rfloor` per rank. Ranks never run different numbers of steps (that would
leave one waiting in a collective forever).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["RankShardSampler"]


class RankShardSampler(Sampler[int]):
    """Rank ``rank``'s indices of a shuffled epoch over ``num_samples`` samples (module docstring).

    Args:
        num_samples: dataset length ``n``.
        rank, world_size: this process and the number of processes ``W``.
        batch_size: per-rank batch size ``b``.
        generator: the permutation's generator; pass the same state on every rank.
        shuffle: False keeps the dataset order (then the generator is not used).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, batch_size: int,
                 generator: torch.Generator | None = None, shuffle: bool = True):
        for name, v, lo in (("num_samples", num_samples, 1), ("world_size", world_size, 1),
                            ("batch_size", batch_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"RankShardSampler: {name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"RankShardSampler: rank {rank} is not below world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"RankShardSampler: {num_samples} samples cannot give each of {world_size} ranks one")
        if shuffle and generator is None:
            raise ValueError("RankShardSampler: shuffle=True needs the generator every rank shares")
        self.num_samples, self.rank, self.world_size, self.batch_size = num_samples, rank, world_size, batch_size
        self.generator, self.shuffle = generator, shuffle
        glob = world_size * batch_size
        self.per_rank = (num_samples // glob) * batch_size if num_samples > glob else num_samples // world_size

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        # Drawn lazily, as RandomSampler does: the DataLoader takes its base seed from the same
        # generator first, so one process here consumes it exactly like shuffle=True.
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator)
        else:
            order = torch.arange(self.num_samples)
        used = self.per_rank * self.world_size
        yield from order[self.rank:used:self.world_size].tolist()
        if self.shuffle:
            # RandomSampler draws a second permutation (``randperm(n)[:n % n]``) once its first
            # one is exhausted, which a DataLoader always asks for at the end of an epoch; so
            # do we, and the generator advances the same way epoch after epoch.
            torch.randperm(self.num_samples, generator=self.generator)
