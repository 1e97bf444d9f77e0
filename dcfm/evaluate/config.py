"""Typed configuration of the evaluate job, shared by `dcfm evaluate` and `jobs/evaluate.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from dcfm.errors import ConfigError
from dcfm.inference import KeyframePolicy, ReuseMode

SWEEP_INTERVALS = (1, 2, 4, 6)


@dataclass(frozen=True)
class Setting:
    """One inference setting to score: a keyframe policy and a reuse mode."""

    keyframes: KeyframePolicy
    mode: ReuseMode

    @property
    def name(self) -> str:
        policy = self.keyframes
        if policy.codec:
            return f"codec-min{policy.min_interval}-max{policy.max_interval}-{self.mode.value}"
        if policy.adaptive:
            return (f"adaptive-{policy.score.value}-t{policy.threshold:g}-min{policy.min_interval}"
                    f"-max{policy.max_interval}-{self.mode.value}")
        return f"k{policy.interval}-{self.mode.value}"


@dataclass
class EvaluateJobConfig:
    """Everything `dcfm evaluate` needs."""

    checkpoint: str  # checkpoint directory, local or s3://
    data: str  # dataset root, local or s3://
    output: str  # where evaluation.json / evaluation.md / accuracy_vs_speed.png (and masks/) go
    layout: str = "auto"
    split: str = "val"  # public layouts; a synth corpus without splits is evaluated whole
    video_ids: list[str] | None = None
    keyframes: KeyframePolicy = field(default_factory=KeyframePolicy)
    mode: ReuseMode = ReuseMode.BIDIRECTIONAL
    nonkey_scale: float | None = None  # None: the checkpoint's; another value than the checkpoint's is refused
    sweep: bool = False  # k = 1, 2, 4, 6 x causal / bidirectional instead of the one setting
    resolution: tuple[int, int] | None = None  # model input (H, W); None: the checkpoint's training size
    native_resolution: bool = False  # run the model on frames at their own size
    batch_size: int = 8
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    save_masks: bool = False  # OUTPUT/masks/<setting>/<video>/<frame:06d>.png
    warmup: bool = True  # one untimed pass per setting on the first clip before timing
    data_cache: str | None = None  # where s3:// data is staged (None: $DCFM_DATA_CACHE or <tmp>/dcfm-data)
    # Earlier evaluation outputs (other checkpoints, e.g. other non-key scales) on the same clips whose rows
    # join this run's table and plot, so one sweep compares them.
    compare: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = ReuseMode(self.mode)
        if self.sweep and not self.keyframes.fixed:
            raise ConfigError("sweep", "scores fixed intervals 1, 2, 4, 6; it cannot be combined with adaptive "
                                       "or codec keyframes")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.resolution is not None and self.native_resolution:
            raise ValueError("give --resolution HxW or --resolution native, not both")

    def settings(self) -> list[Setting]:
        """The settings to score. At k = 1 every frame is a keyframe, so the sweep scores one mode only."""
        if not self.sweep:
            return [Setting(self.keyframes, self.mode)]
        out = [Setting(KeyframePolicy(interval=1), ReuseMode.CAUSAL)]
        for k in SWEEP_INTERVALS[1:]:
            out += [Setting(KeyframePolicy(interval=k), mode) for mode in (ReuseMode.CAUSAL, ReuseMode.BIDIRECTIONAL)]
        return out
