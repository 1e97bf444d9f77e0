"""Reduced-resolution non-keyframes (AR-Seg with DCFM): s = 1 is the original DCFM, s < 1 runs non-keyframes at
the reduced size through the cross-resolution fusion (optionally flow-aligned), trains with the FST-style loss and
round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from dcfm.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from dcfm.inference import ClipSegmenter, InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.losses import LossWeights, dcfm_loss
from dcfm.model import (
    DCFM,
    CrossResolutionFusion,
    DCFMConfig,
    LowresAlignment,
    LowresCorrection,
    l2_normalize,
    soft_argmax_displacement,
    upsample_logits,
    warp_by_displacement,
)

H, W, N = 64, 96, 9


def make(backbone: str, scale: float, correction: LowresCorrection = LowresCorrection.CONV,
         alignment: LowresAlignment = LowresAlignment.RESAMPLE) -> DCFM:
    torch.manual_seed(0)
    net = DCFM(DCFMConfig(backbone=backbone, num_classes=5, nonkey_scale=scale, lowres_correction=correction,
                          lowres_alignment=alignment))
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


@pytest.mark.parametrize("alignment", list(LowresAlignment))
@pytest.mark.parametrize("backbone", ["resnet18", "pvt_v2_b0"])
def test_half_scale_non_keyframes_run_small_and_equal_the_reuse_path(backbone, alignment, frames) -> None:
    model = make(backbone, 0.5, alignment=alignment)
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
            keyframe = model.forward_keyframe(images[key : key + 1])
            if r.is_keyframe:
                expected = model.forward_keyframe(images[r.index : r.index + 1]).logits
            else:
                expected = model.forward_reuse(images[r.index : r.index + 1], keyframe.common, keyframe.independent)
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

    model = make("resnet18", 0.5, LowresCorrection.DEPTHWISE)
    card = ModelCard(model.config, [f"c{i}" for i in range(5)], [(i, i, i) for i in range(5)], train_size=(H, W))
    save_checkpoint(tmp_path / "old", model, card)
    card_path = tmp_path / "old" / "dcfm.json"
    data = json.loads(card_path.read_text())
    assert data["config"].pop("lowres_correction") == "depthwise"
    card_path.write_text(json.dumps(data))
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.card.config.lowres_correction is LowresCorrection.DEPTHWISE
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


# --- flow alignment (LowresAlignment.FLOW) ---------------------------------------------------------------------------


def test_soft_argmax_finds_a_known_shift_along_each_axis() -> None:
    gen = torch.Generator().manual_seed(0)
    query = l2_normalize(torch.randn(2, 32, 7, 9, generator=gen))
    # key[x] = query[x - 1]: the content at p sits one cell to the right in the key, so d = (0, +1).
    d = soft_argmax_displacement(query, torch.roll(query, 1, dims=-1), radius=3, temperature=1000.0)
    assert d.shape == (2, 2, 7, 9)
    torch.testing.assert_close(d[:, 0, :, :-1], torch.zeros(2, 7, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(d[:, 1, :, :-1], torch.ones(2, 7, 8), atol=1e-4, rtol=0)
    # key[y] = query[y + 2]: the content sits two rows up, d = (-2, 0); the first two rows have no match in frame.
    d = soft_argmax_displacement(query, torch.roll(query, -2, dims=-2), radius=3, temperature=1000.0)
    torch.testing.assert_close(d[:, 0, 2:], torch.full((2, 5, 9), -2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(d[:, 1, 2:], torch.zeros(2, 5, 9), atol=1e-4, rtol=0)


def test_soft_argmax_never_picks_an_offset_outside_the_frame() -> None:
    # Every in-frame key is dissimilar (cosine -1): zero padding would score 0 and win at the border without a mask.
    query = l2_normalize(torch.ones(1, 4, 8, 8))
    d = soft_argmax_displacement(query, -query, radius=3, temperature=1000.0)
    # All in-frame offsets tie, so the result is the mean of the offsets that stay inside the frame.
    torch.testing.assert_close(d[0, :, 0, 0], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(d[0, :, 7, 7], torch.tensor([-1.5, -1.5]))
    torch.testing.assert_close(d[0, :, 3:5, 3:5], torch.zeros(2, 2, 2), atol=1e-5, rtol=0)


def test_warp_samples_the_term_at_p_plus_the_displacement() -> None:
    term = torch.randn(1, 5, 6, 10, generator=torch.Generator().manual_seed(1))
    right = torch.zeros(1, 2, 6, 10)
    right[:, 1] = 1.0
    warped = warp_by_displacement(term, right)
    torch.testing.assert_close(warped[..., :-1], term[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(warped[..., -1], term[..., -1], atol=1e-5, rtol=0)  # border: clamped, not zero
    up = torch.zeros(1, 2, 6, 10)
    up[:, 0] = -2.0
    torch.testing.assert_close(warp_by_displacement(term, up)[..., 2:, :], term[..., :-2, :], atol=1e-5, rtol=0)
    half = right * 0.5  # bilinear: halfway between a cell and its right neighbour
    torch.testing.assert_close(warp_by_displacement(term, half)[..., :-1], (term[..., :-1] + term[..., 1:]) / 2,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(warp_by_displacement(term, torch.zeros(1, 2, 6, 10)), term, atol=1e-5, rtol=0)


def test_the_bridge_warps_the_term_onto_the_moved_content() -> None:
    # An identity motion embedding and a very sharp softmax: the bridge must find and undo a one-cell shift.
    bridge = CrossResolutionFusion(64, 32, alignment=LowresAlignment.FLOW)
    with torch.no_grad():
        bridge.motion_embed.weight.copy_(torch.eye(32).view(32, 32, 1, 1))
        bridge.log_temperature.fill_(math.log(1000.0))
    gen = torch.Generator().manual_seed(2)
    lowres = torch.randn(1, 32, 6, 9, generator=gen)  # the non-keyframe's corrected used half
    full = torch.cat([torch.roll(lowres, 1, dims=-1), torch.randn(1, 32, 6, 9, generator=gen)], dim=1)
    term = torch.randn(1, 16, 6, 9, generator=gen)
    with torch.no_grad():
        keys = bridge.keyframe_keys(full, (6, 9))
        warped = bridge.warp(term, keys, lowres)
    torch.testing.assert_close(warped[..., :-1], term[..., 1:], atol=1e-4, rtol=0)


def test_flow_checkpoint_round_trips_and_older_cards_resample(tmp_path, frames) -> None:
    import json

    from dcfm.checkpoint import CheckpointError

    model = make("resnet18", 0.5, alignment=LowresAlignment.FLOW)
    with torch.no_grad():
        model.cross_resolution.log_temperature.fill_(1.7)  # not the initial value, so loading it is checked
    card = ModelCard(model.config, [f"c{i}" for i in range(5)], [(i, i, i) for i in range(5)], train_size=(H, W))
    save_checkpoint(tmp_path / "flow", model, card)
    assert json.loads((tmp_path / "flow" / "dcfm.json").read_text())["config"]["lowres_alignment"] == "flow"
    loaded = load_checkpoint(tmp_path / "flow")
    assert loaded.card.config.lowres_alignment is LowresAlignment.FLOW and loaded.model.aligns_by_flow
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), return_logits=True, batch_size=4)
    for a, b in zip(ClipSegmenter(model, config).segment(frames), ClipSegmenter(loaded.model, config).segment(frames)):
        assert torch.equal(a.logits, b.logits)

    # A card written before the field existed is a resampling model, and loads as one.
    old = make("resnet18", 0.5)
    save_checkpoint(tmp_path / "old", old, ModelCard(old.config, card.class_names, card.palette, train_size=(H, W)))
    card_path = tmp_path / "old" / "dcfm.json"
    data = json.loads(card_path.read_text())
    assert data["config"].pop("lowres_alignment") == "resample"
    card_path.write_text(json.dumps(data))
    assert load_checkpoint(tmp_path / "old").card.config.lowres_alignment is LowresAlignment.RESAMPLE
    # A card that names another alignment than its weights hold is refused, naming the alignment.
    data["config"]["lowres_alignment"] = "flow"
    card_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lowres_alignment 'flow'"):
        load_checkpoint(tmp_path / "old")


@pytest.mark.parametrize("backbone", ["resnet18", "pvt_v2_b0"])
def test_flow_bidirectional_segmentation_sums_the_warped_reuse_of_both_keyframes(backbone, frames) -> None:
    model = make(backbone, 0.5, alignment=LowresAlignment.FLOW)
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode=ReuseMode.BIDIRECTIONAL, return_logits=True,
                             batch_size=4)
    segmenter = ClipSegmenter(model, config)
    results = list(segmenter.segment(frames))
    assert [r.index for r in results] == list(range(N))
    assert all(r.labels.shape == (H, W) for r in results)
    keys = [r.index for r in results if r.is_keyframe]
    assert segmenter.last_clip.deep_frames == len(keys) == 3  # deep layers once per keyframe
    images = normalise(frames, config)
    with torch.inference_mode():
        outputs = {k: model.forward_keyframe(images[k : k + 1]) for k in keys}
        for r in results:
            if r.is_keyframe:
                continue
            expected = sum(model.forward_reuse(images[r.index : r.index + 1], outputs[k].common, outputs[k].independent)
                           for k in r.keyframes)
            torch.testing.assert_close(r.logits, upsample_logits(expected, (H, W))[0], rtol=1e-4, atol=1e-4)


def test_flow_training_reaches_the_motion_embedding() -> None:
    model = make("resnet18", 0.5, alignment=LowresAlignment.FLOW).train()
    gen = torch.Generator().manual_seed(0)
    labeled, neighbour = torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen)
    out = model(labeled, neighbour)
    terms = dcfm_loss(out, torch.randint(0, 5, (2, H, W), generator=gen), LossWeights(0.4, 10.0, similarity=10.0))
    terms.total.backward()
    bridge = model.cross_resolution
    assert bridge.motion_embed.weight.grad.abs().sum() > 0 and bridge.log_temperature.grad != 0
    with pytest.raises(ValueError, match="key_independent"):
        model.fuse_lowres(torch.randn(1, model.common_channels, H // 8, W // 8), torch.randn(1, 32, H // 8, W // 8))


def test_alignment_settings_are_checked(tmp_path) -> None:
    from dcfm.cli import build_parser
    from dcfm.errors import ConfigError
    from dcfm.train.cli import config_from_args
    from dcfm.train.config import RunMismatchError, TrainJobConfig
    from dcfm.train.job import _check_same_run

    with pytest.raises(ValueError, match=r"lowres_alignment must be one of \['resample', 'flow'\]"):
        DCFMConfig(nonkey_scale=0.5, lowres_alignment="optical")
    # Full resolution has no bridge: nothing is built, whatever the field says, and the state dict is unchanged.
    assert DCFM(DCFMConfig(num_classes=5, lowres_alignment="flow")).cross_resolution is None
    assert not any("motion_embed" in k for k in make("resnet18", 0.5).state_dict())
    with pytest.raises(ConfigError, match="nonkey-scale below 1"):
        TrainJobConfig(data="d", output=str(tmp_path / "r"), lowres_alignment="flow")
    with pytest.raises(ConfigError, match="lowres_alignment must be one of"):
        TrainJobConfig(data="d", output=str(tmp_path / "r"), nonkey_scale=0.5, lowres_alignment="optical")
    flow = config_from_args(build_parser().parse_args(["train", "--data", "d", "--output", str(tmp_path / "r"),
                                                       "--nonkey-scale", "0.5", "--lowres-alignment", "flow"]))
    assert flow.lowres_alignment == "flow" and TrainJobConfig.from_json(flow.to_json()) == flow
    # A run recorded before the field resumes as a resampling run; asking it for flow is another training.
    resample = TrainJobConfig(data="d", output=str(tmp_path / "r"), nonkey_scale=0.5)
    old_settings = resample.run_settings()
    del old_settings["lowres_alignment"]
    record = {"format": "dcfm-train-run/1", "status": "running", "settings": old_settings}
    _check_same_run(resample, record)
    with pytest.raises(RunMismatchError, match=r"lowres_alignment: 'resample' -> 'flow'"):
        _check_same_run(flow, record)
