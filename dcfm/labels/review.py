"""The review score: which frames of a video most need a person to look at them.

    score = mean of the available terms among
            confidence               (mean max-softmax: low when the model hesitates)
            1 - label_change_rate    (low when the labels jump from the previous frame: flicker or a cut)
            keyframe_agreement       (bidirectional runs: low when the previous and next keyframe disagree)

Every term is in [0, 1], so the score is too; lower means more in need of review. A missing term (frame 0
has no label change, causal runs no agreement) is left out of the mean rather than counted as perfect.
Ties go to the earlier frame.
"""

from __future__ import annotations

import csv
import heapq
import io
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from typing import Any


@dataclass(frozen=True, order=True)
class FrameScore:
    score: float  # first, so that sorting FrameScores ranks them
    frame_index: int
    confidence: float
    label_change_rate: float | None
    keyframe_agreement: float | None
    is_keyframe: bool


def review_score(confidence: float, label_change_rate: float | None, keyframe_agreement: float | None) -> float:
    """See the module docstring."""
    terms = [float(confidence)]
    if label_change_rate is not None:
        terms.append(1.0 - float(label_change_rate))
    if keyframe_agreement is not None:
        terms.append(float(keyframe_agreement))
    return sum(terms) / len(terms)


def frame_score(row: dict[str, Any]) -> FrameScore:
    """The score of a frame row (needs the columns of ``dcfm.labels.committed.METRIC_COLUMNS``)."""
    return FrameScore(review_score(row["confidence"], row["label_change_rate"], row["keyframe_agreement"]),
                      int(row["frame_index"]), float(row["confidence"]), row["label_change_rate"],
                      row["keyframe_agreement"], bool(row["is_keyframe"]))


def lowest(scores: Iterable[FrameScore], n: int) -> list[FrameScore]:
    """The ``n`` lowest-scored frames, lowest first (a heap of n: memory does not grow with the video)."""
    return heapq.nsmallest(n, scores)


def ranked_csv(ranked: list[FrameScore], frame_name: str = "frame_{:06d}") -> bytes:
    """The review queue as CSV: rank, CVAT frame name, then the score and its terms."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "frame", *(f.name for f in fields(FrameScore))])
    for rank, item in enumerate(ranked, start=1):
        writer.writerow([rank, frame_name.format(item.frame_index),
                         *("" if v is None else v for v in astuple(item))])
    return buffer.getvalue().encode()
