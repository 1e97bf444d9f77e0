"""Local paths and object-store URIs behind one small API (fsspec; s3fs for ``s3://``).

S3 credentials and endpoint come from the standard AWS chain (environment, profiles, instance roles;
``AWS_ENDPOINT_URL`` for S3-compatible stores) — never from our own config files.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the in-filesystem path of ``uri``."""
    return fsspec.core.url_to_fs(str(uri))


# A URI anywhere in a text: scheme://, then everything up to whitespace or a quote.
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Parameters that carry credentials: presigned S3 (SigV4, SigV2), GCS signed URLs, Azure SAS, CloudFront, OAuth
# tokens. X-Amz-*/X-Goog-* go wherever they appear (a local path, a library's message); the short generic
# names only as query parameters (after ? or &), so a Hive-style folder such as sp=2/ is left alone.
_SECRET_PARAM = re.compile(
    r"(?i)(\b(?:x-amz|x-goog)-[a-z-]+|(?<=[?&;])(?:awsaccesskeyid|signature|sig|se|sp|sv|st|skoid|sktid|skt|ske|"
    r"sks|skv|key-pair-id|policy|expires|token|access_token|id_token|security-token|credential|password|passwd|"
    r"secret|api_?key))=([^&\s'\"<>]*)"
)
_TRAILING = ".,;:)]}"


def _redact_uri(uri: str) -> str:
    core = uri.rstrip(_TRAILING)
    tail = uri[len(core):]
    try:
        parts = urlsplit(core)
        netloc = parts.netloc.rsplit("@", 1)[-1]  # user:password@ goes
    except ValueError:  # not parseable as a URI (e.g. a bad port): keep it, the parameters still go below
        return uri
    # The whole query and fragment go: an object URI needs neither, and presigned signatures live there.
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + tail


def redact(text: str) -> str:
    """``text`` (a URI, a message or a traceback) fit to log or write: every URI in it loses its user:password@,
    query string and fragment, and signature-like parameters (X-Amz-Signature=..., sig=..., token=...) lose
    their values wherever they appear. The one gate for URIs and messages on their way to logs, rows and
    manifests."""
    text = _URI.sub(lambda m: _redact_uri(m.group(0)), str(text))
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=REDACTED", text)


def redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` behind ``redact``: whatever a line quotes (a URI, an error message, a traceback) reaches the log
    without user:password@, query strings or signatures. Every job wraps its ``log`` with it."""
    return lambda line: log(redact(line))


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


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is s3fs (S3 and S3-compatible stores)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols))


def find_files(uri: str | os.PathLike) -> list[str]:
    """Every file below ``uri`` (paths as its filesystem names them; [] when there is none): one fresh recursive
    listing. On S3 its pages are read as they come: s3fs's ``find`` also rebuilds a cache of every directory it
    saw, in time quadratic in the number of sibling directories (1.4 s of 4.6 s for 10,000 video partitions)."""
    fs, path = filesystem(uri)
    if not is_s3(fs) or getattr(fs, "version_aware", False):
        try:
            return fs.find(path)
        except FileNotFoundError:
            return []
    bucket, _, key = path.strip("/").partition("/")
    request = {"Bucket": bucket, "Prefix": f"{key}/" if key else ""}
    files = []
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        files += [f"{bucket}/{item['Key']}" for item in page.get("Contents", ()) if not item["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            return files
        request["ContinuationToken"] = page["NextContinuationToken"]


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
