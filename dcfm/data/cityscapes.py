"""The ``cityscapes`` layout: ``leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png``
and ``gtFine/<split>/<city>/<city>_<seq>_<frame:06d>_gtFine_{labelTrainIds,labelIds}.png``.

Pairs: each fine label (the 20th frame of a 30-frame snippet) with its neighbour.  Clips: each snippet, its
20th frame labelled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dcfm.data.base import (ClipSet, Palette, PairDataset, PairRef, check_delta, frame_number, lut, nonempty,
                            pick_neighbour, snippet_clips)


def detect(root: Path) -> bool:
    return (root / "leftImg8bit_sequence").is_dir() and (root / "gtFine").is_dir()


def open_pairs(root: Path, split: str = "train", delta: int = 1, **kwargs: Any) -> PairDataset:
    return CityscapesSequencePairs(root, split=split, delta=delta, **kwargs)


def open_clips(root: Path, split: str = "val", video_ids: list[str] | None = None) -> ClipSet:
    """Each 30-frame ``leftImg8bit_sequence`` snippet, its 20th frame labelled."""

    def snippet(ref: PairRef) -> tuple[str, Path, dict[int, Path]]:
        sequence_dir = Path(ref.neighbour_path).parent
        frames = {frame_number(p.name[: -len("_leftImg8bit.png")]): p
                  for p in sequence_dir.glob(f"{ref.video_id}_*_leftImg8bit.png")}
        return f"{ref.video_id}_{ref.labeled_index:06d}", sequence_dir, frames

    return snippet_clips(CityscapesSequencePairs(root, split), video_ids, snippet)


# cityscapesScripts helpers/labels.py: labelId -> trainId of the 19 evaluated classes. Every other id
# (unlabeled, ego vehicle, ..., parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer,
# license plate) has trainId 255 (or -1) and is ignored.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
CITYSCAPES_PALETTE: Palette = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
_CS_LABELIDS_LUT = lut(CITYSCAPES_ID_TO_TRAINID)
_CS_TRAINIDS_LUT = lut({i: i for i in range(19)})
_CS_STEM = re.compile(r"(?P<prefix>.+_\d+)_(?P<frame>\d+)")


class CityscapesSequencePairs(PairDataset):
    """Cityscapes fine labels (20th frame of each 30-frame snippet) paired with ``leftImg8bit_sequence``.

    ``*_gtFine_labelTrainIds.png`` is used when present, else ``*_gtFine_labelIds.png`` mapped to the 19 train
    ids.  The labelled image is taken from ``leftImg8bit_sequence`` (falling back to ``leftImg8bit``).
    """

    layout = "cityscapes"

    def __init__(self, root: str | Path, split: str = "train", delta: int = 1) -> None:
        self.root = Path(root)
        delta = check_delta(delta)
        gt_dir = self.root / "gtFine" / split
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"missing Cityscapes label directory: {gt_dir}")
        labels: dict[tuple[str, str], Path] = {}
        for suffix in ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"):  # later wins: trainIds preferred
            for p in gt_dir.glob(f"*/*{suffix}"):
                labels[(p.parent.name, p.name[: -len(suffix)])] = p
        refs = []
        for (city, stem), label in sorted(labels.items()):
            m = _CS_STEM.fullmatch(stem)
            if m is None:
                raise ValueError(f"unexpected Cityscapes label name: {label}")
            frame, width = int(m["frame"]), len(m["frame"])
            seq_dir = self.root / "leftImg8bit_sequence" / split / city

            def seq_path(i: int, prefix: str = m["prefix"], d: Path = seq_dir, w: int = width) -> Path:
                return d / f"{prefix}_{i:0{w}d}_leftImg8bit.png"

            labeled = seq_path(frame)
            if not labeled.is_file() and (self.root / "leftImg8bit" / split / city / labeled.name).is_file():
                labeled = self.root / "leftImg8bit" / split / city / labeled.name
            u = pick_neighbour(frame, delta, lambda i: seq_path(i).is_file())
            u = frame + delta if u is None else u  # load() then names the missing file
            refs.append(PairRef(m["prefix"], frame, u, str(labeled), str(seq_path(u)), str(label)))
        super().__init__(nonempty(refs, gt_dir, "Cityscapes"), CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return (_CS_TRAINIDS_LUT if ref.label_path.endswith("_labelTrainIds.png") else _CS_LABELIDS_LUT)[raw]
