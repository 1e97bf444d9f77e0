"""Reduced-resolution non-keyframes (AR-Seg with DCFM): s = 1 is the original DCFM, s < 1 runs non-keyframes at
the reduced size through the cross-resolution fusion, trains with the FST-style loss and round-trips."""

from __future__ import annotations

import pytest
import torch

from dcfm.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from dcfm.inference import ClipSegmenter, InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.losses import LossWeights, dcfm_loss
from dcfm.model import DCFM, DCFMConfig, LowresCorrection, LowresShallow, upsample_logits

H, W, N = 64, 96, 9


def make(backbone: str, scale: float, correction: LowresCorrection = LowresCorrection.CONV,
         shallow: LowresShallow = LowresShallow.OWN) -> DCFM:
    torch.manual_seed(0)
    net = DCFM(DCFMConfig(backbone=backbone, num_classes=5, nonkey_scale=scale, lowres_correction=correction,
                          lowres_shallow=shallow))
    for m in net.modules():  # random BN statistics (and a non-zero correction) so nothing is an identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(0, 256, (H, W, 3), generator=gen)
    return torch.stack([torch.roll(base, 3 * i, dims=1) for i in range(N)]).to(torch.uint8)


def normalise(frames: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std).view(1, 3, 1, 1) * 255
    return (frames.permute(0, 3, 1, 2).float() - mean) / std


def test_scale_one_is_the_original_dcfm(frames) -> None:
    torch.manual_seed(0)
    default = DCFM(DCFMConfig(backbone="resnet18", num_classes=5)).eval()
    assert default.cross_resolution is None and not any("cross_resolution" in k for k in default.state_dict())
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode=ReuseMode.BIDIRECTIONAL, return_logits=True)
    explicit = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode=ReuseMode.BIDIRECTIONAL, return_logits=True,
                               nonkey_scale=1.0)
    a = list(ClipSegmenter(default, config).segment(frames))
    b = list(ClipSegmenter(default, explicit).segment(frames))
    for x, y in zip(a, b):
        assert torch.equal(x.logits, y.logits) and x.keyframes == y.keyframes
    # Training: the pair has no reduced-resolution part, and the loss is the three-term joint loss.
    default.train()
    images = normalise(frames[:2], config)
    out = default(images[:1], images[1:])
    assert out.lowres_fused == () and dcfm_loss(out, torch.zeros(1, H, W, dtype=torch.long)).similarity is None


@pytest.mark.parametrize("backbone", ["resnet18", "pvt_v2_b0"])
def test_half_scale_non_keyframes_run_small_and_equal_the_reuse_path(backbone, frames) -> None:
    model = make(backbone, 0.5)
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode=ReuseMode.CAUSAL, return_logits=True,
                             batch_size=4)
    segmenter = ClipSegmenter(model, config)
    calls = []
    original = model.common
    model.common = lambda ind: (calls.append(ind.shape), original(ind))[1]
    try:
        results = list(segmenter.segment(frames))
    finally:
        del model.common
    keys = [r.index for r in results if r.is_keyframe]
    assert keys == [0, 3, 6]
    # Deep layers: once per keyframe, always on full-resolution shallow features.
    assert sum(shape[0] for shape in calls) == len(keys) == segmenter.last_clip.deep_frames
    assert all(shape[-2:] == (H // 4, W // 4) for shape in calls)
    images = normalise(frames, config)
    with torch.inference_mode():
        assert model.independent_lowres(images[:1]).shape[-2:] == (H // 8, W // 8)
        for r in results:
            key = max(k for k in keys if k <= r.index)
            common = model.forward_keyframe(images[key : key + 1]).common
            if r.is_keyframe:
                expected = model.forward_keyframe(images[r.index : r.index + 1]).logits
            else:
                expected = model.forward_reuse(images[r.index : r.index + 1], common)
            torch.testing.assert_close(r.logits, upsample_logits(expected, (H, W))[0], rtol=1e-4, atol=1e-4)


def test_a_scale_the_model_was_not_trained_for_is_refused() -> None:
    with pytest.raises(ValueError, match="trained for 0.5"):
        ClipSegmenter(make("resnet18", 0.5), InferenceConfig(nonkey_scale=1.0))
    with pytest.raises(ValueError, match="trained for 1"):
        ClipSegmenter(make("resnet18", 1.0), InferenceConfig(nonkey_scale=0.5))
    with pytest.raises(ValueError, match="nonkey_scale"):
        DCFMConfig(nonkey_scale=1.5)


def test_half_scale_training_loss_reaches_the_cross_resolution_fusion() -> None:
    model = make("resnet18", 0.5).train()
    gen = torch.Generator().manual_seed(0)
    labeled, neighbour = torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen)
    labels = torch.randint(0, 5, (2, H, W), generator=gen)
    out = model(labeled, neighbour)
    assert len(out.lowres_fused) == 2 and out.reuse_logits.shape[-2:] == (H // 8, W // 8)
    terms = dcfm_loss(out, labels, LossWeights(0.4, 10.0, similarity=10.0))
    without = dcfm_loss(out, labels, LossWeights(0.4, 10.0, similarity=0.0))
    assert terms.similarity is not None and terms.similarity > 0
    torch.testing.assert_close(terms.total, without.total + 10.0 * terms.similarity)
    terms.total.backward()
    assert model.cross_resolution.conv[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["resnet18", "pvt_v2_b0"])
def test_the_half_size_pass_trains_its_own_copy_of_the_shallow_layers(backbone) -> None:
    from dcfm.train.recipe import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = DCFM(DCFMConfig(backbone=backbone, num_classes=5, nonkey_scale=0.5)).train()
    assert model.config.lowres_shallow is LowresShallow.OWN
    copy_ids = {id(p) for p in model.shallow_lowres.parameters()}
    assert copy_ids and not copy_ids & {id(p) for p in model.backbone.parameters()}
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # a copy: the same function until training moves them apart
        small = torch.nn.functional.interpolate(images, scale_factor=0.5)
        assert torch.equal(model.eval().shallow_lowres(small), model.backbone.shallow(small))
    model.train()
    gen = torch.Generator().manual_seed(0)
    out = model(torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen))
    dcfm_loss(out, torch.randint(0, 5, (2, H, W), generator=gen), LossWeights(similarity=10.0)).total.backward()
    first = next(model.shallow_lowres.parameters())  # the patch embedding / stem conv: the loss reaches it
    assert first.grad is not None and first.grad.abs().sum() > 0
    # It trains at the backbone's learning rate, not the decoder's (10x in the AdamW recipe).
    encoder, decoder = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, decoder_lr_mult=10)).param_groups
    assert copy_ids <= {id(p) for p in encoder["params"]} and not copy_ids & {id(p) for p in decoder["params"]}
    assert encoder["lr"] == 1e-3 and decoder["lr"] == 1e-2
    # The first version's shared layers, and s = 1, build no copy (their state dicts are unchanged).
    shared = DCFM(DCFMConfig(backbone=backbone, num_classes=5, nonkey_scale=0.5, lowres_shallow="shared"))
    full = DCFM(DCFMConfig(backbone=backbone, num_classes=5))
    assert shared.shallow_lowres is None and full.shallow_lowres is None
    assert not any(k.startswith("shallow_lowres.") for k in {**shared.state_dict(), **full.state_dict()})
    with pytest.raises(ValueError, match="lowres_shallow must be one of"):
        DCFMConfig(nonkey_scale=0.5, lowres_shallow="mine")


