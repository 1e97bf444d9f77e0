"""Labelled clips for evaluation from every dataset layout the pair datasets read.

* synth      — each video of the corpus (every frame labelled by default, so VC_n is defined);
* vspw       — each video of the split: all of ``origin/`` in order, every frame with a mask labelled;
* cityscapes — each 30-frame ``leftImg8bit_sequence`` snippet, its 20th frame labelled;
* camvid     — for each labelled still, a 30-frame window of the decoded sequence under ``frames/`` with the
  labelled frame 20th (as Cityscapes); the still itself stands in when ``frames/`` lacks that frame.

Labels are mapped to train ids exactly as training maps them (the dataset's own ``map_label``, as a LUT).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcfm.datasets import (CamVidPairs, CityscapesSequencePairs, PairDataset, PairRef, VSPWPairs, detect_layout)
from dcfm.evaluation import LabelledVideo, synth_videos
from dcfm.synth import load_manifest

CLIP_BEFORE, CLIP_AFTER = 19, 10  # Cityscapes snippets: 19 frames before the labelled one, 10 after


@dataclass
class ClipSet:
    """The clips of one dataset split, with the class names and palette they are labelled in."""

    layout: str
    videos: list[LabelledVideo]
    classes: list[str]
    palette: list[tuple[int, int, int]]


def _lut(dataset: PairDataset, ref: PairRef) -> np.ndarray:
    # Every map_label is a per-value lookup, so applying it to 0..255 yields the table itself.
    return dataset.map_label(np.arange(256, dtype=np.uint8), ref)


def _number(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    if match is None:
        raise ValueError(f"cannot read a frame number from {stem!r}")
    return int(match.group(1))


def _frame_key(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)  # the order VSPWPairs numbers frames in


def _vspw(root: Path, split: str) -> ClipSet:
    ds = VSPWPairs(root, split)
    by_video: dict[str, list[PairRef]] = defaultdict(list)
    for ref in ds.refs:
        by_video[ref.video_id].append(ref)
    videos = []
    for vid, refs in by_video.items():
        origin = Path(refs[0].labeled_path).parent
        frames = tuple(sorted(origin.glob("*.jpg"), key=lambda p: _frame_key(p.stem)))
        labels = {r.labeled_index: Path(r.label_path) for r in refs}
        assert all(str(frames[r.labeled_index]) == r.labeled_path for r in refs), f"frame order differs in {origin}"
        videos.append(LabelledVideo(vid, origin, len(frames), labels, frames, _lut(ds, refs[0])))
    return ClipSet("vspw", videos, ds.classes, ds.palette)


def _window(frames: dict[int, Path], labelled: int, still: Path) -> tuple[tuple[Path, ...], int]:
    """The frames from ``labelled - CLIP_BEFORE`` to ``labelled + CLIP_AFTER`` that exist, and the labelled
    frame's position among them (``still`` stands in for a labelled frame the sequence lacks)."""
    frames = {**frames, labelled: frames.get(labelled, still)}
    numbers = [n for n in sorted(frames) if labelled - CLIP_BEFORE <= n <= labelled + CLIP_AFTER]
    return tuple(frames[n] for n in numbers), numbers.index(labelled)


def _cityscapes(root: Path, split: str) -> ClipSet:
    ds = CityscapesSequencePairs(root, split)
    videos = []
    for ref in ds.refs:
        sequence_dir = Path(ref.neighbour_path).parent
        frames = {_number(p.name[: -len("_leftImg8bit.png")]): p
                  for p in sequence_dir.glob(f"{ref.video_id}_*_leftImg8bit.png")}
        clip, position = _window(frames, ref.labeled_index, Path(ref.labeled_path))
        videos.append(LabelledVideo(f"{ref.video_id}_{ref.labeled_index:06d}", sequence_dir, len(clip),
                                    {position: Path(ref.label_path)}, clip, _lut(ds, ref)))
    return ClipSet("cityscapes", videos, ds.classes, ds.palette)


def _camvid(root: Path, split: str) -> ClipSet:
    ds = CamVidPairs(root, split)
    videos = []
    for ref in ds.refs:
        frame_dir = Path(ref.neighbour_path).parent
        frames = {_number(p.stem): p for p in frame_dir.glob(f"{ref.video_id}_*.png")}
        clip, position = _window(frames, ref.labeled_index, Path(ref.labeled_path))
        videos.append(LabelledVideo(Path(ref.labeled_path).stem, frame_dir, len(clip),
                                    {position: Path(ref.label_path)}, clip, _lut(ds, ref)))
    return ClipSet("camvid", videos, ds.classes, ds.palette)


def open_clips(root: str | Path, layout: str = "auto", split: str = "val",
               video_ids: list[str] | None = None) -> ClipSet:
    """The labelled clips of a local dataset root (``split`` is ignored by synth corpora without splits)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    name = detect_layout(root) if layout == "auto" else layout
    if name == "synth":
        manifest = load_manifest(root)
        ids = video_ids if video_ids is not None else manifest.split_ids(split)
        clips = ClipSet("synth", synth_videos(manifest, ids), list(manifest.classes), list(manifest.palette))
    else:
        builders = {"vspw": _vspw, "cityscapes": _cityscapes, "camvid": _camvid}
        if name not in builders:
            raise ValueError(f"unknown layout {name!r}; expected 'auto', 'synth' or one of {sorted(builders)}")
        clips = builders[name](root, split)
        if video_ids is not None:
            clips.videos = [v for v in clips.videos if v.video_id in set(video_ids)]
    if not clips.videos:
        raise ValueError(f"no labelled clips in {root} (layout {name}, split {split!r})")
    return clips
