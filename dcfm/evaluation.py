"""Evaluate clip inference on labelled videos: mIoU / fwIoU over labelled frames, VC_n where every frame
is labelled, label-free consistency figures, and throughput."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dcfm.inference import ClipSegmenter, InferenceConfig
from dcfm.metrics import ConfusionMatrix, SegmentationScores, VideoConsistency, label_change_rate
from dcfm.model import DCFM
from dcfm.synth import SynthManifest
from dcfm.video import iter_frames


@dataclass(frozen=True)
class LabelledVideo:
    """A video file plus the label maps of (some of) its frames, keyed by frame index."""

    video_id: str
    path: Path
    frames: int
    labels: dict[int, Path]

    @property
    def fully_labelled(self) -> bool:
        return len(self.labels) == self.frames


def synth_videos(manifest: SynthManifest, video_ids: Iterable[str] | None = None) -> list[LabelledVideo]:
    """The videos of a synth corpus (optionally a subset) as LabelledVideo entries."""
    wanted = set(video_ids) if video_ids is not None else None
    return [
        LabelledVideo(v.id, manifest.video_path(v), v.frames, {i: manifest.label_path(v, i) for i in v.labeled_frames})
        for v in manifest.videos
        if wanted is None or v.id in wanted
    ]


@dataclass
class EvaluationReport:
    """Accuracy, consistency and speed of one inference setting."""

    scores: SegmentationScores
    vc: dict[int, float]  # n -> pooled VC_n (NaN when no video is fully labelled)
    frames: int
    keyframes: int
    seconds: float  # inference wall time (decode excluded)
    label_change_rate: float  # mean fraction of pixels whose predicted label changes frame to frame
    mean_agreement: float  # bidirectional: mean prev/next keyframe agreement over non-keyframes (NaN otherwise)
    per_video_keyframes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.nan


def _read_label(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def evaluate_videos(
    model: DCFM,
    videos: Sequence[LabelledVideo],
    config: InferenceConfig,
    class_names: Sequence[str],
    vc_windows: tuple[int, ...] = (8, 16),
) -> EvaluationReport:
    """Segment every frame of every video and score against its labels (ignore index 255)."""
    segmenter = ClipSegmenter(model, config)
    confusion = ConfusionMatrix(len(class_names))
    consistency = VideoConsistency(window_sizes=vc_windows)
    frames = keyframes = 0
    seconds = 0.0
    change_rates: list[float] = []
    agreements: list[float] = []
    keyframes_by_video: dict[str, list[int]] = {}
    for video in videos:
        decoded = list(iter_frames(video.path))  # decode outside the timed region
        predictions: list[np.ndarray] = []
        start = time.perf_counter()
        results = list(segmenter.segment(decoded))
        seconds += time.perf_counter() - start
        previous = None
        for result in results:
            if result.index in video.labels:
                confusion.update(result.labels, _read_label(video.labels[result.index]))
            if previous is not None:
                change_rates.append(label_change_rate(previous, result.labels))
            if result.agreement is not None:
                agreements.append(result.agreement)
            previous = result.labels
            predictions.append(result.labels)
        keyframes_by_video[video.video_id] = [r.index for r in results if r.is_keyframe]
        frames += len(results)
        keyframes += len(keyframes_by_video[video.video_id])
        if video.fully_labelled:
            consistency.add_video(predictions, [_read_label(video.labels[i]) for i in range(video.frames)])
    vc = {n: consistency.pooled(n) if consistency.num_videos else math.nan for n in vc_windows}
    return EvaluationReport(
        scores=confusion.summary(list(class_names)),
        vc=vc,
        frames=frames,
        keyframes=keyframes,
        seconds=seconds,
        label_change_rate=float(np.mean(change_rates)) if change_rates else math.nan,
        mean_agreement=float(np.mean(agreements)) if agreements else math.nan,
        per_video_keyframes=keyframes_by_video,
    )
