"""Typed configuration of the segment job, shared by `dcfm segment` and `jobs/segment.py`."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum

from dcfm.errors import ConfigError, InputError
from dcfm.faults import RetryPolicy
from dcfm.inference import KeyframePolicy, ReuseMode
from dcfm.sources import VIDEO_EXTENSIONS, normalise_extensions
from dcfm.segment.lease import LeaseSettings


class MaskResolution(str, Enum):
    SOURCE = "source"  # masks at the video's own resolution (logits upsampled bilinearly)
    MODEL = "model"  # masks at the resolution the model ran at (smaller, faster)


@dataclass
class SegmentJobConfig:
    """Everything `dcfm segment` needs. Only ``row_settings`` determines the output rows."""

    inputs: list[str]
    output: str
    checkpoint: str
    # Files taken from directories, prefixes and globs (any case); explicitly named files are always taken.
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    # Input protocols allowed besides local paths and s3:// (e.g. ("https",) for presigned URLs in a manifest).
    allow_protocols: tuple[str, ...] = ()
    keyframes: KeyframePolicy = field(default_factory=KeyframePolicy)
    mode: ReuseMode = ReuseMode.BIDIRECTIONAL
    nonkey_scale: float | None = None  # None: the checkpoint's; another value than the checkpoint's is refused
    chunk_frames: int = 256
    resolution: tuple[int, int] | None = None  # (H, W) the model runs at; None = the checkpoint's train size
    mask_resolution: MaskResolution = MaskResolution.SOURCE
    batch_size: int = 8
    # None: fill the cluster (see `resolve_resources`)
    min_actors: int | None = None
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    device: str = "auto"
    overwrite: bool = False
    retry_failed: bool = False
    dry_run: bool = False
    # Frames/s one GPU sustains (benchmarks/bench_segment.py --gpus-per-actor 1): the dry run then prints
    # GPU-hours and the wall time at the pool's max size (dcfm/segment/estimate.py).
    fps_per_gpu: float | None = None
    ray_address: str | None = None
    progress_interval_s: float = 10.0
    # When no node the cluster has fits an actor and the autoscaler's node types are not visible to Ray
    # (segment/preflight.py), the pool's first actors get this long to start before the job fails.
    # A GPU node starting from zero takes minutes (instance, image, setup).
    actor_start_timeout_s: float = 900.0
    # Videos probed at once. Probing reads every packet header (the whole file, from object storage), so a
    # few parallel probes keep many GPUs fed; each is a Ray worker process, so it is bounded.
    probe_concurrency: int = 4
    # Transient failures (storage or network unavailable, throttling, server errors, a full or read-only
    # output) are retried with this backoff; when it runs out the job stops with exit 3 and commits nothing
    # of the video at hand. Killed actors are Ray's to restart (their chunk is redone).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # One run writes to an output at a time (dcfm.segment.lease): how long its lease lasts without a
    # heartbeat, and how long this run waits for another one's.
    lease: LeaseSettings = field(default_factory=LeaseSettings)

    def __post_init__(self) -> None:
        self.mode = ReuseMode(self.mode)
        self.mask_resolution = MaskResolution(self.mask_resolution)
        if not self.inputs:
            raise ValueError("no inputs: pass video files, directories, globs, s3:// prefixes or a manifest")
        try:
            self.extensions = normalise_extensions(self.extensions)
        except InputError:
            raise ConfigError("extensions", f"needs at least one file extension, got {list(self.extensions)}") from None
        self.allow_protocols = tuple(p.strip().lower().removesuffix("://") for p in self.allow_protocols)
        bad = [p for p in self.allow_protocols if not re.fullmatch(r"[a-z][a-z0-9+.-]*", p)]
        if bad:
            raise ConfigError("allow_protocols", f"takes protocol names such as http,https,gs; got {bad}")
        if self.chunk_frames < 1:
            raise ConfigError("chunk_frames", f"must be >= 1, got {self.chunk_frames}")
        if self.min_actors is None and self.max_actors is not None:
            self.min_actors = 1
        if self.max_actors is None and self.min_actors is not None:
            self.max_actors = self.min_actors
        if self.min_actors is not None and not 1 <= self.min_actors <= (self.max_actors or 0):
            raise ConfigError("min_actors", f"needs 1 <= min_actors <= max_actors, got {self.min_actors},{self.max_actors}",
                              option="--actors")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ConfigError("cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("gpus_per_actor", f"must be >= 0, got {self.gpus_per_actor}")
        if self.fps_per_gpu is not None and self.fps_per_gpu <= 0:
            raise ConfigError("fps_per_gpu", f"must be > 0, got {self.fps_per_gpu}")
        if self.probe_concurrency < 1:
            raise ConfigError("probe_concurrency", f"must be >= 1, got {self.probe_concurrency}")

    @property
    def aligned_chunk_frames(self) -> int:
        """Chunk length rounded up to a multiple of the keyframe interval, so chunking never moves a keyframe."""
        k = 1 if not self.keyframes.fixed else self.keyframes.interval
        return -(-self.chunk_frames // k) * k

    def row_settings(self, model_digest: str, resolution: tuple[int, int]) -> dict:
        """The settings that decide every output row (and nothing else: not chunking, actors or paths)."""
        keyframes = {**asdict(self.keyframes), "score": self.keyframes.score.value}
        for name in ("codec", "phase"):  # added later: left out at their defaults so run ids stay the same
            if not keyframes[name]:
                del keyframes[name]
        settings = {
            "model_digest": model_digest,
            "keyframes": keyframes,
            "mode": self.mode.value,
            "resolution": list(resolution),
            "mask_resolution": self.mask_resolution.value,
        }
        if not self.keyframes.fixed:
            # Every chunk starts on a keyframe, so adaptive and codec schedules depend on where chunks start.
            settings["chunk_frames"] = self.aligned_chunk_frames
        return settings

    def run_id(self, model_digest: str, resolution: tuple[int, int]) -> str:
        """Deterministic: rerunning the same command is the same run, so resumed rows equal a clean run's."""
        blob = json.dumps(self.row_settings(model_digest, resolution), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ActorResources:
    """What the actor pool asks of the cluster, and why."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    reason: str

    @property
    def threads(self) -> int:
        """torch threads per actor: its whole CPUs."""
        return max(1, int(self.cpus_per_actor))

    def describe(self) -> str:
        """``2-8 actors x 4 CPUs, 1 GPUs (why)``, for the job's log."""
        sizes = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        return f"{sizes} actors x {self.cpus_per_actor:g} CPUs, {self.gpus_per_actor:g} GPUs ({self.reason})"


# Without GPUs, actors of one CPU each up to this many CPUs; two each above (fewer model copies in memory,
# and torch's intra-op threads still scale at two).
_SMALL_CPU_NODE = 8


def resolve_resources(config: SegmentJobConfig, cluster_cpus: float, cluster_gpus: float) -> ActorResources:
    """Fill in what the command line left open so the pool fills the cluster.

    GPUs present: one actor per GPU (``--gpus-per-actor 1``) with an equal share of the CPUs (they decode,
    resize and build masks for it), less one CPU for the probes from shares of 4 up. No GPUs: one actor per CPU (two CPUs per actor from 8 CPUs up).
    Explicit settings win.
    """
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    why = []
    if gpus > 0:
        slots = max(1, int(cluster_gpus // gpus)) if cluster_gpus else 1
        share = int(cluster_cpus // slots)
        # One CPU of each share stays free for the probes and the OS when the share is big enough to spare it.
        cpus = config.cpus_per_actor or float(max(1, share - 1 if share >= 4 else share))
        if config.cpus_per_actor is None:
            why.append(f"{cpus:g} CPUs per actor: {cluster_cpus:g} CPUs / {slots} GPU actors"
                       f"{', less one for probes' if share >= 4 else ''}")
    else:
        cpus = config.cpus_per_actor or (1.0 if cluster_cpus < _SMALL_CPU_NODE else 2.0)
        slots = max(1, int(cluster_cpus // cpus))
        if config.cpus_per_actor is None:
            why.append(f"{cpus:g} CPU per actor (no GPU)")
    if config.min_actors is not None:
        low, high = config.min_actors, config.max_actors or config.min_actors
    else:
        low = high = slots
        what = f"{cluster_gpus:g} GPUs / {gpus:g} per actor" if gpus > 0 else f"{cluster_cpus:g} CPUs / {cpus:g} per actor"
        why.insert(0, f"{slots} actors = {what}")
    return ActorResources(low, high, cpus, gpus, "; ".join(why) or "as given")
