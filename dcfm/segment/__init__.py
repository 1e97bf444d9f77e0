"""The segment job: Ray Data over video corpora, keyframe reuse per chunk, Parquet outputs."""

from dcfm.segment.config import ExitCode, MaskResolution, SegmentJobConfig

__all__ = ["ExitCode", "MaskResolution", "SegmentJobConfig"]
