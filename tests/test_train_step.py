"""The pair step the train job runs, and the paired augmentation its workers apply (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcfm.data.base import PairDataset, PairRef, PairSample
from dcfm.losses import LossWeights, segmentation_ce
from dcfm.model import DCFM, DCFMConfig
from dcfm.train.data import PairStream, shard_refs
from dcfm.train.recipe import AugmentConfig, OptimConfig, PairBatch, build_optimizer, train_step

H, W, C = 32, 64, 4
COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)


class StripPairs(PairDataset):
    """Pairs whose frames paint their label: vertical class strips, each class its own flat colour.

    ``same``: the neighbour is the labelled frame itself; otherwise it is shifted by a few pixels (motion).
    """

    layout = "test"

    def __init__(self, count: int, same: bool = True) -> None:
        refs = [PairRef(f"v{i}", i, i + 1, "", "", "") for i in range(count)]
        super().__init__(refs, [f"c{i}" for i in range(C)], COLOURS.tolist())
        self.same = same

    def load(self, ref: PairRef) -> PairSample:
        widths = np.random.default_rng(ref.labeled_index).integers(6, 20, size=12)
        label = np.repeat(np.arange(len(widths)) % C, widths)[:W]
        label = np.pad(label, (0, W - label.size), mode="edge")[None].repeat(H, 0).astype(np.uint8)
        frame = COLOURS[label]
        neighbour = frame if self.same else np.roll(frame, 3, axis=1)
        return PairSample(frame, neighbour.copy(), label, ref)


def denormalise(x: torch.Tensor, config: AugmentConfig) -> np.ndarray:
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def test_both_frames_of_a_pair_get_the_same_augmentation() -> None:
    config = AugmentConfig(crop=(H, W), scale=(0.8, 1.6), max_rotation_deg=8.0, flip=True, colour_jitter=0.3)
    ds = StripPairs(6, same=True)
    stream = PairStream(ds, ds.refs, config, batch_size=3, seed=7, rank=0)
    labels_seen = []
    for step in range(8):
        batch = stream.batch(step)
        assert batch.labeled.shape == batch.neighbour.shape == (3, 3, H, W) and batch.labels.shape == (3, H, W)
        # Identical frames stay identical only if one draw of scale/rotation/crop/flip/jitter served both.
        torch.testing.assert_close(batch.labeled, batch.neighbour, rtol=0, atol=0)
        labels_seen.append(batch.labels)
    # ... and the draws differ from pair to pair (the augmentation is not a no-op).
    flat = torch.cat(labels_seen).flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == flat.shape[0]


def test_label_follows_the_frames_geometry() -> None:
    # No colour jitter or rotation, so each frame pixel's colour names its class exactly away from edges.
    config = AugmentConfig(crop=(H, W), scale=(0.9, 1.8), max_rotation_deg=0.0, flip=True, colour_jitter=0.0)
    ds = StripPairs(4, same=False)
    stream = PairStream(ds, ds.refs, config, batch_size=4, seed=3, rank=1)
    for step in range(4):
        batch = stream.batch(step)
        for i in range(4):
            rgb = denormalise(batch.labeled[i], config)
            distance = ((rgb[:, :, None, :] - COLOURS[None, None].astype(np.float32)) ** 2).sum(-1)
            painted = distance.argmin(-1)
            exact = distance.min(-1) < 30  # pixels not blended across a strip border by the resize
            label = batch.labels[i].numpy()
            assert exact.mean() > 0.6
            assert (painted[exact] == label[exact]).mean() > 0.99


def test_batches_depend_only_on_seed_rank_and_step() -> None:
    config = AugmentConfig(crop=(H, W))
    ds = StripPairs(5)
    a = PairStream(ds, ds.refs, config, batch_size=2, seed=1, rank=0)
    b = PairStream(ds, ds.refs, config, batch_size=2, seed=1, rank=0)
    for step in (4, 0, 9, 4):  # any order: a resumed worker starts mid-stream
        torch.testing.assert_close(a.batch(step).labeled, b.batch(step).labeled, rtol=0, atol=0)
    # Each epoch visits every pair of the shard once.
    visited = [i for step in range(5) for i in a.indices(step)]
    assert sorted(visited[:5]) == sorted(visited[5:]) == list(range(5))
    other_rank = PairStream(ds, ds.refs, config, batch_size=2, seed=1, rank=1)
    assert not torch.equal(other_rank.batch(0).labeled, a.batch(0).labeled)


def test_shards_partition_the_pairs() -> None:
    refs = StripPairs(7).refs
    shards = [shard_refs(refs, r, 3) for r in range(3)]
    assert sorted(sum(shards, []), key=lambda r: r.labeled_index) == refs
    assert all(not set(shards[i]) & set(shards[j]) for i in range(3) for j in range(i + 1, 3))
    with pytest.raises(ValueError, match="cannot feed 8 workers.*fewer --workers"):
        shard_refs(refs, 7, 8)


class FuseRecorder:
    """Records every ``model.fuse`` call (its two inputs and output) and every ``model.decode`` call."""

    def __init__(self, model: DCFM) -> None:
        self.fuse_calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.decode_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.common_out: list[torch.Tensor] = []
        self.independent_out: list[torch.Tensor] = []
        for name, store in (("common", self.common_out), ("independent", self.independent_out)):
            self._record(model, name, lambda args, out, store=store: store.append(out))
        self._record(model, "fuse", lambda args, out: self.fuse_calls.append((args[0], args[1], out)))
        self._record(model, "decode", lambda args, out: self.decode_calls.append((args[0], out)))

    @staticmethod
    def _record(model: DCFM, name: str, sink) -> None:
        original = getattr(model, name)

        def wrapper(*args):
            out = original(*args)
            sink(args, out)
            return out

        setattr(model, name, wrapper)


@pytest.mark.parametrize("backbone", ["pvt_v2_b0", "resnet18"])
def test_non_keyframe_ce_uses_neighbour_deep_and_labelled_shallow_features(backbone: str) -> None:
    torch.manual_seed(0)
    model = DCFM(DCFMConfig(backbone, num_classes=C))
    recorder = FuseRecorder(model)
    gen = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen),
                      torch.randint(0, C, (2, H, W), generator=gen))
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.0))  # lr 0: the step changes nothing
    terms = train_step(model, optimizer, batch, LossWeights(reuse=0.4, consistency=10.0))

    (independent,), (common,) = recorder.independent_out, recorder.common_out
    ind_l, ind_u, com_l, com_u = independent[:2], independent[2:], common[:2], common[2:]
    assert not torch.equal(com_l, com_u) and not torch.equal(ind_l, ind_u)

    def fused(com: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
        matches = [out for c, i, out in recorder.fuse_calls if torch.equal(c, com) and torch.equal(i, ind)]
        assert len(matches) == 1, "expected exactly one fusion of these features"
        return matches[0]

    reuse = fused(com_u, ind_l)  # eq. (9): the neighbour's common feature with the labelled frame's f_ind
    key = fused(com_l, ind_l)
    fused(com_u, ind_u)  # F_U, for the consistency loss
    assert len(recorder.fuse_calls) == 3  # and nothing else: no fusion of (com_l, ind_u)

    (decoded_in, logits), = recorder.decode_calls
    rows = {name: next(j for j in range(0, decoded_in.shape[0], 2) if torch.equal(decoded_in[j : j + 2], f))
            for name, f in (("key", key), ("reuse", reuse))}
    reuse_logits = logits[rows["reuse"] : rows["reuse"] + 2]
    key_logits = logits[rows["key"] : rows["key"] + 2]
    # The losses the step optimised are CE against the *labelled* frame's label on those logits.
    torch.testing.assert_close(terms.reuse_ce, segmentation_ce(reuse_logits, batch.labels).detach())
    torch.testing.assert_close(terms.key_ce, segmentation_ce(key_logits, batch.labels).detach())
    expected = terms.key_ce + 0.4 * terms.reuse_ce + 10.0 * terms.consistency
    torch.testing.assert_close(terms.total.detach(), expected)
