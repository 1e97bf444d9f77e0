"""Evaluate clip inference on labelled videos: mIoU / fwIoU over labelled frames (all, and non-keyframes
only), VC_n where every frame is labelled, label-free consistency figures, and speed.

Speed: inference wall time excludes decoding and resizing. It is split into ms per keyframe and ms per
non-keyframe by timing the model stages *inside the real run* (:class:`StageTimer`): the shallow layers
(shared equally by the frames of a batch), the deep layers + the keyframe's fusion term (keyframes only),
and fusion + head (per frame and reference keyframe — twice for a bidirectional non-keyframe); what remains
(upsampling, softmax, argmax, bookkeeping) is shared equally by all frames. So
``K · ms_key + (N − K) · ms_non_key`` is the measured total, and ``fps = N / total``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from dcfm.data.base import LabelledVideo
from dcfm.inference import ClipSegmenter, FrameResult, InferenceConfig
from dcfm.metrics import ConfusionMatrix, SegmentationScores, VideoConsistency, label_change_rate
from dcfm.model import DCFM


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
    scores_non_key: SegmentationScores | None = None  # labelled non-keyframes only (None: there were none)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # shallow / deep / head (see StageTimer)
    head_items: int = 0  # (frame, reference keyframe) pairs that went through fusion + head
    phase_averaged_clips: int = 0  # sparsely labelled clips scored over every keyframe phase (see phases_for)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.nan

    @property
    def ms_per_keyframe(self) -> float:
        return 1000 * self._per_frame_costs()[0]

    @property
    def ms_per_non_keyframe(self) -> float:
        return 1000 * self._per_frame_costs()[1]

    def _per_frame_costs(self) -> tuple[float, float]:
        n, k, items = self.frames, self.keyframes, self.head_items
        st = self.stage_seconds
        if not n or not k or not items or set(st) != {"shallow", "deep", "head"}:
            return math.nan, math.nan
        shared = (st["shallow"] + self.seconds - sum(st.values())) / n  # shallow layers + per-frame overhead
        head = st["head"] / items
        key = shared + st["deep"] / k + head
        non_key = shared + head * (items - k) / (n - k) if n > k else math.nan
        return key, non_key


class StageTimer:
    """Times the model stages ClipSegmenter calls, by wrapping them on the model instance for a ``with`` block.

    Stages: ``shallow`` = ``model.independent``; ``deep`` = ``model.common`` + ``model.fusion.keyframe_term``;
    ``head`` = ``model.logits_from_term`` (counting its batch items). On CUDA each call is synchronised so its
    time is its own.
    """

    def __init__(self, model: DCFM) -> None:
        self.model = model
        self.seconds = {"shallow": 0.0, "deep": 0.0, "head": 0.0}
        self.head_items = 0
        self._cuda = next(model.parameters()).device.type == "cuda"

    def _wrap(self, owner, name: str, stage: str, count: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start
            if count:
                self.head_items += int(args[1].shape[0])
            return out

        setattr(owner, name, timed)

    def __enter__(self) -> StageTimer:
        self._wrap(self.model, "independent", "shallow")
        self._wrap(self.model, "common", "deep")
        self._wrap(self.model.fusion, "keyframe_term", "deep")
        self._wrap(self.model, "logits_from_term", "head", count=True)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name in ((self.model, "independent"), (self.model, "common"),
                            (self.model.fusion, "keyframe_term"), (self.model, "logits_from_term")):
            owner.__dict__.pop(name, None)  # the class's method shows through again


MaskSink = Callable[[LabelledVideo, FrameResult], None]


def phases_for(video: LabelledVideo, config: InferenceConfig) -> range:
    """Keyframe phases a clip is scored under: all of 0..k-1 for a sparsely labelled clip and a fixed k > 1 (the
    paper's protocol: the labelled frame takes every position relative to the keyframes, e.g. Cityscapes' 20th
    frame would otherwise never be a keyframe for k = 2..18, or always be one), else phase 0 only."""
    policy = config.keyframes
    if video.fully_labelled or not policy.fixed or policy.interval == 1:
        return range(1)
    return range(policy.interval)


def seek_points(video: LabelledVideo) -> tuple[int, ...]:
    """The clip's own seek points (codec keyframes), from the probe of its video file."""
    if video.frame_paths:
        raise ValueError(f"clip {video.video_id} is a sequence of image files: it has no codec keyframes; "
                         "use a fixed or adaptive keyframe policy")
    from dcfm.decode import probe_video

    return probe_video(str(video.path)).keyframes


