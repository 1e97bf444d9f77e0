"""Output layout, Parquet writing and the per-video commit protocol.

    OUT/frames/video_id=<id>/part-<chunk>.parquet   one row per frame
    OUT/videos/video_id=<id>/part-0.parquet         one row per input
    OUT/errors/video_id=<id>/part-0.parquet         one row per failure
    OUT/_commits/<id>.json                          the commit marker, written last (one JSON line)
    OUT/_commits_index.ndjson.gz                    on S3: every marker's line (a cache, see ``committed``)
    OUT/_lease.json                                 the running job's lease (dcfm.segment.lease)
    OUT/runs/<run_id>/<started>.json                one manifest per invocation that did work
    OUT/_staging/<run_id>/<id>/part-<chunk>.parquet chunks written by actors before their video commits
    OUT/_staging/<run_id>/<id>/part-<chunk>.json    the chunk's summary, written after its Parquet file

Actors write chunks to staging. When every chunk of a video has reported, the driver moves them into
``frames/``, writes the ``videos/`` (and ``errors/``) rows, then the marker. Readers trust only videos with
a marker (the README's queries join on ``_commits/``); resume trusts a marker only while the files it names
(its ``frame_files`` and the ``videos/`` row) exist. Before a video is (re)processed, whatever an interrupted
run left of it is removed, except the chunks that run staged in full (summary present): the same run id
means the same rows, so a rerun reuses them and computes only the missing chunks. Only the holder of the
output's lease writes or removes anything here, so no run removes another live run's files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dcfm import storage
from dcfm.schemas import output_schema

MARKER_FORMAT = "dcfm-segment-commit/1"
# Every marker's line in one object, a cache that saves a rerun one GET per marker (OutputLayout.committed).
# Not under _commits/, so readers' globs of the markers never see it.
COMMIT_INDEX = "_commits_index.ndjson.gz"
# A listed key costs the client about a tenth of what a request does (parsing its XML entry against signing,
# sending and parsing a request: 0.35 ms against ~3 ms in the client and SeaweedFS on 2 cores, BENCHMARKS.md),
# so a recursive listing pays off while it lists fewer than this many extra keys per request it saves.
KEYS_PER_REQUEST = 10


class Committed(dict[str, dict[str, Any]]):
    """video_id -> commit marker (``OutputLayout.committed``), and how many markers had to be read one by one
    although the store could have served them from the commit index (0 where listings carry no ETags)."""

    read_one_by_one: int = 0


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

    def commit_index(self) -> str:
        return storage.join(self.root, COMMIT_INDEX)

    # --- state ---------------------------------------------------------------------------------------------
    def committed(self) -> Committed:
        """video_id -> marker contents, for every committed video (read only: the job refreshes the index).

        One listing of ``_commits/``. On an object store whose listing gives each marker's ETag (the MD5 of a
        single-PUT object), a marker whose line in the commit index has that MD5 is taken from the index: its
        bytes are the marker's. The rest are read, concurrently (fsspec's ``cat`` of many paths), and counted in
        ``Committed.read_one_by_one`` where an index could have saved them. The markers stay the source of
        truth: a marker rewritten, added or removed since the index was written is read (or left out) as it
        is now.
        """
        fs, path = storage.filesystem(storage.join(self.root, "_commits"))
        try:
            listed = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return Committed()
        etags = {info["name"]: _etag(info) for info in listed if info["name"].endswith(".json")}
        indexable = any(etags.values())  # the store's listings carry content hashes
        index = self._read_index() if indexable else {}
        markers, fetch = Committed(), []
        for name, etag in etags.items():
            line = index.get(name.rsplit("/", 1)[-1][: -len(".json")])
            if etag is not None and line is not None and hashlib.md5(line, usedforsecurity=False).hexdigest() == etag:
                marker = json.loads(line)
                markers[marker["video_id"]] = marker
            else:
                fetch.append(name)
        for data in fs.cat(fetch, on_error="raise").values() if fetch else ():
            marker = json.loads(data)
            markers[marker["video_id"]] = marker
        if indexable:
            markers.read_one_by_one = len(fetch)
        return markers

    def write_commit_index(self, markers: dict[str, dict[str, Any]]) -> None:
        """Write the commit index: every marker's line, as ``commit_video`` writes it (gzip, one object), so a
        rerun takes unchanged markers from one GET instead of one each. A cache, checked marker by marker
        against the listing's ETags: stale entries are never trusted. Only on stores whose listings give
        ETags; only by the holder of the output's lease."""
        fs, _ = storage.filesystem(self.root)
        if not storage.is_s3(fs):
            return
        data = b"".join(marker_bytes(markers[video_id]) for video_id in sorted(markers))
        storage.write_bytes_atomic(self.commit_index(), gzip.compress(data, compresslevel=3, mtime=0))

    def _read_index(self) -> dict[str, bytes]:
        """video_id -> its marker's line from the commit index ({} when there is none or it is unreadable: the
        index only saves reads, so a damaged one costs them and nothing else)."""
        try:
            data = gzip.decompress(storage.read_bytes(self.commit_index()))
        except (FileNotFoundError, OSError, EOFError):
            return {}
        lines = {}
        for line in data.splitlines(keepends=True):
            try:
                lines[json.loads(line)["video_id"]] = line
            except (ValueError, KeyError, TypeError):
                continue
        return lines

    def marker_files(self, marker: dict[str, Any]) -> list[str]:
        """The files a commit marker vouches for: its frame files and the video's ``videos/`` row."""
        video_id = marker["video_id"]
        return [*(storage.join(self.frames_dir(video_id), name) for name in marker.get("frame_files", [])),
                storage.join(self.videos_dir(video_id), "part-0.parquet")]

    def missing_files(self, markers: list[dict[str, Any]], concurrency: int = 16,
                      committed: list[dict[str, Any]] | None = None,
                      recursive: bool | None = None) -> dict[str, list[str]]:
        """video_id -> the files its marker lists that do not exist (videos with all their files left out).

        Either one fresh listing per directory, ``concurrency`` at a time (two requests per video on an object
        store however many chunks it has), or one recursive listing each of ``frames/`` and ``videos/``
        (up to 1,000 files a request on S3). The recursive one also lists the files of videos not asked about, which
        ``committed`` (every marker of the output; default ``markers``) tells: it is taken (``recursive`` None)
        while those extra files are fewer than ``KEYS_PER_REQUEST`` per directory it saves listing, so a rerun of
        a few videos of a large archive still lists only their directories.
        """
        wanted: dict[str, list[tuple[str, str]]] = defaultdict(list)  # directory -> (video_id, file name)
        for marker in markers:
            for uri in self.marker_files(marker):
                directory, name = uri.rsplit("/", 1)
                wanted[directory].append((marker["video_id"], name))
        if not wanted:
            return {}
        if recursive is None:
            everything = markers if committed is None else committed
            files = sum(len(m.get("frame_files", ())) + 1 for m in everything)
            recursive = files - sum(map(len, wanted.values())) <= KEYS_PER_REQUEST * len(wanted)
        if recursive:
            present = self._files_under(("frames", "videos"))
        else:
            present = self._files_in(sorted(wanted), concurrency)
        missing: dict[str, list[str]] = defaultdict(list)
        for directory, files in wanted.items():
            names = present.get(directory, ())
            for video_id, name in files:
                if name not in names:
                    missing[video_id].append(f"{directory}/{name}")
        return dict(missing)

    def _files_in(self, directories: list[str], concurrency: int) -> dict[str, set[str]]:
        """directory URI -> names of the files in it: one fresh listing each, ``concurrency`` at a time."""
        fs, _ = storage.filesystem(self.root)

        def names(directory: str) -> set[str]:
            try:
                listed = fs.ls(storage.filesystem(directory)[1], detail=False, refresh=True)
            except FileNotFoundError:
                return set()
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in listed}

        with ThreadPoolExecutor(max_workers=min(concurrency, len(directories))) as pool:
            return dict(zip(directories, pool.map(names, directories)))

    def _files_under(self, tops: tuple[str, ...]) -> dict[str, set[str]]:
        """directory URI -> names of the files in it, for every directory below ``tops``: one recursive listing
        of each top directory (paginated by the client on object stores), the tops listed concurrently."""
        _, root_path = storage.filesystem(self.root)
        root_path, root_uri = root_path.rstrip("/"), self.root.rstrip("/")

        def find(top: str) -> list[str]:
            return storage.find_files(storage.join(self.root, top))

        present: dict[str, set[str]] = defaultdict(set)
        with ThreadPoolExecutor(max_workers=len(tops)) as pool:
            for files in pool.map(find, tops):
                for file in files:
                    directory, name = file.rsplit("/", 1)
                    if directory.startswith(root_path):
                        present[root_uri + directory[len(root_path):]].add(name)
        return present

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
    ) -> dict[str, Any]:
        """Publish a finished video: frames (if it succeeded), its videos/errors rows, then the marker; returns
        the marker. Safe to call again after a failure midway (the job retries it on transient storage
        failures)."""
        # Actors (other processes) wrote these files: a listing of the staging directory that this process's
        # object-store client cached earlier (s3fs keeps listings without expiry) would make a staged chunk look
        # missing.
        fs, staging = storage.filesystem(self.staging_dir(run_id, video_id))
        fs.invalidate_cache(staging)
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
        marker = self.marker_record(video_id, run_id, staged_chunks, video_row)
        storage.write_bytes_atomic(self.marker(video_id), marker_bytes(marker))
        self.discard_staging(run_id, video_id)
        return marker

    def marker_record(self, video_id: str, run_id: str, chunks: list[int], video_row: dict[str, Any]) -> dict[str, Any]:
        """The commit marker of a video whose frame files are ``chunks``."""
        return {
            "format": MARKER_FORMAT,
            "video_id": video_id,
            "video_uri": video_row["video_uri"],
            "status": video_row["status"],
            "run_id": run_id,
            "model_digest": video_row["model_digest"],
            "frame_files": [self.frames_file(video_id, c).rsplit("/", 1)[-1] for c in chunks],
        }

    def discard_staging(self, run_id: str, video_id: str) -> None:  # noqa: D102
        fs, path = storage.filesystem(self.staging_dir(run_id, video_id))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def marker_bytes(marker: dict[str, Any]) -> bytes:
    """A marker as stored: one JSON line, so the markers of an output read as newline-delimited JSON (the
    README's Polars query)."""
    return json.dumps(marker, sort_keys=True).encode() + b"\n"


def _etag(info: dict[str, Any]) -> str | None:
    """The MD5 of a listed object's content, where the listing says it: an S3 ETag of a single-part upload
    without KMS encryption (markers are tiny single PUTs); None otherwise (then the marker is read)."""
    etag = str(info.get("ETag") or "").strip('"')
    return etag if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None


def _listing(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    try:
        # Fresh: actors in other processes write below these directories after this process may have listed them.
        return [p.rstrip("/") for p in fs.ls(path, detail=False, refresh=True)]
    except FileNotFoundError:
        return []
