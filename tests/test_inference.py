"""Keyframe-reuse clip inference: exactness against the per-frame paths, scheduling, memory bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcfm.inference import ClipSegmenter, InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.model import DCFM, DCFMConfig, upsample_logits

H, W, N = 48, 64, 11


@pytest.fixture(scope="module", params=["resnet18", "pvt_v2_b0"])
def model(request) -> DCFM:
    torch.manual_seed(0)
    net = DCFM(DCFMConfig(backbone=request.param, num_classes=6))
    # Random BN statistics so eval-mode BN is not the identity and the test exercises it.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (H, W, 3), generator=gen)
    # A drifting scene rather than independent noise, so reuse is meaningful.
    shifts = [torch.roll(base, shifts=2 * i, dims=1) for i in range(N)]
    return torch.stack(shifts).to(torch.uint8)


def normalise(frames: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std).view(1, 3, 1, 1) * 255
    return (frames.permute(0, 3, 1, 2).float() - mean) / std


def run(model, frames, **kwargs):
    config = InferenceConfig(return_logits=True, **kwargs)
    segmenter = ClipSegmenter(model, config)
    results = list(segmenter.segment(frames))
    return results, segmenter, config


def keyframe_logits(model, frames, config, index) -> torch.Tensor:
    with torch.inference_mode():
        out = model.forward_keyframe(normalise(frames[index : index + 1], config))
    return upsample_logits(out.logits, (H, W))[0]


def reuse_logits(model, frames, config, index, key) -> torch.Tensor:
    with torch.inference_mode():
        common = model.forward_keyframe(normalise(frames[key : key + 1], config)).common
        logits = model.forward_reuse(normalise(frames[index : index + 1], config), common)
    return upsample_logits(logits, (H, W))[0]


@pytest.mark.parametrize("mode", list(ReuseMode))
def test_k1_is_bit_identical_to_the_keyframe_path(model, frames, mode) -> None:
    results, _, config = run(model, frames, keyframes=KeyframePolicy(interval=1), mode=mode, batch_size=1)
    assert [r.index for r in results] == list(range(N))
    for r in results:
        expected = keyframe_logits(model, frames, config, r.index)
        assert r.is_keyframe and r.keyframes == (r.index,)
        assert torch.equal(r.logits, expected), f"frame {r.index} differs from the keyframe path"
        assert np.array_equal(r.labels, expected.argmax(0).numpy())


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("k", [2, 3])
def test_causal_reuse_equals_per_frame_paths(model, frames, k, batch_size) -> None:
    results, segmenter, config = run(
        model, frames, keyframes=KeyframePolicy(interval=k), mode="causal", batch_size=batch_size
    )
    keys = [i for i in range(N) if i % k == 0]
    assert [r.index for r in results if r.is_keyframe] == keys
    for r in results:
        key = (r.index // k) * k
        assert r.keyframes == (key,)
        expected = keyframe_logits(model, frames, config, r.index) if r.is_keyframe else reuse_logits(
            model, frames, config, r.index, key
        )
        torch.testing.assert_close(r.logits, expected, rtol=1e-4, atol=1e-4)
    assert segmenter.last_clip.deep_frames == len(keys)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bidirectional_logits_are_the_sum_of_both_keyframes(model, frames, batch_size) -> None:
    k = 3
    results, _, config = run(model, frames, keyframes=KeyframePolicy(interval=k), batch_size=batch_size)
    last_key = ((N - 1) // k) * k
    for r in results:
        if r.is_keyframe:
            assert r.agreement is None
            continue
        prev = (r.index // k) * k
        if r.index > last_key:  # the clip's tail: only the previous keyframe exists
            assert r.keyframes == (prev,) and r.agreement is None
            torch.testing.assert_close(r.logits, reuse_logits(model, frames, config, r.index, prev), rtol=1e-4, atol=1e-4)
            continue
        assert r.keyframes == (prev, prev + k)
        from_prev = reuse_logits(model, frames, config, r.index, prev)
        from_next = reuse_logits(model, frames, config, r.index, prev + k)
        torch.testing.assert_close(r.logits, from_prev + from_next, rtol=1e-4, atol=1e-4)
        expected_agreement = (from_prev.argmax(0) == from_next.argmax(0)).float().mean().item()
        assert r.agreement == pytest.approx(expected_agreement, abs=1e-3)


def test_deep_layers_run_once_per_keyframe(model, frames) -> None:
    seen: list[int] = []
    original = model.common

    def counting_common(independent):
        seen.append(independent.shape[0])
        return original(independent)

    model.common = counting_common  # type: ignore[method-assign]
    try:
        results, _, _ = run(model, frames, keyframes=KeyframePolicy(interval=4), batch_size=5)
    finally:
        del model.common
    keys = [r.index for r in results if r.is_keyframe]
    assert keys == [0, 4, 8]
    assert sum(seen) == len(keys)
    # Keyframes of one block share one batched deep pass: frames 0-4 hold keyframes 0 and 4, frames 5-9 hold 8.
    assert seen == [2, 1]


def test_keyframe_results_are_independent_of_k(model, frames) -> None:
    per_frame, _, _ = run(model, frames, keyframes=KeyframePolicy(interval=1), batch_size=4)
    reused, _, _ = run(model, frames, keyframes=KeyframePolicy(interval=5), batch_size=4)
    for a, b in zip(per_frame, reused):
        if b.is_keyframe:
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_confidence_is_mean_max_softmax(model, frames) -> None:
    results, _, _ = run(model, frames, keyframes=KeyframePolicy(interval=2), batch_size=4)
    for r in results:
        assert r.confidence == pytest.approx(r.logits.softmax(0).max(0).values.mean().item(), rel=1e-5)
        assert 1 / 6 <= r.confidence <= 1


@pytest.mark.parametrize("mode", list(ReuseMode))
@pytest.mark.parametrize("start", [0, 4])
def test_chunks_aligned_to_k_with_lookahead_equal_the_whole_clip(model, frames, mode, start) -> None:
    k = 2
    config = InferenceConfig(keyframes=KeyframePolicy(interval=k), mode=mode, batch_size=3, return_logits=True)
    whole = {r.index: r for r in ClipSegmenter(model, config).segment(frames)}
    end = start + 4
    chunk = list(ClipSegmenter(model, config).segment(frames[start : end + 1], start_index=start, lookahead_from=4))
    assert [r.index for r in chunk] == list(range(start, end))
    for r in chunk:
        assert r.keyframes == whole[r.index].keyframes
        torch.testing.assert_close(r.logits, whole[r.index].logits, rtol=1e-4, atol=1e-4)


def test_iterator_input_and_memory_bound(model, frames) -> None:
    """A lazy iterator is consumed block by block: never more than a block (+ look-ahead) ahead."""
    consumed = []

    def lazy():
        for i in range(N):
            consumed.append(i)
            yield frames[i].numpy()

    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode="bidirectional", batch_size=2)
    segmenter = ClipSegmenter(model, config)
    for r in segmenter.segment(lazy()):
        # Only the bidirectional look-ahead (< k frames) plus one block may be in flight.
        assert len(consumed) - 1 - r.index <= 3 + 2
        assert len(segmenter.last_clip.pending) <= 3
    assert len(consumed) == N


def test_adaptive_rgb_schedule_reacts_to_scene_change(model, frames) -> None:
    static = torch.stack([frames[0]] * 6 + [255 - frames[0]] * 6)
    policy = KeyframePolicy(adaptive=True, min_interval=1, max_interval=4, threshold=0.5, score="rgb")
    results, segmenter, _ = run(model, static, keyframes=policy, mode="causal", batch_size=4)
    keys = [r.index for r in results if r.is_keyframe]
    # Static scene: keyframes only every max_interval frames; the cut at frame 6 forces a keyframe.
    assert keys == [0, 4, 6, 10]
    assert segmenter.last_clip.deep_frames == 4


def test_adaptive_min_interval_and_feature_score(model, frames) -> None:
    flicker = torch.stack([frames[0], 255 - frames[0]] * 5)
    policy = KeyframePolicy(adaptive=True, min_interval=3, max_interval=6, threshold=0.01, score="feature")
    results, _, _ = run(model, flicker, keyframes=policy, mode="causal", batch_size=4)
    keys = [r.index for r in results if r.is_keyframe]
    assert keys == [0, 3, 6, 9]  # every frame differs, but min_interval holds keyframes 3 apart


def test_labels_at_requested_output_size(model, frames) -> None:
    config = InferenceConfig(keyframes=KeyframePolicy(interval=2), output_size=(30, 40))
    results = list(ClipSegmenter(model, config).segment(frames[:3]))
    assert all(r.labels.shape == (30, 40) and r.labels.dtype == np.uint8 for r in results)


def test_bad_frames_are_rejected_clearly(model) -> None:
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        list(ClipSegmenter(model).segment(torch.zeros(2, 3, 8, 8)))
