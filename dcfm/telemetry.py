"""Operational metrics of the segment and train jobs, through Ray's metrics API (``ray.util.metrics``).

Ray exports them, with its own, on every node's Prometheus endpoint (the metrics export port; the Ray
dashboard's Metrics page and ``cluster/grafana-dashboard.json`` chart them). Every series carries the run's id
(``run_id``: the segment run id, or the train run's name), so runs sharing a cluster stay apart.

This module is the one home of the metric names (``SEGMENT_METRICS``, ``TRAIN_METRICS``; the dashboard test
holds the Grafana JSON to them). Outside Ray (``dcfm train`` in one process, ``make demo``'s local loop, a dry
run) the recorders are no-ops: nothing is created or sent.

(``dcfm/metrics.py`` is another thing: the quality scores of masks, mIoU and friends.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# Chunk latency buckets (seconds): a small chunk on a GPU takes well under a second, 256 frames of 1080p on a
# CPU some minutes.
CHUNK_SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The actor stages ChunkSummary times, by the label value each gets.
STAGES = {"decode_wait": "decode_wait_s", "model": "model_s", "rows": "rows_s", "write": "write_s"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray name, kind and what it counts. Prometheus adds ``ray_`` in front of the name (and
    ``_total`` to counters, ``_bucket``/``_sum``/``_count`` to histograms)."""

    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ("run_id",)

    def exported(self) -> list[str]:
        """The series names this metric has on Ray's Prometheus endpoint."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return [f"{base}_total"]
        if self.kind == "histogram":
            return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
        return [base]


SEGMENT_METRICS = {
    spec.name: spec for spec in (
        MetricSpec("dcfm_segment_frames", "counter", "Frames segmented (rows staged)"),
        MetricSpec("dcfm_segment_keyframes", "counter", "Keyframes among the frames segmented (deep layers run)"),
        MetricSpec("dcfm_segment_chunks", "counter", "Chunks finished, by status (ok, empty, failed; reused: "
                                                     "staged by an interrupted run)", ("run_id", "status")),
        MetricSpec("dcfm_segment_videos", "counter", "Videos committed (ok, empty, failed) or skipped as already "
                                                     "committed (skipped)", ("run_id", "status")),
        MetricSpec("dcfm_segment_stage_seconds", "counter", "Actor seconds by stage: decode_wait, model, rows "
                                                            "(masks and metrics), write (Parquet)", ("run_id", "stage")),
        MetricSpec("dcfm_segment_chunk_seconds", "histogram", "Seconds an actor spent on one chunk"),
        MetricSpec("dcfm_segment_actors", "gauge", "Actors that finished a chunk recently (within twice the "
                                                   "longest chunk so far, at least 30 s)"),
        MetricSpec("dcfm_segment_frames_planned", "gauge", "Frames of the videos to do this run (probed)"),
    )
}
TRAIN_METRICS = {
    spec.name: spec for spec in (
        MetricSpec("dcfm_train_steps", "counter", "Optimiser steps taken (rank 0)"),
        MetricSpec("dcfm_train_pairs_per_second", "gauge", "Training pairs per second over all workers, since the "
                                                           "last log step"),
        MetricSpec("dcfm_train_loss", "gauge", "Joint loss, mean over the workers' batches since the last log step"),
        MetricSpec("dcfm_train_step", "gauge", "The step reached"),
    )
}


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class _Recorder:
    """The Ray metric objects of one family, tagged with one run id; no-op when Ray is not running."""

    def __init__(self, specs: dict[str, MetricSpec], run_id: str) -> None:
        self.run_id = run_id
        self.metrics: dict[str, Any] = {}
        if not _ray_running():
            return
        from ray.util import metrics

        for spec in specs.values():
            if spec.kind == "counter":
                metric = metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                metric = metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
            else:
                metric = metrics.Histogram(spec.name, description=spec.description,
                                           boundaries=list(CHUNK_SECONDS_BUCKETS), tag_keys=spec.tags)
            metric.set_default_tags({"run_id": run_id})
            self.metrics[spec.name] = metric

    @property
    def enabled(self) -> bool:
        return bool(self.metrics)

    def inc(self, name: str, value: float, **tags: str) -> None:
        if self.metrics and value:
            self.metrics[name].inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        if self.metrics:
            self.metrics[name].set(value, tags=tags or None)

    def observe(self, name: str, value: float) -> None:
        if self.metrics:
            self.metrics[name].observe(value)


class SegmentTelemetry:
    """What the segment driver reports as chunks arrive and videos commit. Create it after Ray is up."""

    def __init__(self, run_id: str) -> None:
        self.recorder = _Recorder(SEGMENT_METRICS, run_id)
        self.last_seen: dict[str, float] = {}  # actor -> when it last finished a chunk (monotonic)
        self.longest_chunk_s = 0.0
        self.planned_frames = 0

    def chunk(self, chunk) -> None:
        """One ChunkSummary arrived at the driver."""
        r = self.recorder
        if not r.enabled:
            return
        status = "reused" if chunk.reused else chunk.status
        r.inc("dcfm_segment_chunks", 1, status=status)
        if chunk.probe and chunk.chunk_index <= 0:  # a video's first chunk carries its probe
            self.planned_frames += chunk.probe.get("frame_count") or 0
            r.set("dcfm_segment_frames_planned", self.planned_frames)
        r.inc("dcfm_segment_frames", chunk.frames)
        r.inc("dcfm_segment_keyframes", chunk.keyframes)
        if chunk.reused or not chunk.frames:
            return
        for stage, field in STAGES.items():
            r.inc("dcfm_segment_stage_seconds", getattr(chunk, field), stage=stage)
        r.observe("dcfm_segment_chunk_seconds", chunk.seconds)
        now = time.monotonic()
        self.longest_chunk_s = max(self.longest_chunk_s, chunk.seconds)
        self.last_seen[f"{chunk.node_id}:{chunk.pid}"] = now
        window = max(30.0, 2 * self.longest_chunk_s)
        r.set("dcfm_segment_actors", sum(now - seen <= window for seen in self.last_seen.values()))

    def videos(self, status: str, count: int = 1) -> None:
        """``count`` videos committed with ``status`` (ok, empty, failed), or skipped (``skipped``)."""
        self.recorder.inc("dcfm_segment_videos", count, status=status)

    def finished(self) -> None:
        """The pool is gone: no actor is working for this run any more."""
        self.recorder.set("dcfm_segment_actors", 0)


class TrainTelemetry:
    """What rank 0 of the training loop reports at each log step."""

    def __init__(self, run_id: str) -> None:
        self.recorder = _Recorder(TRAIN_METRICS, run_id)

    def logged(self, row: dict, steps: int) -> None:
        """A log row (``loop._metrics``) covering ``steps`` optimiser steps."""
        r = self.recorder
        r.inc("dcfm_train_steps", steps)
        r.set("dcfm_train_step", row["step"])
        r.set("dcfm_train_loss", row["loss"])
        if row["pairs_per_s"] == row["pairs_per_s"]:  # not NaN
            r.set("dcfm_train_pairs_per_second", row["pairs_per_s"])
