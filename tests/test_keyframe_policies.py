"""Codec-aware keyframes (the stream's own seek points, within interval bounds; chunks aligned to them), phased
fixed schedules (evaluation), and the synth world's scene cuts that give a stream its seek points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcfm.decode import probe_video
from dcfm.inference import ClipSegmenter, InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.model import DCFM, DCFMConfig
from dcfm.segment.plan import plan_tasks, seek_point_bounds
from dcfm.synth import SynthConfig, cut_frames, generate_corpus
from dcfm.decode import iter_frames

H, W, FRAMES = 32, 64, 40


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory) -> tuple[Path, tuple[int, ...]]:
    root = tmp_path_factory.mktemp("cuts")
    config = SynthConfig(videos=1, frames=FRAMES, height=H, width=W, seed=5, motion=2.0, cuts=4)
    generate_corpus(root, config)
    return root / "videos" / "synth_0000.mp4", cut_frames(config, 0)


@pytest.fixture(scope="module")
def model() -> DCFM:
    torch.manual_seed(0)
    return DCFM(DCFMConfig("resnet18", num_classes=4)).eval()


def expected_codec_keyframes(seek: tuple[int, ...], n: int, low: int, high: int) -> list[int]:
    keys = [0]
    for i in range(1, n):
        gap = i - keys[-1]
        if gap >= high or (gap >= low and i in seek):
            keys.append(i)
    return keys


def test_synth_cuts_are_the_streams_seek_points(cut_video) -> None:
    path, cuts = cut_video
    assert len(cuts) == 4 and all(0 < c < FRAMES for c in cuts)
    assert probe_video(str(path)).keyframes == (0, *cuts)
    manifest = json.loads((path.parent.parent / "manifest.json").read_text())
    assert manifest["cuts"] == {"synth_0000": list(cuts)}
    frames = list(iter_frames(path))
    jumps = [np.abs(frames[t].astype(int) - frames[t - 1]).mean() for t in range(1, FRAMES)]
    # A cut changes the picture far more than any motion between two frames of one scene.
    assert min(jumps[c - 1] for c in cuts) > max(j for t, j in enumerate(jumps, 1) if t not in cuts)
    with pytest.raises(ValueError, match="cuts"):
        SynthConfig(videos=1, frames=4, height=H, width=W, cuts=4)


@pytest.mark.parametrize("low,high", [(1, 1000), (1, 6), (8, 12)])
def test_codec_keyframes_are_the_seek_points_within_the_interval_bounds(cut_video, model, low, high) -> None:
    path, _ = cut_video
    seek = probe_video(str(path)).keyframes
    policy = KeyframePolicy(codec=True, min_interval=low, max_interval=high)
    results = list(ClipSegmenter(model, InferenceConfig(keyframes=policy, mode=ReuseMode.CAUSAL, batch_size=6))
                   .segment(iter_frames(path), codec_keyframes=seek))
    keys = [r.index for r in results if r.is_keyframe]
    assert keys == expected_codec_keyframes(seek, FRAMES, low, high)
    if high >= FRAMES:
        assert tuple(keys) == seek  # unbounded: exactly the stream's seek points
    assert all(b - a <= high for a, b in zip(keys, keys[1:]))
    with pytest.raises(ValueError, match="seek points"):
        list(ClipSegmenter(model, InferenceConfig(keyframes=policy)).segment(iter_frames(path)))


def test_codec_chunks_start_on_seek_points_and_equal_the_whole_video(cut_video, model) -> None:
    path, _ = cut_video
    probe = probe_video(str(path))
    assert seek_point_bounds(40, 10, (0, 7, 15, 22, 33)) == [(0, 15), (15, 33), (33, 40)]
    tasks = plan_tasks("v", str(path), probe, chunk_frames=8, lead_in=0, align_to_seek_points=True)
    assert [(t.start, t.stop) for t in tasks] == seek_point_bounds(FRAMES, 8, probe.keyframes)
    assert len(tasks) > 2 and all(t.start in probe.keyframes for t in tasks) and tasks[-1].stop == FRAMES
    assert all(t.stop - t.start >= 8 for t in tasks[:-1])
    config = InferenceConfig(keyframes=KeyframePolicy(codec=True, min_interval=2, max_interval=6), return_logits=True)
    whole = {r.index: r for r in ClipSegmenter(model, config).segment(iter_frames(path),
                                                                      codec_keyframes=probe.keyframes)}
    frames = list(iter_frames(path))
    for t in tasks:
        chunk = frames[t.start : t.decode_stop]
        lookahead = t.stop - t.start if t.decode_stop > t.stop else None
        for r in ClipSegmenter(model, config).segment(chunk, start_index=t.start, lookahead_from=lookahead,
                                                      codec_keyframes=t.keyframes):
            assert r.keyframes == whole[r.index].keyframes
            torch.testing.assert_close(r.logits, whole[r.index].logits, rtol=1e-4, atol=1e-5)  # batches differ


@pytest.mark.parametrize("mode", [ReuseMode.CAUSAL, ReuseMode.BIDIRECTIONAL])
def test_a_phased_schedule_uses_the_next_keyframe_before_the_first(model, mode) -> None:
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (11, H, W, 3), generator=gen, dtype=torch.uint8)
    config = InferenceConfig(keyframes=KeyframePolicy(interval=4, phase=2), mode=mode, batch_size=3)
    results = list(ClipSegmenter(model, config).segment(frames))
    assert [r.index for r in results] == list(range(11))
    assert [r.index for r in results if r.is_keyframe] == [2, 6, 10]
    assert results[0].keyframes == results[1].keyframes == (2,)
    assert results[3].keyframes == ((2,) if mode is ReuseMode.CAUSAL else (2, 6))
    with pytest.raises(ValueError, match="phase"):
        KeyframePolicy(interval=4, phase=4)
    with pytest.raises(ValueError, match="first keyframe"):
        list(ClipSegmenter(model, config).segment(frames[:2]))
