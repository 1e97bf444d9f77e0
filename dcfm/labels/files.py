"""Build a file locally, then publish it whole to a local directory or an object store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from dcfm import storage


@contextmanager
def staged_file(uri: str, suffix: str = "") -> Iterator[Path]:
    """A local path to write; when the block ends without error it appears at ``uri`` all at once.

    Local targets are renamed into place from the same directory; object-store targets are uploaded (a PUT,
    or a multipart upload, only becomes visible when complete). On error nothing appears.
    """
    fs, path = storage.filesystem(uri)
    local = isinstance(fs, LocalFileSystem)
    directory = Path(path).parent if local else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dcfm-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if local:
            storage.set_usual_mode(tmp)
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
