"""What a segment run will cost, before it runs: GPU-hours and wall time from the plan and a measured rate.

The rate is ``--fps-per-gpu``: frames per second one GPU sustains for this model, resolution, keyframe interval
and mode, as ``benchmarks/bench_segment.py --gpus-per-actor 1`` measures it (the "frames/s" of its dcfm segment
row; ``benchmarks/gpu_check.sh`` runs it at 720p, k = 1 and k = 6).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcfm.errors import ConfigError
from dcfm.segment.config import ActorResources


@dataclass(frozen=True)
class CostEstimate:
    frames: int
    chunks: int
    largest_chunk: int  # frames of the longest chunk: no pool finishes faster than one actor does it
    fps_per_gpu: float
    resources: ActorResources

    @property
    def gpu_hours(self) -> float:
        return self.frames / self.fps_per_gpu / 3600

    @property
    def gpus_at_max(self) -> float:
        """GPUs busy with the pool at its max size (no more actors than chunks work at once)."""
        return min(self.resources.max_actors, max(1, self.chunks)) * self.resources.gpus_per_actor

    @property
    def wall_s(self) -> float:
        """Seconds of work with the pool at its max size: the frames spread over its GPUs, or the longest chunk
        on one actor's share of a GPU, whichever is longer. Start-up (nodes, model load) comes on top."""
        if not self.frames:
            return 0.0
        spread = self.frames / (self.fps_per_gpu * self.gpus_at_max)
        longest = self.largest_chunk / (self.fps_per_gpu * self.resources.gpus_per_actor)
        return max(spread, longest)

    def describe(self) -> str:
        """One line for the dry run."""
        return (f"[segment] estimate: {self.frames} frames at {self.fps_per_gpu:g} frames/s per GPU = "
                f"{self.gpu_hours:.2f} GPU-hours; wall time at the pool's max size ({self.resources.max_actors} actors x "
                f"{self.resources.gpus_per_actor:g} GPUs = {self.gpus_at_max:g} GPUs busy): "
                f"{_duration(self.wall_s)} plus start-up")


def check_gpu_pool(resources: ActorResources) -> None:
    """The rate is per GPU: refuse to estimate a pool without GPUs (before anything is probed)."""
    if resources.gpus_per_actor <= 0:
        raise ConfigError("fps_per_gpu", "estimates GPU actors, but this pool has none: pass --gpus-per-actor "
                                         "(e.g. 1) with it", option="--fps-per-gpu")


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
