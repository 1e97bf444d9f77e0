"""Each worker's stream of training pairs: its own shard, deterministic and resumable batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcfm.datasets import PairDataset, PairRef, detect_layout, open_pair_dataset, stage_dataset
from dcfm.training import AugmentConfig, PairAugment, PairBatch


def open_training_data(uri: str, layout: str = "auto", split: str = "train", delta: int = 1,
                       decoded_cache_mb: int = 0) -> PairDataset:
    """Stage ``uri`` locally when it is in object storage and open it as a pair dataset."""
    root: Path = stage_dataset(uri)
    name = detect_layout(root) if layout == "auto" else layout
    extra = {"decoded_cache_mb": decoded_cache_mb} if name == "synth" else {}
    return open_pair_dataset(root, layout=name, split=split, delta=delta, **extra)


def shard_refs(refs: Sequence[PairRef], rank: int, world_size: int) -> list[PairRef]:
    """Rank ``rank``'s share of the pairs (every ``world_size``-th one); never empty."""
    shard = list(refs[rank::world_size])
    if not shard:
        raise ValueError(f"{len(refs)} labelled pair(s) cannot feed {world_size} workers (worker {rank} would get "
                         "none); use fewer --workers or more labelled data")
    return shard


class PairStream:
    """Batches for one worker. ``batch(step)`` depends only on (seed, rank, step), so a run resumed from a
    checkpoint at step s draws exactly the batches an uninterrupted run would have drawn from s on.

    Pairs are visited in a fresh permutation of the shard every epoch (no replacement within an epoch);
    each pair's augmentation draws one set of parameters applied to both of its frames and its label.
    """

    def __init__(self, dataset: PairDataset, refs: Sequence[PairRef], augment: AugmentConfig,
                 batch_size: int, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.refs = list(refs)
        self.augment = PairAugment(augment)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self._permutation: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.refs)

    def indices(self, step: int) -> list[int]:
        """Shard positions of the pairs in batch ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, len(self.refs))
            if self._permutation is None or self._permutation[0] != epoch:
                rng = np.random.default_rng([self.seed, self.rank, epoch, 0x5EED])
                self._permutation = (epoch, rng.permutation(len(self.refs)))
            out.append(int(self._permutation[1][offset]))
        return out

    def batch(self, step: int) -> PairBatch:
        samples = [self.dataset.load(self.refs[i]) for i in self.indices(step)]
        return self.augment.batch(samples, np.random.default_rng([self.seed, self.rank, step]))
