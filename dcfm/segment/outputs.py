"""Output layout, Parquet writing and the per-video commit protocol.

    OUT/frames/video_id=<id>/part-<chunk>.parquet   one row per frame
    OUT/videos/video_id=<id>/part-0.parquet         one row per input
    OUT/errors/video_id=<id>/part-0.parquet         one row per failure
    OUT/_commits/<id>.json                          the commit marker, written last
    OUT/runs/<run_id>/<started>.json                one manifest per invocation that did work
    OUT/_staging/<run_id>/<id>/part-<chunk>.parquet chunks written by actors before their video commits
    OUT/_staging/<run_id>/<id>/part-<chunk>.json    the chunk's summary, written after its Parquet file

Actors write chunks to staging. When every chunk of a video has reported, the driver moves them into
``frames/``, writes the ``videos/`` (and ``errors/``) rows, then the marker. Resume and readers trust only
videos with a marker; before a video is (re)processed, whatever an interrupted run left of it is removed,
except the chunks that run staged in full (summary present): the same run id means the same rows, so a
rerun reuses them and computes only the missing chunks.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dcfm import storage
from dcfm.schemas import output_schema

MARKER_FORMAT = "dcfm-segment-commit/1"


def table_for(schema_name: str, rows: dict[str, list]) -> pa.Table:
    """Build a table for the file schema of ``schema_name`` (partition columns dropped); validates types."""
    schema = output_schema(schema_name).file_schema
    return pa.Table.from_pydict({name: rows[name] for name in schema.names}, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    # One row group per chunk file keeps files self-contained; zstd compresses PNG-heavy rows little but
    # the numeric columns well.
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass(frozen=True)
class OutputLayout:
    root: str

    def frames_dir(self, video_id: str) -> str:
        return storage.join(self.root, "frames", f"video_id={video_id}")

    def frames_file(self, video_id: str, chunk: int) -> str:
        return storage.join(self.frames_dir(video_id), f"part-{chunk:05d}.parquet")

    def videos_dir(self, video_id: str) -> str:
        return storage.join(self.root, "videos", f"video_id={video_id}")

    def errors_dir(self, video_id: str) -> str:
        return storage.join(self.root, "errors", f"video_id={video_id}")

    def marker(self, video_id: str) -> str:
        return storage.join(self.root, "_commits", f"{video_id}.json")

    def staging_dir(self, run_id: str, video_id: str) -> str:
        return storage.join(self.root, "_staging", run_id, video_id)

    def staging_file(self, run_id: str, video_id: str, chunk: int) -> str:
        return storage.join(self.staging_dir(run_id, video_id), f"part-{chunk:05d}.parquet")

    def staging_summary(self, run_id: str, video_id: str, chunk: int) -> str:
        return storage.join(self.staging_dir(run_id, video_id), f"part-{chunk:05d}.json")

    def staging_root(self, run_id: str) -> str:
        return storage.join(self.root, "_staging", run_id)

    def run_manifest(self, run_id: str, started: str) -> str:
        return storage.join(self.root, "runs", run_id, f"{started}.json")

    # --- state ---------------------------------------------------------------------------------------------
    def committed(self) -> dict[str, dict[str, Any]]:
        """video_id -> marker contents, for every committed video: one listing, then the markers read
        concurrently (fsspec's ``cat`` of many paths batches them on object stores)."""
        fs, path = storage.filesystem(storage.join(self.root, "_commits"))
        try:
            names = [n for n in fs.ls(path, detail=False) if n.endswith(".json")]
        except FileNotFoundError:
            return {}
        markers = {}
        for data in fs.cat(names, on_error="raise").values() if names else ():
            marker = json.loads(data)
            markers[marker["video_id"]] = marker
        return markers

    def clear_videos(self, video_ids: list[str], run_id: str, committed: set[str], keep_staged: bool) -> None:
        """Remove whatever earlier runs left of these videos before they are (re)processed.

        Markers go first (``committed``: the ids that have one), so a crash midway leaves the video
        uncommitted. One listing per output directory instead of existence checks per video; removals are
        batched. ``keep_staged``: keep this run's staged chunks for reuse.
        """
        wanted = set(video_ids)
        markers = [storage.filesystem(self.marker(v))[1] for v in sorted(wanted & committed)]
        fs, _ = storage.filesystem(self.root)
        if markers:
            fs.rm(markers)
        stale = []
        for top in ("frames", "videos", "errors"):
            stale += [p for p in _listing(storage.join(self.root, top))
                      if p.rsplit("/", 1)[-1].removeprefix("video_id=") in wanted]
        if not keep_staged:
            stale += [p for p in _listing(self.staging_root(run_id)) if p.rsplit("/", 1)[-1] in wanted]
        if stale:
            fs.rm(stale, recursive=True)

    # --- commit --------------------------------------------------------------------------------------------
    def commit_video(
        self,
        video_id: str,
        run_id: str,
        staged_chunks: list[int],
        video_row: dict[str, Any],
        error_rows: list[dict[str, Any]],
    ) -> None:
        """Publish a finished video: frames (if it succeeded), its videos/errors rows, then the marker.
        Safe to call again after a failure midway (the job retries it on transient storage failures)."""
        for chunk in staged_chunks:
            fs, src = storage.filesystem(self.staging_file(run_id, video_id, chunk))
            _, dst = storage.filesystem(self.frames_file(video_id, chunk))
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            try:
                fs.mv(src, dst)
            except FileNotFoundError:
                if not fs.exists(dst):
                    raise
                # moved by an earlier attempt of this commit that a storage failure interrupted: retried
        storage.write_bytes_atomic(
            storage.join(self.videos_dir(video_id), "part-0.parquet"),
            parquet_bytes(table_for("videos", {k: [v] for k, v in video_row.items()})),
        )
        if error_rows:
            columns = {k: [row[k] for row in error_rows] for k in error_rows[0]}
            storage.write_bytes_atomic(
                storage.join(self.errors_dir(video_id), "part-0.parquet"), parquet_bytes(table_for("errors", columns))
            )
        marker = {
            "format": MARKER_FORMAT,
            "video_id": video_id,
            "video_uri": video_row["video_uri"],
            "status": video_row["status"],
            "run_id": run_id,
            "model_digest": video_row["model_digest"],
            "frame_files": [self.frames_file(video_id, c).rsplit("/", 1)[-1] for c in staged_chunks],
        }
        storage.write_bytes_atomic(self.marker(video_id), json.dumps(marker, indent=2, sort_keys=True).encode())
        self.discard_staging(run_id, video_id)

    def discard_staging(self, run_id: str, video_id: str) -> None:  # noqa: D102
        fs, path = storage.filesystem(self.staging_dir(run_id, video_id))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _listing(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    try:
        return [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
