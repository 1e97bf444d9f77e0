"""The segment job: Ray Data over video corpora, keyframe reuse per chunk, Parquet outputs."""

from dcfm.jobcli import ExitCode
from dcfm.segment.config import MaskResolution, SegmentJobConfig

__all__ = ["ExitCode", "MaskResolution", "SegmentJobConfig"]