def test_half_scale_checkpoint_round_trips(tmp_path, frames) -> None:
    from dcfm.train.recipe import OptimConfig, PairBatch, build_optimizer, train_step

    model = make("pvt_v2_b0", 0.5)
    gen = torch.Generator().manual_seed(1)
    batch = PairBatch(torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen),
                      torch.randint(0, 5, (2, H, W), generator=gen))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3))
    for _ in range(2):  # trained, so the cross-resolution correction and its BN statistics are not at their init
        train_step(model, optimizer, batch, LossWeights())
    model.eval()
    correction = model.cross_resolution
    assert correction.conv[0].weight.abs().sum() > 0 and correction.norm.weight.abs().sum() > 0
    card = ModelCard(model.config, [f"c{i}" for i in range(5)], [(i, i, i) for i in range(5)], train_size=(H, W))
    save_checkpoint(tmp_path / "ckpt", model, card)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.card.config.nonkey_scale == 0.5 and loaded.card.nonkey_scale == 0.5
    config = InferenceConfig(keyframes=KeyframePolicy(interval=4), return_logits=True)
    for a, b in zip(ClipSegmenter(model, config).segment(frames), ClipSegmenter(loaded.model, config).segment(frames)):
        assert torch.equal(a.logits, b.logits)


def test_the_correction_reads_every_channel_of_the_low_resolution_shallow_feature() -> None:
    # The FFM uses only the first half of f_ind; the conv correction also reads the second half (computed on every
    # frame anyway), the first version (depthwise) did not.
    images = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    for kind, reads_unused_half in ((LowresCorrection.CONV, True), (LowresCorrection.DEPTHWISE, False)):
        model = make("resnet18", 0.5, kind)
        with torch.no_grad():
            independent = model.independent(torch.nn.functional.interpolate(images, scale_factor=0.5))
            used = model.fusion.independent_used
            changed = independent.clone()
            changed[:, used:] += 1.0
            a, b = model.cross_resolution.correct(independent), model.cross_resolution.correct(changed)
        assert a.shape[1] == used
        assert (not torch.equal(a, b)) is reads_unused_half


def test_first_version_half_scale_checkpoints_still_load(tmp_path, frames) -> None:
    # Cards written before the correction was selectable have no lowres_correction: they were depthwise models.
    import json

    # ... and no lowres_shallow either: their half-size pass shared the keyframe's shallow layers.
    model = make("resnet18", 0.5, LowresCorrection.DEPTHWISE, LowresShallow.SHARED)
    card = ModelCard(model.config, [f"c{i}" for i in range(5)], [(i, i, i) for i in range(5)], train_size=(H, W))
    save_checkpoint(tmp_path / "old", model, card)
    card_path = tmp_path / "old" / "dcfm.json"
    data = json.loads(card_path.read_text())
    assert data["config"].pop("lowres_correction") == "depthwise"
    assert data["config"].pop("lowres_shallow") == "shared"
    card_path.write_text(json.dumps(data))
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.card.config.lowres_correction is LowresCorrection.DEPTHWISE
    assert loaded.card.config.lowres_shallow is LowresShallow.SHARED
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), return_logits=True)
    for a, b in zip(ClipSegmenter(model, config).segment(frames), ClipSegmenter(loaded.model, config).segment(frames)):
        assert torch.equal(a.logits, b.logits)
    # A card that names another correction than its weights hold is refused with the architecture in the message.
    data["config"]["lowres_correction"] = "conv"
    card_path.write_text(json.dumps(data))
    from dcfm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_checkpoint(tmp_path / "old")
    with pytest.raises(ValueError, match="lowres_correction must be one of"):
        DCFMConfig(nonkey_scale=0.5, lowres_correction="bicubic")
