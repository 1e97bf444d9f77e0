"""Constructed segment outputs for the dcfm.labels tests: known masks and metrics, the job's own commit path."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.model import DCFM, DCFMConfig
from dcfm.schemas import output_schema
from dcfm.segment.outputs import OutputLayout, parquet_bytes, table_for

RUN_ID = "constructed-run"


@dataclass
class Frame:
    mask: np.ndarray
    confidence: float
    label_change_rate: float | None = None
    keyframe_agreement: float | None = None
    is_keyframe: bool = False


def save_model(path: str, names: list[str], palette: list[tuple[int, int, int]]) -> str:
    """A tiny checkpoint whose card carries ``names`` and ``palette``; returns its weights digest."""
    config = DCFMConfig("pvt_v2_b0", num_classes=len(names))
    return save_checkpoint(path, DCFM(config).eval(), ModelCard(config, names, palette, (32, 64)))


def write_output(root: str, checkpoint: str, digest: str, videos: dict[str, list[Frame]],
                 uris: dict[str, str] | None = None, chunk_frames: int = 4, failed: dict[str, str] | None = None) -> None:
    """Commit ``videos`` into ``root`` as the segment job would (staging, move, rows, marker) plus a manifest."""
    layout = OutputLayout(root)
    for video_id, frames in videos.items():
        uri = (uris or {}).get(video_id, f"/videos/{video_id}.mp4")
        chunks = []
        for chunk, start in enumerate(range(0, len(frames), chunk_frames)):
            rows: dict[str, list] = {name: [] for name in output_schema("frames").file_schema.names}
            for index in range(start, min(start + chunk_frames, len(frames))):
                frame = frames[index]
                height, width = frame.mask.shape
                row = {"video_id": video_id, "video_uri": uri, "frame_index": index, "timestamp_s": index / 10,
                       "is_keyframe": frame.is_keyframe, "keyframes": [index], "height": height, "width": width,
                       "mask_height": height, "mask_width": width, "mask_png": encode_mask(frame.mask),
                       "class_pixels": class_pixels(frame.mask), "confidence": frame.confidence,
                       "label_change_rate": frame.label_change_rate, "keyframe_agreement": frame.keyframe_agreement,
                       "run_id": RUN_ID, "model_digest": digest}
                for name in rows:
                    rows[name].append(row[name])
            storage.write_bytes_atomic(layout.staging_file(RUN_ID, video_id, chunk),
                                       parquet_bytes(table_for("frames", rows)))
            chunks.append(chunk)
        height, width = frames[0].mask.shape
        video_row = {"video_id": video_id, "video_uri": uri, "status": "ok", "error": None,
                     "frame_count": len(frames), "fps": 10.0, "codec": "h264", "width": width, "height": height,
                     "duration_s": len(frames) / 10, "chunks": len(chunks),
                     "keyframes": sum(f.is_keyframe for f in frames),
                     "mean_confidence": float(np.mean([f.confidence for f in frames])),
                     "mean_label_change_rate": None, "mean_keyframe_agreement": None, "seconds": 1.0,
                     "run_id": RUN_ID, "model_digest": digest, "warning": None}
        layout.commit_video(video_id, RUN_ID, chunks, video_row, [])
    for video_id, message in (failed or {}).items():
        row = {"video_id": video_id, "video_uri": f"/videos/{video_id}.mp4", "status": "failed", "error": message,
               "frame_count": None, "fps": None, "codec": None, "width": None, "height": None, "duration_s": None,
               "chunks": 0, "keyframes": None, "mean_confidence": None, "mean_label_change_rate": None,
               "mean_keyframe_agreement": None, "seconds": 0.0, "run_id": RUN_ID, "model_digest": digest,
               "warning": None}
        error = {"video_id": video_id, "video_uri": row["video_uri"], "chunk_index": None, "stage": "open",
                 "error_type": "VideoError", "message": message, "run_id": RUN_ID, "detail": None}
        layout.commit_video(video_id, RUN_ID, [], row, [error])
    manifest = {"format": "dcfm-segment-run/1", "run_id": RUN_ID, "started": "2026-01-01T00:00:00+00:00",
                "config": {"checkpoint": checkpoint, "chunk_frames": chunk_frames},
                "counts": {"inputs": len(videos), "ok": len(videos), "failed": len(failed or {})},
                "timings": {"seconds": 1.5, "frames_per_second": 10.0, "startup_s": 0.5, "actor_s": {}}}
    storage.write_bytes_atomic(layout.run_manifest(RUN_ID, "20260101T000000000000Z"), json.dumps(manifest).encode())


def encode_mask(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def class_pixels(mask: np.ndarray) -> list[dict[str, int]]:
    counts = np.bincount(mask.ravel())
    return [{"class_id": int(c), "pixels": int(counts[c])} for c in np.flatnonzero(counts)]


def png_mask(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))
