"""Turn what the user typed (files, folders, globs, S3 prefixes, manifests) into a list of videos.

Input forms, local or on any fsspec filesystem (``s3://...``):

* an existing file — taken as is, whatever its extension (the user named it);
* a directory / S3 prefix — every file below it (recursive) with a video extension, hidden names skipped;
* a glob (``data/*.mp4``, ``s3://bucket/raw/**/*.mkv``) — matching files with a video extension;
* a manifest: ``*.txt`` (one URI per line, ``#`` comments and blank lines ignored) or ``*.parquet`` (a
  ``uri`` column, optional ``video_id`` column). Relative entries are relative to the manifest's own
  directory. Entries are taken verbatim, without touching storage, so a manifest of a million S3 keys
  costs one read.

A named file that does not exist is kept: the job records the failure for that one input instead of
refusing the whole batch. A directory, prefix, glob or manifest that yields nothing is a usage error
(``ValueError``), and so is a missing path that does not look like a file (trailing ``/`` or no
extension), since that is almost always a typo in a folder name.

Video ids: ``<stem>-<8 hex of sha1(uri)>``, e.g. ``clip-3f2a9c1b``. The stem keeps only
``[A-Za-z0-9._-]`` (others become ``_``; leading ``.``/``_``/``-`` are dropped because readers skip
hidden/underscore files; at most 64 characters), so the id is safe as a Hive partition value
(``video_id=clip-3f2a9c1b``) and as a file name; the hash of the full URI keeps two ``clip.mp4`` in
different folders apart. Ids are stable for a given URI — local URIs are absolute paths, so moving a
local dataset changes its ids.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dcfm import storage

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts")
MANIFEST_EXTENSIONS: tuple[str, ...] = (".txt", ".parquet")

_GLOB_MAGIC = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ID_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STEM_MAX = 64


@dataclass(frozen=True)
class InputItem:
    """One video to process: where it is and the id its outputs are filed under."""

    uri: str
    video_id: str


def video_id_for(uri: str) -> str:
    """The stable, partition-safe id of ``uri``: sanitised stem + 8 hex chars of sha1(uri)."""
    name = posixpath.basename(uri.rstrip("/")) if "://" in uri else os.path.basename(uri.rstrip(os.sep))
    stem = posixpath.splitext(name)[0]
    stem = _UNSAFE.sub("_", stem).lstrip("._-")[:_STEM_MAX] or "video"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def expand_inputs(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> list[InputItem]:
    """Expand files, directories, globs, S3 prefixes and manifests into unique videos, in input order.

    Deduplicated by URI (first occurrence wins); each directory/prefix/glob contributes its matches in
    sorted order. Raises ValueError for an input that yields no videos.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not inputs:
        raise ValueError("no inputs given; pass video files, directories, globs, s3:// prefixes or a manifest")
    items: dict[str, InputItem] = {}
    for raw in inputs:
        for uri, given_id in _expand_one(os.fspath(raw), exts):
            if uri not in items:
                items[uri] = InputItem(uri, given_id or video_id_for(uri))
    _check_unique_ids(items.values())
    return list(items.values())


def _check_unique_ids(items: Iterable[InputItem]) -> None:
    # Only manifest-supplied ids can collide in practice; two inputs sharing one would overwrite each
    # other's partition.
    seen: dict[str, str] = {}
    for item in items:
        other = seen.setdefault(item.video_id, item.uri)
        if other != item.uri:
            raise ValueError(
                f"video_id {item.video_id!r} is used for both {other} and {item.uri}; "
                "give each row of the manifest its own video_id"
            )


