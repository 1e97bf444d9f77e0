"""`dcfm export cvat`: one CVAT "Segmentation mask 1.1" zip (the Pascal VOC segmentation layout) per video.

    <video_id>.zip
        labelmap.txt                            # label:color_rgb:parts:actions — background, then the classes
        ImageSets/Segmentation/<subset>.txt     # frame names, one a line ("default" unless --subset)
        SegmentationClass/frame_000000.png      # RGB, each pixel the colour of its class in labelmap.txt
        JPEGImages/frame_000000.jpg             # with --images only: the source frame
    <video_id>.review.csv                       # with --review N: the review queue, lowest score first

Frame names are CVAT's for a video task: ``frame_%06d`` of the 0-based display index, so the zip imports
onto a task made from the same video ("Upload annotations", format "Segmentation mask 1.1"). Masks come
from the committed Parquet rows, colours and names from the model's checkpoint card.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dcfm import storage
from dcfm.errors import ConfigError
from dcfm.labels.committed import (
    METRIC_COLUMNS,
    ClassInfo,
    CommittedVideo,
    class_info,
    committed_videos,
    decode_mask,
    iter_frame_rows,
    iter_source_frames,
)
from dcfm.labels.files import staged_file
from dcfm.labels.review import FrameScore, frame_score, lowest, ranked_csv
from dcfm.progress import ProgressBar

FRAME_NAME = "frame_{:06d}"  # CVAT numbers a video task's frames from 0
BACKGROUND = "background"


@dataclass
class CvatExportConfig:
    """What `dcfm export cvat` exports; see the module docstring for the layout."""

    output: str  # a segment job's --output
    to: str  # directory or s3:// prefix for the zips
    video_ids: list[str] | None = None  # default: every committed video with status ok
    every: int = 1  # keep frames with index % every == 0
    review: int | None = None  # keep only the N lowest-scored of those, and write the ranked CSV
    images: bool = False  # also write the source frames (JPEGImages/), decoded as the job decodes them
    subset: str = "default"
    checkpoint: str | None = None  # default: the checkpoint the run manifest records

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("every", f"must be >= 1, got {self.every}")
        if self.review is not None and self.review < 1:
            raise ConfigError("review", f"must be >= 1, got {self.review}")
        if not self.subset or any(c in self.subset for c in "/\\\n"):
            raise ConfigError("subset", f"{self.subset!r}: a name without slashes or newlines")


@dataclass(frozen=True)
class ExportedVideo:
    video_id: str
    zip_uri: str
    frames: int
    review_csv: str | None


def labelmap(classes: ClassInfo) -> str:
    """labelmap.txt as CVAT writes it: the VOC ``background`` (black) first unless the model has one."""
    lines = ["# label:color_rgb:parts:actions"]
    if BACKGROUND not in classes.names:
        if (0, 0, 0) in classes.palette:
            raise ValueError("a class is coloured black, the colour of the layout's background; give the model "
                             "card another colour for it")
        lines.append(f"{BACKGROUND}:0,0,0::")
    for name, colour in zip(classes.names, classes.palette):
        if ":" in name or "\n" in name:
            raise ValueError(f"class name {name!r} contains ':' or a newline, which labelmap.txt cannot hold")
        lines.append(f"{name}:{','.join(str(c) for c in colour)}::")
    return "\n".join(lines) + "\n"


def colour_mask(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; an id the palette does not cover is an error, not a crash."""
    if mask.size and int(mask.max()) >= len(lut):
        raise ValueError(f"mask holds class {int(mask.max())} but the model card has {len(lut)} classes")
    return lut[mask]


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: the masks are flat colour regions, which compress almost as well at the fastest level.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def select_frames(video: CommittedVideo, every: int, review: int | None) -> tuple[set[int] | None, list[FrameScore]]:
    """Frames to export (None: every ``every``-th) and, with ``review``, the ranked review queue."""
    if review is None:
        return None, []
    scores = (frame_score(row) for row in iter_frame_rows(video, METRIC_COLUMNS) if row["frame_index"] % every == 0)
    ranked = lowest(scores, review)
    return {s.frame_index for s in ranked}, ranked


def export_video(video: CommittedVideo, classes: ClassInfo, config: CvatExportConfig,
                 on_frame: Callable[[], None] = lambda: None) -> ExportedVideo:
    """Write one video's zip (and review CSV) under ``config.to``."""
    keep, ranked = select_frames(video, config.every, config.review)
    lut = classes.lut()
    zip_uri = storage.join(config.to, f"{video.video_id}.zip")
    names: list[str] = []
    columns = ["mask_png"]
    sources = iter_source_frames(video) if config.images else None
    with staged_file(zip_uri, suffix=".zip") as local:
        with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_STORED) as archive:
            for row in iter_frame_rows(video, columns):
                index = row["frame_index"]
                frame = next(sources) if sources is not None else None
                if frame is not None and frame.index != index:  # only if the source was replaced meanwhile
                    raise ValueError(f"{video.video_uri}: decoded frame {frame.index} for mask {index}")
                on_frame()
                if index % config.every or (keep is not None and index not in keep):
                    continue
                name = FRAME_NAME.format(index)
                mask = decode_mask(row["mask_png"])
                archive.writestr(f"SegmentationClass/{name}.png", png_bytes(colour_mask(mask, lut)))
                if frame is not None:
                    buffer = io.BytesIO()
                    Image.fromarray(frame.rgb).save(buffer, format="JPEG", quality=92)
                    archive.writestr(f"JPEGImages/{name}.jpg", buffer.getvalue())
                names.append(name)
            archive.writestr("labelmap.txt", labelmap(classes))
            archive.writestr(f"ImageSets/Segmentation/{config.subset}.txt", "".join(f"{n}\n" for n in names))
        csv_uri = None
        if config.review is not None:
            # The CSV first: when the zip is there, its review queue is too.
            csv_uri = storage.join(config.to, f"{video.video_id}.review.csv")
            storage.write_bytes_atomic(csv_uri, ranked_csv(ranked, FRAME_NAME))
    return ExportedVideo(video.video_id, zip_uri, len(names), csv_uri)


def export_cvat(config: CvatExportConfig, log: Callable[[str], None] = print) -> list[ExportedVideo]:
    """Export every selected committed video; returns what was written."""
    log = storage.redacting(log)
    videos = committed_videos(config.output, config.video_ids)
    if not videos:
        log(f"[export] {config.output}: no committed video with status ok; nothing to export")
        return []
    classes = class_info(config.output, videos, config.checkpoint)
    total = sum(v.frame_count for v in videos)
    log(f"[export] {len(videos)} videos, {total} frames -> {config.to} (CVAT Segmentation mask 1.1, "
        f"{len(classes.names)} classes{', every ' + str(config.every) + 'th frame' if config.every > 1 else ''}"
        f"{', review queue of ' + str(config.review) if config.review else ''})")
    bar = ProgressBar("export", total)
    seen = 0
    results = []
    for number, video in enumerate(videos, start=1):
        def tick() -> None:
            nonlocal seen
            seen += 1
            bar.update(seen, extra=f"{number - 1}/{len(videos)} videos")
        result = export_video(video, classes, config, tick)
        bar.close()
        log(f"[export] {video.video_id}: {result.frames} frames -> {result.zip_uri}"
            f"{'; review queue ' + result.review_csv if result.review_csv else ''}")
        results.append(result)
    return results

