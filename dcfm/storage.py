"""Local paths and object-store URIs behind one small API (fsspec; s3fs for ``s3://``).

S3 credentials and endpoint come from the standard AWS chain (environment, profiles, instance roles;
``AWS_ENDPOINT_URL`` for S3-compatible stores) — never from our own config files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the in-filesystem path of ``uri``."""
    return fsspec.core.url_to_fs(str(uri))


def redact(uri: str) -> str:
    """Drop any user:password@ from a URI before it is logged or written."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return uri


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a local path or URI with '/' (never the OS separator inside a URI)."""
    base = str(uri).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Read a whole object; a missing one raises FileNotFoundError naming it."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri}: no such file or object") from err


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def set_usual_mode(path: str | os.PathLike) -> None:
    """Give a temporary file about to be published the mode any new file gets (0666 less the umask):
    ``mkstemp`` makes it 0600, which other users of a shared output could not read."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_bytes_atomic(uri: str | os.PathLike, data: bytes) -> None:
    """Write an object so readers see either nothing or all of it.

    Local files go through a temporary file in the same directory and ``os.replace``; an object-store PUT
    is already all-or-nothing.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            set_usual_mode(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        fs.pipe_file(path, data)
