"""Turn what the user typed (files, folders, globs, S3 prefixes, manifests) into a list of videos.

Input forms, local or on any fsspec filesystem (``s3://...``):

* an existing file — taken as is, whatever its extension (the user named it);
* a directory / S3 prefix — every file below it (recursive) with a video extension (``VIDEO_EXTENSIONS``,
  any case, or the caller's ``extensions``), hidden names skipped;
* a glob (``data/*.mp4``, ``s3://bucket/raw/**/*.mkv``) — matching files with a video extension;

Files a directory, prefix or glob holds but that are not taken (another extension, a hidden name) are
counted, with a few examples, in ``ExpandedInputs.skipped``: the job logs and records them, so an archive of
an unexpected container is never silently empty.
* a manifest: ``*.txt`` (one URI per line, ``#`` comments and blank lines ignored) or ``*.parquet`` (a
  ``uri`` column, optional ``video_id`` column). Relative entries are relative to the manifest's own
  directory. Entries are taken verbatim, without touching storage, so a manifest of a million S3 keys
  costs one read.

Inputs may be local paths and ``s3://`` URIs; any other protocol (``http``, ``gs``, ...), named on the command
line or in a manifest, is refused (``InputError``) unless ``protocols`` allows it: a manifest written by
someone else must not make the workers fetch internal URLs.

A named file that does not exist is kept: the job records the failure for that one input instead of
refusing the whole batch. A directory, prefix, glob or manifest that yields nothing is a usage error
(``InputError``), and so is a missing path that does not look like a file (trailing ``/`` or no
extension), since that is almost always a typo in a folder name.

Video ids: ``<stem>-<8 hex of sha1(uri)>``, e.g. ``clip-3f2a9c1b``. The stem keeps only
``[A-Za-z0-9._-]`` (others become ``_``; leading ``.``/``_``/``-`` are dropped because readers skip
hidden/underscore files; at most 64 characters), so the id is safe as a Hive partition value
(``video_id=clip-3f2a9c1b``) and as a file name; the hash of the URI (``storage.redact``-ed, so a re-signed
presigned URL keeps its id and no secret feeds it) keeps two ``clip.mp4`` in different folders apart. Ids are
stable for a given URI — local URIs are absolute paths, so moving a local dataset changes its ids.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dcfm import storage
from dcfm.errors import InputError
from dcfm.storage import redact

# The containers archives hold: MPEG program/transport streams (DVD, Blu-ray/AVCHD, broadcast), MXF, QuickTime
# and MP4, Matroska/WebM, AVI, Windows Media, Flash, 3GPP, Ogg. Matched case-insensitively.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mpg", ".mpeg", ".m2v", ".vob", ".ts", ".m2ts", ".mts", ".mxf", ".mov", ".mp4", ".m4v", ".mkv", ".webm",
    ".avi", ".wmv", ".asf", ".flv", ".3gp", ".ogv",
)
MANIFEST_EXTENSIONS: tuple[str, ...] = (".txt", ".parquet")
# Always allowed: local paths ("file") and S3. Others only when the caller names them (--allow-protocols).
DEFAULT_PROTOCOLS: tuple[str, ...] = ("file", "s3")
SKIPPED_EXAMPLES = 5  # skipped files named in the log, summary and manifest

_GLOB_MAGIC = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ID_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_STEM_MAX = 64


@dataclass(frozen=True)
class InputItem:
    """One video to process: where it is and the id its outputs are filed under."""

    uri: str
    video_id: str


@dataclass
class ExpandedInputs:
    """The videos to process, and what the directories, prefixes and globs held besides them."""

    items: list[InputItem]
    skipped: int = 0  # files found but not taken: another extension, or a hidden name
    skipped_examples: list[str] = field(default_factory=list)  # the first SKIPPED_EXAMPLES of them, redacted

    def skipped_note(self) -> str:
        """One line for the log, or "" when nothing was skipped."""
        if not self.skipped:
            return ""
        return (f"skipped {self.skipped} file(s) without a video extension or with a hidden name, e.g. "
                f"{', '.join(self.skipped_examples)}; --extensions changes which extensions are taken")


def normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """``mp4``, ``.MP4`` -> ``.mp4``; refuses an empty list or an empty extension."""
    exts = tuple(e.strip().lower() if e.strip().startswith(".") else f".{e.strip().lower()}" for e in extensions)
    if not exts or any(len(e) < 2 for e in exts):
        raise InputError(f"extensions {list(extensions)!r}: give at least one, e.g. --extensions mp4,mkv,mxf")
    return exts


def protocol_of(uri: str) -> str:
    """``s3``, ``http``, ... of a URI; ``file`` for a local path or ``file://`` URI."""
    return uri.split("://", 1)[0].lower() if _is_remote(uri) else "file"


