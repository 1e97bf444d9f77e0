"""Datasets in object storage, staged to a local directory once per node."""

from __future__ import annotations

import json
from pathlib import Path


def stage_dataset(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the dataset at ``uri``: local paths as they are (made absolute), object-store
    prefixes (``s3://...``) downloaded once into a cache and reused while the listing is unchanged.

    The cache directory is named by the URI and a digest of the listing (keys, sizes, ETags), so changed
    data is downloaded afresh; a lock file serialises processes on one node and the finished download is
    moved into place atomically, so a half-copied tree is never used. ``cache_dir`` defaults to
    ``$DCFM_DATA_CACHE`` or ``<tmp>/dcfm-data``.
    """
    import fcntl
    import hashlib
    import os
    import shutil
    import tempfile

    from dcfm import storage

    text = str(uri)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    fs, base = storage.filesystem(text)
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    listing = {path: info for path, info in fs.find(base, detail=True).items()
               if info.get("type") != "directory" and not path.endswith("/")}  # "dir/" marker objects
    if not listing:
        raise FileNotFoundError(f"{text}: no objects under this prefix; check the URI and the S3 credentials/endpoint")
    digest = hashlib.sha256(json.dumps(
        sorted((p[len(base):], int(i.get("size") or 0), str(i.get("ETag") or i.get("etag") or "")) for p, i in listing.items())
    ).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("DCFM_DATA_CACHE") or Path(tempfile.gettempdir()) / "dcfm-data")
    target = cache / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}-{digest}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process on this node waits, then finds the tree
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}."))
        try:
            remote = sorted(listing)
            local = [str(tmp / p[len(base):].lstrip("/")) for p in remote]
            for path in local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, local)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
