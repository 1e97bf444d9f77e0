"""Read what a segment job committed: the videos with a commit marker and their frame rows.

Only videos whose ``_commits/<id>.json`` marker exists count (the job's commit protocol); their frame files
are the ones the marker lists. Rows are streamed file by file, a few at a time, in display order, so a
reader's memory does not grow with the length of a video.
"""

from __future__ import annotations

import glob
import io
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import CheckpointError, read_card
from dcfm.classes import check_palette
from dcfm.segment.outputs import OutputLayout

if TYPE_CHECKING:
    from dcfm.decode import DecodedFrame

METRIC_COLUMNS = ("frame_index", "is_keyframe", "confidence", "label_change_rate", "keyframe_agreement")
_BATCH_ROWS = 16  # masks of 16 1080p frames are a few MB: small enough for flat memory, big enough to be quick


@dataclass(frozen=True)
class CommittedVideo:
    """One committed video: its marker, its ``videos/`` row and the URIs of its frame files in chunk order."""

    video_id: str
    video_uri: str
    status: str
    run_id: str
    model_digest: str
    frame_files: tuple[str, ...]
    row: dict[str, Any]

    @property
    def frame_count(self) -> int:
        return int(self.row.get("frame_count") or 0)


@dataclass(frozen=True)
class ClassInfo:
    """Class names and colours of the model that made the masks (from its checkpoint card)."""

    names: list[str]
    palette: list[tuple[int, int, int]]

    def lut(self) -> np.ndarray:
        """(num_classes, 3) uint8: class id -> colour."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)


def _read_parquet(uri: str) -> list[dict[str, Any]]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def committed_videos(output: str, video_ids: Sequence[str] | None = None,
                     statuses: Sequence[str] | None = ("ok",)) -> list[CommittedVideo]:
    """The committed videos of ``output`` (only ``statuses``, all when None), sorted by id.

    Asking for a video id that is not committed (or not ok) is an error naming it and what is there.
    """
    layout = OutputLayout(output)
    markers = layout.committed()
    if not markers and not storage.exists(storage.join(output, "_commits")):
        raise FileNotFoundError(f"{output}: no _commits/ markers; not the output of `dcfm segment`, or a run that "
                                "committed nothing yet. Point at the --output of a segment run.")
    wanted = sorted(markers) if video_ids is None else list(dict.fromkeys(video_ids))
    missing = [v for v in wanted if v not in markers]
    if missing:
        raise ValueError(f"{output}: video(s) {missing} are not committed; committed: {sorted(markers)[:20]}")
    videos = []
    for video_id in wanted:
        marker = markers[video_id]
        if statuses is not None and marker["status"] not in statuses:
            if video_ids is not None:
                raise ValueError(f"{output}: video {video_id} was committed with status {marker['status']!r}, "
                                 "so it has no masks (see its errors/ row)")
            continue
        rows = _read_parquet(storage.join(layout.videos_dir(video_id), "part-0.parquet"))
        files = tuple(storage.join(layout.frames_dir(video_id), name) for name in marker.get("frame_files", []))
        videos.append(CommittedVideo(video_id, marker["video_uri"], marker["status"], marker["run_id"],
                                     marker["model_digest"], files, {**rows[0], "video_id": video_id}))
    return videos


def iter_frame_rows(video: CommittedVideo, columns: Sequence[str] = METRIC_COLUMNS) -> Iterator[dict[str, Any]]:
    """Frame rows of ``video`` in display order (0, 1, 2, ...), ``columns`` only, a few rows in memory at once."""
    columns = list(dict.fromkeys(["frame_index", *columns]))
    expected = 0
    for uri in video.frame_files:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    if row["frame_index"] != expected:
                        raise ValueError(f"{uri}: frame {row['frame_index']} where frame {expected} was expected; "
                                         "the output was modified after it was committed")
                    expected += 1
                    yield row
    if video.frame_count and expected != video.frame_count:
        raise ValueError(f"{video.video_id}: {expected} frame rows for {video.frame_count} frames; the output was "
                         "modified after it was committed")


def iter_source_frames(video: CommittedVideo) -> Iterator[DecodedFrame]:
    """The source frames of ``video`` in display order, decoded as the segment job decodes them."""
    from dcfm.decode import decode_range, probe_video

    probe = probe_video(video.video_uri)
    if probe.frame_count != video.frame_count:
        raise ValueError(f"{video.video_uri}: {probe.frame_count} frames now, {video.frame_count} when it was "
                         "segmented; the source changed, segment it again")
    return decode_range(video.video_uri, probe, 0, probe.frame_count)


def decode_mask(png: bytes) -> np.ndarray:
    """The (H, W) class-id array of a ``mask_png``."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


def run_manifests(output: str) -> list[dict[str, Any]]:
    """Every run manifest (``runs/<run_id>/<start>.json``) of ``output``, oldest first."""
    fs, path = storage.filesystem(storage.join(output, "runs"))
    try:
        names = sorted(fs.glob(posixpath.join(glob.escape(path), "*", "*.json")), key=posixpath.basename)
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(name)) for name in names]


def class_info(output: str, videos: Sequence[CommittedVideo], checkpoint: str | None = None) -> ClassInfo:
    """Names and colours from the card of the checkpoint that made ``videos``' masks.

    The checkpoint is ``checkpoint`` if given, else the one the run manifest of their run records. Its weights'
    digest must be the masks' ``model_digest``: another model's names would label the masks wrongly.
    """
    digests = sorted({v.model_digest for v in videos})
    if checkpoint is None:
        runs = {v.run_id for v in videos}
        recorded = [m["config"]["checkpoint"] for m in run_manifests(output) if m.get("run_id") in runs]
        if not recorded:
            raise FileNotFoundError(f"{output}: no run manifest names the checkpoint of run(s) {sorted(runs)}; "
                                    "pass --checkpoint with the model that segmented it")
        checkpoint = recorded[-1]
    try:
        card, digest = read_card(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (the class names and colours come from this checkpoint's card; pass "
                              "--checkpoint with a copy of the model that segmented the output)") from err
    if digests and digests != [digest]:
        raise CheckpointError(f"{checkpoint}: weights {digest[:12]}… but the masks were made by "
                              f"{[d[:12] + '…' for d in digests]}; pass --checkpoint with that model")
    check_palette(card.class_names, card.palette)
    return ClassInfo(list(card.class_names), [tuple(int(v) for v in c) for c in card.palette])
