"""What every dataset layout shares: training pairs (METHOD.md §3, §6), evaluation clips, file readers.

A pair sample is a labelled frame ``I_L``, an unlabelled neighbour ``I_U`` (``U = L ± delta``) and the label
``Y_L`` (uint8 class indices, 255 = ignore).  Neighbour rule, all layouts: ``U = L + delta`` if that frame
exists, else ``U = L - delta`` (e.g. the last labelled frame of a synth video); ``delta`` may be negative (a past
neighbour preferred), and training draws the sign per visit (``dcfm.train.data.open_training_pairs``).  A missing neighbour/label
file raises ``FileNotFoundError`` naming it.

A clip (:class:`LabelledVideo`) is a video file or an ordered list of image files plus the label maps of
(some of) its frames; evaluation runs clip inference on it.  The layouts themselves are the modules next to
this one (``synth``, ``cityscapes``, ``vspw``, ``camvid``), registered in :mod:`dcfm.data`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from dcfm.classes import Palette
from dcfm.data import IGNORE_INDEX


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
        labeled = read_rgb(ref.labeled_path, "labelled frame")
        neighbour = read_rgb(ref.neighbour_path, "neighbour frame")
        label = self.map_label(read_index_png(ref.label_path), ref)
        return assemble(labeled, neighbour, label, ref)

    def map_label(self, raw: np.ndarray, ref: PairRef) -> np.ndarray:
        """Map raw label PNG values to train ids, 255 = ignore (identity by default)."""
        return raw

    def label_lut(self, ref: PairRef) -> np.ndarray:
        """``map_label`` as a table over 0..255 (every layout's mapping is a per-value lookup)."""
        return self.map_label(np.arange(256, dtype=np.uint8), ref)


def resize_rgb(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB image file's frame brought to ``size`` = (H, W) (PIL bilinear); unchanged when already that size.

    The one resize of image-file frames (a neighbour or stand-in still of another size, evaluation input);
    video frames are resized while decoding (:func:`dcfm.decode.frame_to_rgb`).
    """
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    # np.array, not asarray: a writable copy (torch warns when handed a read-only buffer).
    return np.array(Image.fromarray(frame).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def read_rgb(path: str | Path, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"missing {what}: {p}")
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_index_png(path: str | Path) -> np.ndarray:
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


def lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(mapping)] = list(mapping.values())
    return lut


def assemble(labeled: np.ndarray, neighbour: np.ndarray, label: np.ndarray, ref: PairRef) -> PairSample:
    h, w = labeled.shape[:2]
    if label.shape != (h, w):
        raise ValueError(f"label {ref.label_path} is {label.shape[1]}x{label.shape[0]} but labelled frame "
                         f"{ref.labeled_path} is {w}x{h}")
    if neighbour.shape[:2] != (h, w):
        # CamVid: SegNet stills are 480x360 while decoded video frames are 960x720.
        neighbour = resize_rgb(neighbour, (h, w))
    return PairSample(labeled=labeled, neighbour=neighbour, label=label, ref=ref)


def pick_neighbour(index: int, delta: int, exists: Callable[[int], bool]) -> int | None:
    """``index + delta`` if it exists, else ``index - delta`` if it exists, else None."""
    for u in (index + delta, index - delta):
        if u >= 0 and exists(u):
            return u
    return None


def check_delta(delta: int) -> int:
    """A neighbour offset: ``U = L + delta``; negative prefers a past neighbour (training draws the sign)."""
    if int(delta) != delta:
        raise ValueError(f"delta must be an integer, got {delta}")
    return int(delta)


def nonempty(refs: list[PairRef], where: Path, what: str) -> list[PairRef]:
    if not refs:
        raise ValueError(f"no labelled frames found for {what} under {where}")
    return refs


def frame_key(stem: str) -> tuple[int, int | str]:
    """Sort key of frame file stems: numbers in numeric order, then other names."""
    return (0, int(stem)) if stem.isdigit() else (1, stem)




@dataclass(frozen=True)
class LabelledVideo:
    """A clip — a video file, or ``frame_paths`` (image files in order) — plus the label maps of (some of) its
    frames, keyed by position in the clip; ``label_lut`` maps raw label values to train ids (255 = ignore)."""

    video_id: str
    path: Path
    frames: int
    labels: dict[int, Path]
    frame_paths: tuple[Path, ...] = ()
    label_lut: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def fully_labelled(self) -> bool:
        return len(self.labels) == self.frames

    def iter_frames(self, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """RGB uint8 frames in clip order, at ``size`` = (H, W) when given, else at the clip's own size.

        A video goes through the segment job's decoder (:func:`dcfm.decode.decode_range`: the same frames,
        resized by the same swscale call), so evaluation sees the pixels ``dcfm segment`` sees; image files
        are resized with :func:`resize_rgb`.
        """
        if not self.frame_paths:
            from dcfm.decode import decode_range, probe_video  # PyAV is only needed for video clips

            uri = str(self.path)
            probe = probe_video(uri)
            for frame in decode_range(uri, probe, 0, probe.frame_count, size=size):
                yield frame.rgb
            return
        first = None
        for p in self.frame_paths:
            rgb = read_rgb(p, "clip frame")
            # A stand-in still (CamVid's are half the video's size) is brought to the clip's frame size first.
            first = first or rgb.shape[:2]
            rgb = resize_rgb(rgb, first)
            yield rgb if size is None else resize_rgb(rgb, size)

    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the clip's frames as stored (a video's coded size; the first image's)."""
        if not self.frame_paths:
            from dcfm.decode import probe_video

            probe = probe_video(str(self.path))
            return probe.height, probe.width
        with Image.open(self.frame_paths[0]) as image:
            return image.height, image.width

    def read_label(self, index: int) -> np.ndarray:
        with Image.open(self.labels[index]) as image:
            label = np.asarray(image)
        return label if self.label_lut is None else self.label_lut[label]


@dataclass
class ClipSet:
    """The clips of one dataset split, with the class names and palette they are labelled in."""

    layout: str
    videos: list[LabelledVideo]
    classes: list[str]
    palette: list[tuple[int, int, int]]

    def only(self, video_ids: Iterable[str] | None) -> ClipSet:
        """The clips whose ids are in ``video_ids`` (all when None), in their order here."""
        if video_ids is None:
            return self
        wanted = set(video_ids)
        return ClipSet(self.layout, [v for v in self.videos if v.video_id in wanted], self.classes, self.palette)


CLIP_BEFORE, CLIP_AFTER = 19, 10  # Cityscapes snippets: 19 frames before the labelled one, 10 after


def snippet_clips(dataset: PairDataset, video_ids: Iterable[str] | None,
                  sequence: Callable[[PairRef], tuple[str, Path, dict[int, Path]]]) -> ClipSet:
    """One clip per labelled frame: the window of its sequence around it (see :func:`clip_window`).
    ``sequence(ref)`` names the clip and gives the sequence's directory and its frames by number."""
    videos = []
    for ref in dataset.refs:
        clip_id, directory, frames = sequence(ref)
        clip, position = clip_window(frames, ref.labeled_index, Path(ref.labeled_path))
        videos.append(LabelledVideo(clip_id, directory, len(clip), {position: Path(ref.label_path)}, clip,
                                    dataset.label_lut(ref)))
    return ClipSet(dataset.layout, videos, dataset.classes, dataset.palette).only(video_ids)


def frame_number(stem: str) -> int:
    """The number a frame file's stem ends with (``..._000019`` -> 19)."""
    match = re.search(r"(\d+)$", stem)
    if match is None:
        raise ValueError(f"cannot read a frame number from {stem!r}")
    return int(match.group(1))


def clip_window(frames: dict[int, Path], labelled: int, still: Path) -> tuple[tuple[Path, ...], int]:
    """The frames from ``labelled - CLIP_BEFORE`` to ``labelled + CLIP_AFTER`` that exist, and the labelled
    frame's position among them (``still`` stands in for a labelled frame the sequence lacks)."""
    frames = {**frames, labelled: frames.get(labelled, still)}
    numbers = [n for n in sorted(frames) if labelled - CLIP_BEFORE <= n <= labelled + CLIP_AFTER]
    return tuple(frames[n] for n in numbers), numbers.index(labelled)