def video_id_for(uri: str) -> str:
    """The stable, partition-safe id of ``uri``: sanitised stem + 8 hex chars of sha1(redacted uri)."""
    shown = redact(uri)
    if "://" in shown:
        name = posixpath.basename(shown.rstrip("/"))
    else:
        name = os.path.basename(shown.rstrip(os.sep))
    stem = posixpath.splitext(name)[0]
    stem = _UNSAFE.sub("_", stem).lstrip("._-")[:_STEM_MAX] or "video"
    return f"{stem}-{hashlib.sha1(shown.encode()).hexdigest()[:8]}"


def expand_inputs(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
) -> list[InputItem]:
    """The videos of ``scan_inputs`` (see there)."""
    return scan_inputs(inputs, extensions, protocols).items


def scan_inputs(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
) -> ExpandedInputs:
    """Expand files, directories, globs, S3 prefixes and manifests into unique videos, in input order.

    Deduplicated by URI (first occurrence wins); each directory/prefix/glob contributes its matches in
    sorted order. ``protocols``: those allowed besides local paths and s3. Raises InputError for an input
    that yields no videos or whose protocol is not allowed.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise InputError("no inputs given; pass video files, directories, globs, s3:// prefixes or a manifest")
    scan = _Scan(normalise_extensions(extensions), frozenset(p.lower() for p in (*DEFAULT_PROTOCOLS, *protocols)))
    items: dict[str, InputItem] = {}
    for raw in inputs:
        for uri, given_id in scan.expand(os.fspath(raw)):
            if uri not in items:
                items[uri] = InputItem(uri, given_id or video_id_for(uri))
    _check_unique_ids(items.values())
    return ExpandedInputs(list(items.values()), scan.skipped, scan.examples)


def _check_unique_ids(items: Iterable[InputItem]) -> None:
    # Manifest-supplied ids can collide, and so can URIs that differ only in credentials or query strings;
    # two inputs sharing one would overwrite each other's partition.
    seen: dict[str, str] = {}
    for item in items:
        other = seen.setdefault(item.video_id, item.uri)
        if other != item.uri:
            raise InputError(
                f"video_id {item.video_id!r} is used for both {redact(other)} and {redact(item.uri)}; give each "
                "row of the manifest its own video_id (URIs that differ only in their query string or "
                "credentials are the same video)"
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


def _no_match(spec: str, what: str, exts: tuple[str, ...]) -> InputError:
    return InputError(
        f"{redact(spec)}: {what} (video extensions: {', '.join(exts)}). Check the path, point at the folder or "
        "prefix that holds the videos, use a glob such as 'videos/**/*.mp4', pass --extensions to take other "
        "file types, name files explicitly, or list them in a .txt/.parquet manifest."
    )


class _Scan:
    """One expansion: the settings, and the files left out so far."""

    def __init__(self, exts: tuple[str, ...], protocols: frozenset[str]) -> None:
        self.exts, self.protocols = exts, protocols
        self.skipped = 0
        self.examples: list[str] = []

    def skip(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.skipped += 1
            if len(self.examples) < SKIPPED_EXAMPLES:
                self.examples.append(redact(path))

    def check_protocol(self, uri: str, manifest: str | None = None) -> None:
        protocol = protocol_of(uri)
        if protocol in self.protocols:
            return
        where = f" (listed in {redact(manifest)})" if manifest else ""
        raise InputError(
            f"{redact(uri)}{where}: {protocol}:// inputs are refused; inputs may be local paths or s3:// URIs, so "
            f"that an input list cannot make the workers fetch arbitrary URLs. If this source is meant, pass "
            f"--allow-protocols {protocol} (SegmentJobConfig.allow_protocols)."
        )

    def expand(self, spec: str) -> list[tuple[str, str | None]]:
        self.check_protocol(spec)
        if _is_remote(spec):
            return self._expand_remote(spec)
        return self._expand_local(spec)

    def _expand_local(self, spec: str) -> list[tuple[str, str | None]]:
        exts = self.exts
        path = _normalise_local(spec)
        if os.path.isfile(path):
            if path.lower().endswith(MANIFEST_EXTENSIONS):
                return self._read_manifest(path, spec)
            return [(path, None)]
        if os.path.isdir(path):
            found = sorted(self._walk_local(path))
            if not found:
                raise _no_match(spec, "directory contains no video files", exts)
            return [(p, None) for p in found]
        if _GLOB_MAGIC.search(spec):
            matches = globlib.glob(os.path.expanduser(spec), recursive=True)
            files = sorted({os.path.abspath(m) for m in matches if os.path.isfile(m)})
            self.skip(p for p in files if not _has_video_ext(p, exts))
            files = [p for p in files if _has_video_ext(p, exts)]
            if not files:
                detail = f"glob matched {len(matches)} path(s), none a video file" if matches else "glob matches nothing"
                raise _no_match(spec, detail, exts)
            return [(p, None) for p in files]
        return _missing(spec, path, exts)

    def _walk_local(self, root: str) -> Iterable[str]:
        # Follow symlinked folders (datasets are often linked in) but never visit a real directory twice,
        # which also stops symlink loops.
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                # Hidden names include macOS "._clip.mp4" resource forks, which are not videos.
                if not name.startswith(".") and _has_video_ext(name, self.exts):
                    yield os.path.join(dirpath, name)
                else:
                    self.skip([os.path.join(dirpath, name)])

    def _expand_remote(self, spec: str) -> list[tuple[str, str | None]]:
        exts = self.exts
        if protocol_of(spec) in ("http", "https"):
            # HTTP has no listing, and a presigned URL may refuse the HEAD request an existence check sends:
            # the URL names one file, opened (or reported as failed) by the job.
            return [(spec, None)]
        fs, path = storage.filesystem(spec)
        fs.invalidate_cache()  # s3fs caches listings per instance; inputs may have been written since
        if _GLOB_MAGIC.search(path):
            matches = fs.glob(path, detail=True)
            found = sorted(p for p, info in matches.items() if info.get("type") == "file")
            return self._remote_files(spec, fs, found, "glob matched {n} object(s), none a video file"
                                      if matches else "glob matches nothing")
        kind = None
        if not spec.endswith("/"):
            try:
                kind = fs.info(path).get("type")
            except FileNotFoundError:
                pass
        if kind == "file":
            if path.lower().endswith(MANIFEST_EXTENSIONS):
                return self._read_manifest(spec, spec, fs=fs, fs_path=path)
            return [(spec, None)]
        if kind == "directory" or spec.endswith("/"):
            listed = fs.find(path.rstrip("/"), detail=True)
            found = sorted(p for p, info in listed.items() if info.get("type") == "file")
            return self._remote_files(spec, fs, found, "prefix holds no video files")
        return _missing(spec, spec, exts)

    def _remote_files(self, spec: str, fs: fsspec.AbstractFileSystem, found: list[str],
                      nothing: str) -> list[tuple[str, str | None]]:
        videos = [p for p in found if _is_visible_video(p, self.exts)]
        self.skip(fs.unstrip_protocol(p) for p in found if not _is_visible_video(p, self.exts))
        if not videos:
            raise _no_match(spec, nothing.format(n=len(found)), self.exts)
        return [(fs.unstrip_protocol(p), None) for p in videos]

    def _read_manifest(
        self,
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
            raise InputError(f"{redact(spec)}: manifest lists no inputs; add one video path or URI per line/row")
        remote_base = None if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(posixpath.dirname(fs_path))
        local_base = os.path.dirname(fs_path) if remote_base is None else None
        resolved = [(_resolve_entry(entry, local_base, remote_base), vid) for entry, vid in rows]
        for entry, _ in resolved:  # every entry is checked before any is read
            self.check_protocol(entry, manifest=spec)
        return resolved


def _missing(spec: str, uri: str, exts: tuple[str, ...]) -> list[tuple[str, str | None]]:
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        raise InputError(f"{redact(spec)}: manifest not found; check the path")
    if _looks_like_file(spec):
        return [(uri, None)]  # the job reports it as a failed input
    raise _no_match(spec, "no such file, directory or prefix", exts)


def _is_visible_video(path: str, exts: tuple[str, ...]) -> bool:
    parts = path.split("/")[1:]  # the first part is the bucket
    return _has_video_ext(path, exts) and not any(part.startswith(".") for part in parts)


def _parquet_rows(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> list[tuple[str, str | None]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if "uri" not in names:
            raise InputError(f"{redact(spec)}: parquet manifest needs a 'uri' column (has: {', '.join(names)})")
        columns = ["uri", "video_id"] if "video_id" in names else ["uri"]
        table = parquet.read(columns=columns)
    uris = table.column("uri").to_pylist()
    ids = table.column("video_id").to_pylist() if "video_id" in columns else [None] * len(uris)
    rows: list[tuple[str, str | None]] = []
    for row, (entry, vid) in enumerate(zip(uris, ids)):
        if not isinstance(entry, str) or not entry.strip():
            raise InputError(f"{redact(spec)}: row {row} has no uri")
        if vid is not None:
            vid = str(vid)
            if not _ID_SAFE.fullmatch(vid):
                raise InputError(
                    f"{redact(spec)}: row {row} video_id {vid!r} is not partition-safe; use only letters, digits, "
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
