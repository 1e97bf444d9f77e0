"""Each worker's stream of training pairs: its own shard, deterministic and resumable batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from dcfm.data import detect_layout, open_pair_dataset
from dcfm.data.base import PairDataset, PairRef
from dcfm.data.staging import stage_dataset
from dcfm.train.recipe import AugmentConfig, PairAugment, PairBatch

Candidates = tuple[PairRef, ...]  # one labelled frame paired with each allowed neighbour distance
T = TypeVar("T")


def open_training_data(uri: str, layout: str = "auto", split: str = "train", delta: int = 1,
                       decoded_cache_mb: int = 0, cache_dir: str | None = None) -> PairDataset:
    """Stage ``uri`` locally when it is in object storage (see ``stage_dataset``) and open it as pairs."""
    root: Path = stage_dataset(uri, cache_dir)
    name = detect_layout(root) if layout == "auto" else layout
    extra = {"decoded_cache_mb": decoded_cache_mb} if name == "synth" else {}
    return open_pair_dataset(root, layout=name, split=split, delta=delta, **extra)


def open_training_pairs(uri: str, layout: str = "auto", split: str = "train", delta: int = 1,
                        max_delta: int | None = None, decoded_cache_mb: int = 0,
                        cache_dir: str | None = None) -> tuple[PairDataset, list[Candidates]]:
    """The dataset plus, for each labelled frame, its pair with every neighbour offset ``±delta..±max_delta``.

    Training draws one of them per visit: the sign as the official code does (so the reuse path sees past
    keyframes, as causal inference uses, as well as future ones), and the distance so it also learns the larger
    gaps between a keyframe and the frames that reuse it at inference (up to k - 1), not only ``delta = 1``.
    An offset that leaves the clip falls back to the other sign; duplicates are kept once.
    """
    root = str(stage_dataset(uri, cache_dir))
    dataset = open_training_data(root, layout, split, delta, decoded_cache_mb)
    top = delta if max_delta is None else max_delta
    offsets = [signed for d in range(delta, top + 1) for signed in (d, -d)][1:]
    others = [open_training_data(root, dataset.layout, split, d).refs for d in offsets]
    for d, refs in zip(offsets, others):
        same = len(refs) == len(dataset.refs) and all(
            (a.video_id, a.labeled_index) == (b.video_id, b.labeled_index) for a, b in zip(refs, dataset.refs))
        if not same:
            raise ValueError(f"{uri}: the labelled frames differ between delta {delta} and {d}; "
                             "use a smaller --max-delta")
    return dataset, [tuple(dict.fromkeys(c)) for c in zip(dataset.refs, *others)]


def shard_refs(refs: Sequence[T], rank: int, world_size: int) -> list[T]:
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
    ``refs`` holds pairs, or tuples of candidate pairs for the same labelled frame (one drawn per visit).
    """

    def __init__(self, dataset: PairDataset, refs: Sequence[PairRef | Candidates], augment: AugmentConfig,
                 batch_size: int, seed: int, rank: int) -> None:
        self.dataset = dataset  # loads any pair of its layout
        self.refs: list[Candidates] = [r if isinstance(r, tuple) else (r,) for r in refs]
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

    def pairs(self, step: int) -> list[PairRef]:
        """The pairs of batch ``step``: shard positions, then one candidate neighbour each."""
        pick = np.random.default_rng([self.seed, self.rank, step, 0xDE17A])
        chosen = [self.refs[i] for i in self.indices(step)]
        return [c[int(pick.integers(len(c)))] if len(c) > 1 else c[0] for c in chosen]

    def batch(self, step: int) -> PairBatch:
        samples = [self.dataset.load(ref) for ref in self.pairs(step)]
        return self.augment.batch(samples, np.random.default_rng([self.seed, self.rank, step]))
