"""Typed configuration of the segment job, shared by `dcfm segment` and `jobs/segment.py`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum

from dcfm.inference import KeyframePolicy, ReuseMode


class MaskResolution(str, Enum):
    SOURCE = "source"  # masks at the video's own resolution (logits upsampled bilinearly)
    MODEL = "model"  # masks at the resolution the model ran at (smaller, faster)


@dataclass
class SegmentJobConfig:
    """Everything `dcfm segment` needs. Only ``row_settings`` determines the output rows."""

    inputs: list[str]
    output: str
    checkpoint: str
    keyframes: KeyframePolicy = field(default_factory=KeyframePolicy)
    mode: ReuseMode = ReuseMode.BIDIRECTIONAL
    nonkey_scale: float | None = None  # None: the checkpoint's; another value than the checkpoint's is refused
    chunk_frames: int = 256
    resolution: tuple[int, int] | None = None  # (H, W) the model runs at; None = the checkpoint's train size
    mask_resolution: MaskResolution = MaskResolution.SOURCE
    batch_size: int = 8
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    device: str = "auto"
    overwrite: bool = False
    retry_failed: bool = False
    dry_run: bool = False
    ray_address: str | None = None
    progress_interval_s: float = 10.0
    # Videos probed at once. Probing reads every packet header (the whole file, from object storage), so a
    # few parallel probes keep many GPUs fed; each is a Ray worker process, so it is bounded.
    probe_concurrency: int = 4

    def __post_init__(self) -> None:
        self.mode = ReuseMode(self.mode)
        self.mask_resolution = MaskResolution(self.mask_resolution)
        if not self.inputs:
            raise ValueError("no inputs: pass video files, directories, globs, s3:// prefixes or a manifest")
        if self.chunk_frames < 1:
            raise ValueError(f"--chunk-frames must be >= 1, got {self.chunk_frames}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"--actors needs 1 <= MIN <= MAX, got {self.min_actors},{self.max_actors}")
        if self.probe_concurrency < 1:
            raise ValueError(f"--probe-concurrency must be >= 1, got {self.probe_concurrency}")

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