def _is_remote(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _normalise_local(spec: str) -> str:
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    return os.path.abspath(os.path.expanduser(spec))


def _has_video_ext(path: str, exts: tuple[str, ...]) -> bool:
    return path.lower().endswith(exts)


def _looks_like_file(spec: str) -> bool:
    return not spec.endswith("/") and bool(posixpath.splitext(posixpath.basename(spec))[1])


def _no_match(spec: str, what: str, exts: tuple[str, ...]) -> ValueError:
    return ValueError(
        f"{spec}: {what} (video extensions: {', '.join(exts)}). Check the path, point at the folder or "
        "prefix that holds the videos, use a glob such as 'videos/**/*.mp4', name files explicitly, or "
        "list them in a .txt/.parquet manifest."
    )


def _expand_one(spec: str, exts: tuple[str, ...]) -> list[tuple[str, str | None]]:
    if _is_remote(spec):
        return _expand_remote(spec, exts)
    return _expand_local(spec, exts)


def _expand_local(spec: str, exts: tuple[str, ...]) -> list[tuple[str, str | None]]:
    path = _normalise_local(spec)
    if os.path.isfile(path):
        if path.lower().endswith(MANIFEST_EXTENSIONS):
            return _read_manifest(path, spec)
        return [(path, None)]
    if os.path.isdir(path):
        found = sorted(_walk_local(path, exts))
        if not found:
            raise _no_match(spec, "directory contains no video files", exts)
        return [(p, None) for p in found]
    if _GLOB_MAGIC.search(spec):
        matches = globlib.glob(os.path.expanduser(spec), recursive=True)
        files = sorted({os.path.abspath(m) for m in matches if os.path.isfile(m) and _has_video_ext(m, exts)})
        if not files:
            detail = f"glob matched {len(matches)} path(s), none a video file" if matches else "glob matches nothing"
            raise _no_match(spec, detail, exts)
        return [(p, None) for p in files]
    return _missing(spec, path, exts)


def _missing(spec: str, uri: str, exts: tuple[str, ...]) -> list[tuple[str, str | None]]:
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        raise ValueError(f"{spec}: manifest not found; check the path")
    if _looks_like_file(spec):
        return [(uri, None)]  # the job reports it as a failed input
    raise _no_match(spec, "no such file, directory or prefix", exts)


def _walk_local(root: str, exts: tuple[str, ...]) -> Iterable[str]:
    # Follow symlinked folders (datasets are often linked in) but never visit a real directory twice,
    # which also stops symlink loops.
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            # Hidden names include macOS "._clip.mp4" resource forks, which are not videos.
            if not name.startswith(".") and _has_video_ext(name, exts):
                yield os.path.join(dirpath, name)


def _expand_remote(spec: str, exts: tuple[str, ...]) -> list[tuple[str, str | None]]:
    fs, path = storage.filesystem(spec)
    fs.invalidate_cache()  # s3fs caches listings per instance; inputs may have been written since
    if _GLOB_MAGIC.search(path):
        matches = fs.glob(path, detail=True)
        files = sorted(
            p for p, info in matches.items() if info.get("type") == "file" and _is_visible_video(p, exts)
        )
        if not files:
            detail = f"glob matched {len(matches)} object(s), none a video file" if matches else "glob matches nothing"
            raise _no_match(spec, detail, exts)
        return [(fs.unstrip_protocol(p), None) for p in files]
    kind = None
    if not spec.endswith("/"):
        try:
            kind = fs.info(path).get("type")
        except FileNotFoundError:
            pass
    if kind == "file":
        if path.lower().endswith(MANIFEST_EXTENSIONS):
            return _read_manifest(spec, spec, fs=fs, fs_path=path)
        return [(spec, None)]
    if kind == "directory" or spec.endswith("/"):
        found = sorted(
            p
            for p, info in fs.find(path.rstrip("/"), detail=True).items()
            if info.get("type") == "file" and _is_visible_video(p, exts)
        )
        if not found:
            raise _no_match(spec, "prefix holds no video files", exts)
        return [(fs.unstrip_protocol(p), None) for p in found]
    return _missing(spec, spec, exts)


def _is_visible_video(path: str, exts: tuple[str, ...]) -> bool:
    parts = path.split("/")[1:]  # the first part is the bucket
    return _has_video_ext(path, exts) and not any(part.startswith(".") for part in parts)


def _read_manifest(
    uri: str,
    spec: str,
    fs: fsspec.AbstractFileSystem | None = None,
    fs_path: str | None = None,
) -> list[tuple[str, str | None]]:
    if fs is None or fs_path is None:
        fs, fs_path = storage.filesystem(uri)
    if fs_path.lower().endswith(".parquet"):
        rows = _parquet_rows(fs, fs_path, spec)
    else:
        text = fs.cat_file(fs_path).decode("utf-8-sig")
        rows = [(line.strip(), None) for line in text.splitlines()]
        rows = [(entry, None) for entry, _ in rows if entry and not entry.startswith("#")]
    if not rows:
        raise ValueError(f"{spec}: manifest lists no inputs; add one video path or URI per line/row")
    remote_base = None if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(posixpath.dirname(fs_path))
    local_base = os.path.dirname(fs_path) if remote_base is None else None
    return [(_resolve_entry(entry, local_base, remote_base), vid) for entry, vid in rows]


def _parquet_rows(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> list[tuple[str, str | None]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if "uri" not in names:
            raise ValueError(f"{spec}: parquet manifest needs a 'uri' column (has: {', '.join(names)})")
        columns = ["uri", "video_id"] if "video_id" in names else ["uri"]
        table = parquet.read(columns=columns)
    uris = table.column("uri").to_pylist()
    ids = table.column("video_id").to_pylist() if "video_id" in columns else [None] * len(uris)
    rows: list[tuple[str, str | None]] = []
    for row, (entry, vid) in enumerate(zip(uris, ids)):
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{spec}: row {row} has no uri")
        if vid is not None:
            vid = str(vid)
            if not _ID_SAFE.fullmatch(vid):
                raise ValueError(
                    f"{spec}: row {row} video_id {vid!r} is not partition-safe; use only letters, digits, "
                    "'.', '_' and '-', starting with a letter or digit (or drop the column to derive ids)"
                )
        rows.append((entry.strip(), vid))
    return rows


def _resolve_entry(entry: str, local_base: str | None, remote_base: str | None) -> str:
    if _is_remote(entry):
        return entry
    if entry.startswith(("file://", "~")) or os.path.isabs(entry):
        return _normalise_local(entry)
    if remote_base is not None:
        scheme, rest = remote_base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    assert local_base is not None
    return os.path.abspath(os.path.join(local_base, entry))