class SettingAccumulator:
    """Scores and times one inference setting over clips fed to it one at a time."""

    def __init__(self, model: DCFM, config: InferenceConfig, num_classes: int, vc_windows: tuple[int, ...] = (8, 16),
                 mask_sink: MaskSink | None = None) -> None:
        self.model, self.config, self.vc_windows, self.mask_sink = model, config, vc_windows, mask_sink
        self.confusion = ConfusionMatrix(num_classes)
        self.confusion_non_key = ConfusionMatrix(num_classes)
        self.consistency = VideoConsistency(window_sizes=vc_windows)
        self.timer = StageTimer(model)
        self.frames = self.keyframes = 0
        self.seconds = 0.0
        self.change_rates: list[float] = []
        self.agreements: list[float] = []
        self.keyframes_by_video: dict[str, list[int]] = {}
        self.phase_averaged_clips = 0

    def add(self, video: LabelledVideo, frames: list[np.ndarray], output_size: tuple[int, int] | None = None,
            labels: dict[int, np.ndarray] | None = None) -> None:
        """Segment one clip (frames already decoded and resized to the model's resolution) and score it.

        ``labels``: the clip's label maps already read (``read_labels``), when several settings share a clip.
        """
        labels = read_labels(video) if labels is None else labels
        config = self.config if output_size is None else replace(self.config, output_size=output_size)
        codec = seek_points(video) if config.keyframes.codec else None
        phases = phases_for(video, config)
        self.phase_averaged_clips += len(phases) > 1
        for phase in phases[1:]:  # the other phases only add to the accuracy (and time) of the labelled frames
            shifted = replace(config, keyframes=replace(config.keyframes, phase=phase))
            for result in self._run(shifted, frames, codec):
                if result.index in labels:
                    self.confusion.update(result.labels, labels[result.index])
                    if not result.is_keyframe:
                        self.confusion_non_key.update(result.labels, labels[result.index])
        results = self._run(config, frames, codec)
        predictions: list[np.ndarray] = []
        previous = None
        for result in results:
            if result.index in labels:
                label = labels[result.index]
                self.confusion.update(result.labels, label)
                if not result.is_keyframe:
                    self.confusion_non_key.update(result.labels, label)
            if previous is not None:
                self.change_rates.append(label_change_rate(previous, result.labels))
            if result.agreement is not None:
                self.agreements.append(result.agreement)
            if self.mask_sink is not None:
                self.mask_sink(video, result)
            previous = result.labels
            predictions.append(result.labels)
        self.keyframes_by_video[video.video_id] = [r.index for r in results if r.is_keyframe]
        if video.fully_labelled:
            self.consistency.add_video(predictions, [labels[i] for i in range(video.frames)])

    def _run(self, config: InferenceConfig, frames: list[np.ndarray],
             codec: tuple[int, ...] | None) -> list[FrameResult]:
        """One timed pass over a clip; frames and keyframes count every pass, so FPS stays frames / time."""
        segmenter = ClipSegmenter(self.model, config)
        with self.timer:
            start = time.perf_counter()
            results = list(segmenter.segment(frames, codec_keyframes=codec))
            self.seconds += time.perf_counter() - start
        self.frames += len(results)
        self.keyframes += sum(r.is_keyframe for r in results)
        return results

    def report(self, class_names: Sequence[str]) -> EvaluationReport:
        vc = {n: self.consistency.pooled(n) if self.consistency.num_videos else math.nan for n in self.vc_windows}
        non_key = self.confusion_non_key.summary(list(class_names)) if self.confusion_non_key.total else None
        return EvaluationReport(
            scores=self.confusion.summary(list(class_names)),
            vc=vc,
            frames=self.frames,
            keyframes=self.keyframes,
            seconds=self.seconds,
            label_change_rate=float(np.mean(self.change_rates)) if self.change_rates else math.nan,
            mean_agreement=float(np.mean(self.agreements)) if self.agreements else math.nan,
            per_video_keyframes=self.keyframes_by_video,
            scores_non_key=non_key,
            stage_seconds=dict(self.timer.seconds),
            head_items=self.timer.head_items,
            phase_averaged_clips=self.phase_averaged_clips,
        )


def evaluate_videos(
    model: DCFM,
    videos: Sequence[LabelledVideo],
    config: InferenceConfig,
    class_names: Sequence[str],
    vc_windows: tuple[int, ...] = (8, 16),
    resolution: tuple[int, int] | None = None,
    mask_sink: MaskSink | None = None,
) -> EvaluationReport:
    """Segment every frame of every video and score against its labels (ignore index 255).

    ``resolution`` (H, W): run the model on frames resized to it (as ``dcfm segment`` resizes them), predictions
    upsampled to the label size.
    ``mask_sink(video, result)`` sees every predicted frame (e.g. to save masks).
    """
    accumulator = SettingAccumulator(model, config, len(class_names), vc_windows, mask_sink)
    for video in videos:
        frames = list(video.iter_frames(resolution))  # decode outside the timed region
        accumulator.add(video, frames, label_size(video))
    return accumulator.report(class_names)


def read_labels(video: LabelledVideo) -> dict[int, np.ndarray]:
    """Every label map of a clip, mapped to train ids."""
    return {i: video.read_label(i) for i in sorted(video.labels)}


def label_size(video: LabelledVideo) -> tuple[int, int]:
    """(H, W) predictions must have to be scored: the first label map's, else the frames' own."""
    if video.labels:
        with Image.open(video.labels[min(video.labels)]) as image:
            return image.height, image.width
    return video.frame_size()
