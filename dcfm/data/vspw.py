"""The ``vspw`` layout: ``data/<video>/origin/<frame>.jpg``, ``data/<video>/mask/<frame>.png``, ``<split>.txt``.

Every frame annotated; a frame's index is its position in the sorted ``origin/`` listing.  Pairs: each
masked frame with its neighbour.  Clips: each video of the split, all of ``origin/`` in order, every frame
with a mask labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dcfm.classes import voc_colormap
from dcfm.data.base import (ClipSet, LabelledVideo, Palette, PairDataset, PairRef, check_delta, frame_key, lut,
                            nonempty, pick_neighbour)


def detect(root: Path) -> bool:
    return (root / "data").is_dir() and next((root / "data").glob("*/origin"), None) is not None


def open_pairs(root: Path, split: str = "train", delta: int = 1, **kwargs: Any) -> PairDataset:
    return VSPWPairs(root, split=split, delta=delta, **kwargs)


def open_clips(root: Path, split: str = "val", video_ids: list[str] | None = None) -> ClipSet:
    """Each video of the split: all of ``origin/`` in order, every frame with a mask labelled."""
    ds = VSPWPairs(root, split)
    labels: dict[str, dict[int, Path]] = {}
    for ref in ds.refs:
        labels.setdefault(ref.video_id, {})[ref.labeled_index] = Path(ref.label_path)
    videos = []
    for vid, video_labels in labels.items():
        origin, stems = ds.frames[vid]
        frames = tuple(origin / f"{stem}.jpg" for stem in stems)
        ref = next(r for r in ds.refs if r.video_id == vid)
        videos.append(LabelledVideo(vid, origin, len(frames), video_labels, frames, ds.label_lut(ref)))
    return ClipSet("vspw", videos, ds.classes, ds.palette).only(video_ids)


# VSPW masks: 0 = "others" and 255 = void, both ignored; 1..124 are the classes.  Training code (VSS-CFFM's
# mmseg VSPWDataset) sets reduce_zero_label=True, i.e. v -> v-1, {0, 255} -> 255.  Names in id order 1..124,
# as in VSS-CFFM mmseg/datasets/vspw.py (and sssegmentation's VSPWDataset).
VSPW_CLASSES = """
wall ceiling door stair ladder escalator Playground_slide handrail_or_fence window rail goal pillar pole floor
ground grass sand athletic_field road path crosswalk building house bridge tower windmill well_or_well_lid
other_construction sky mountain stone wood ice snowfield grandstand sea river lake waterfall water
billboard_or_Bulletin_Board sculpture pipeline flag parasol_or_umbrella cushion_or_carpet tent roadblock car bus
truck bicycle motorcycle wheeled_machine ship_or_boat raft airplane tyre traffic_light lamp person cat dog horse
cattle other_animal tree flower other_plant toy ball_net backboard skateboard bat ball
cupboard_or_showcase_or_storage_rack box traveling_case_or_trolley_case basket bag_or_package trash_can cage
plate tub_or_bowl_or_pot bottle_or_cup barrel fishbowl bed pillow table_or_desk chair_or_seat bench sofa shelf
bathtub gun commode roaster other_machine refrigerator washing_machine Microwave_oven fan curtain textiles
clothes painting_or_poster mirror flower_pot_or_vase clock book tool blackboard tissue screen_or_television
computer printer Mobile_phone keyboard other_electronic_product fruit food instrument train
""".split()
_VSPW_LUT = lut({v: v - 1 for v in range(1, 125)})


# VSPW ships no per-class palette; VOC colour-map entries (by VSPW id) are for display only.
VSPW_PALETTE: Palette = voc_colormap(range(1, 125))


class VSPWPairs(PairDataset):
    """VSPW: every frame annotated; the frame index is the position in the sorted ``origin/`` listing."""

    layout = "vspw"

    def __init__(self, root: str | Path, split: str = "train", delta: int = 1) -> None:
        self.root = Path(root)
        delta = check_delta(delta)
        data = self.root / "data"
        if not data.is_dir():
            raise FileNotFoundError(f"missing VSPW data directory: {data}")
        split_file = self.root / f"{split}.txt"
        if split_file.is_file():
            videos = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        else:  # no split files: every video
            videos = sorted(d.name for d in data.iterdir() if d.is_dir())
        refs = []
        self.frames: dict[str, tuple[Path, list[str]]] = {}  # video -> (origin/, frame stems in index order)
        for vid in videos:
            origin, mask = data / vid / "origin", data / vid / "mask"
            if not origin.is_dir():
                raise FileNotFoundError(f"missing VSPW frame directory: {origin}")
            frames = sorted((p.stem for p in origin.glob("*.jpg")), key=frame_key)
            self.frames[vid] = (origin, frames)
            pos = {s: i for i, s in enumerate(frames)}
            for m in sorted(mask.glob("*.png"), key=lambda p: frame_key(p.stem)):
                if m.stem not in pos:
                    raise FileNotFoundError(f"missing labelled frame: {origin / m.stem}.jpg (mask {m})")
                lab = pos[m.stem]
                u = pick_neighbour(lab, delta, lambda i: i < len(frames))
                if u is None:
                    raise ValueError(f"VSPW video {vid} has {len(frames)} frames: no neighbour {delta} away")
                refs.append(PairRef(vid, lab, u, str(origin / f"{m.stem}.jpg"),
                                    str(origin / f"{frames[u]}.jpg"), str(m)))
        super().__init__(nonempty(refs, self.root, f"VSPW split {split!r}"), VSPW_CLASSES,
                         VSPW_PALETTE)

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return _VSPW_LUT[raw]
