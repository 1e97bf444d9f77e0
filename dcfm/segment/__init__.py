"""The segment job: Ray Data over video corpora, keyframe reuse per chunk, Parquet outputs."""

from __future__ import annotations

from typing import Any

__all__ = ["ExitCode", "MaskResolution", "SegmentJobConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, because Ray's planning tasks import dcfm.segment.plan, and with it this package: they must
    # not pay for importing torch.
    if name == "ExitCode":
        from dcfm.errors import ExitCode

        return ExitCode
    if name in ("MaskResolution", "SegmentJobConfig"):
        from dcfm.segment import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
