"""The ``synth`` layout: a ``dcfm synth`` corpus (``manifest.json``, ``videos/*.mp4``,
``labels/<id>/<frame:06d>.png``), as training pairs and as evaluation clips (one per video; every frame
labelled by default, so VC_n is defined).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcfm.data.base import (ClipSet, LabelledVideo, PairDataset, PairRef, PairSample, assemble, check_delta,
                            nonempty, pick_neighbour, read_index_png)
from dcfm.synth import SynthManifest, load_manifest


def detect(root: Path) -> bool:
    return (root / "manifest.json").is_file()


def open_pairs(root: Path, split: str = "train", delta: int = 1, **kwargs: Any) -> SynthPairs:
    """``split`` selects the manifest's split when it has splits (else every video), unless ``video_ids``."""
    if "video_ids" not in kwargs:
        kwargs["video_ids"] = load_manifest(root).split_ids(split)
    return SynthPairs(root, delta=delta, **kwargs)


def open_clips(root: Path, split: str = "val", video_ids: Iterable[str] | None = None) -> ClipSet:
    """One clip per video: ``video_ids`` if given, else the manifest's ``split`` (every video without splits)."""
    manifest = load_manifest(root)
    ids = video_ids if video_ids is not None else manifest.split_ids(split)
    return ClipSet("synth", synth_videos(manifest, ids), list(manifest.classes), list(manifest.palette))


def synth_videos(manifest: SynthManifest, video_ids: Iterable[str] | None = None) -> list[LabelledVideo]:
    """The videos of a synth corpus (optionally a subset) as LabelledVideo entries."""
    wanted = set(video_ids) if video_ids is not None else None
    return [
        LabelledVideo(v.id, manifest.video_path(v), v.frames, {i: manifest.label_path(v, i) for i in v.labeled_frames})
        for v in manifest.videos
        if wanted is None or v.id in wanted
    ]


class SynthPairs(PairDataset):
    """Pairs from a ``dcfm synth`` corpus; ``video_ids`` restricts to a subset (train/held-out splits)."""

    layout = "synth"

    def __init__(self, root: str | Path, delta: int = 1, video_ids: Iterable[str] | None = None,
                 decoded_cache_mb: int = 0) -> None:
        self.root = Path(root)
        delta = check_delta(delta)
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
                u = pick_neighbour(lab, delta, lambda i, n=v.frames: i < n)
                if u is None:
                    raise ValueError(f"video {v.id} has {v.frames} frames: no neighbour {delta} from frame {lab}")
                refs.append(PairRef(v.id, lab, u, video, video, str(manifest.label_path(v, lab))))
        super().__init__(nonempty(refs, self.root, "synth"), list(manifest.classes),
                         manifest.palette, manifest.ignore_index)

    def load(self, ref: PairRef) -> PairSample:
        """Decode both frames from the video (exact decode-order indices) and read the label PNG."""
        from dcfm.decode import read_frames  # PyAV is only needed for synth corpora

        if not Path(ref.labeled_path).is_file():
            raise FileNotFoundError(f"missing video: {ref.labeled_path}")
        indices = [ref.labeled_index, ref.neighbour_index]
        if self.decoded_cache_mb > 0:
            if self._cache is None:
                self._cache = DecodedVideoCache(self.decoded_cache_mb << 20)
            labeled, neighbour = self._cache.frames(ref.labeled_path, indices)
        else:
            labeled, neighbour = read_frames(ref.labeled_path, indices)
        return assemble(labeled, neighbour, read_index_png(ref.label_path), ref)

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
        from dcfm.decode import iter_frames

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
