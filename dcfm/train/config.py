"""Typed configuration of the train job, shared by `dcfm train` and `jobs/train.py`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dcfm.data import LAYOUTS
from dcfm.errors import ConfigError, SettingsConflict
from dcfm.losses import LossWeights
from dcfm.train.recipe import AugmentConfig, OptimConfig

# Fields that say how a run executes, not what it learns: a rerun may change them and still resume.
EXECUTION_FIELDS = (
    "output", "workers", "gpus_per_worker", "cpus_per_worker", "checkpoint_every", "keep_checkpoints",
    "log_every", "max_failures", "decoded_cache_mb", "data_cache", "ray_address", "fail_at_step",
)


class RunMismatchError(SettingsConflict):
    """The output directory holds a run with other settings; resuming it would mix two trainings."""


@dataclass
class TrainJobConfig:
    """Everything `dcfm train` needs. ``run_settings`` is what identifies a run for resuming."""

    data: str  # dataset root: local directory or s3:// prefix
    output: str  # run directory (local or s3://): RunConfig(storage_path=parent, name=basename)
    layout: str = "auto"
    split: str = "train"
    delta: int = 1  # neighbour distance U = L ± delta (the official configs: 1)
    max_delta: int | None = None  # draw the distance from delta..max_delta per visit (None: delta only)
    backbone: str = "resnet18"
    pretrained_backbone: bool = False
    nonkey_scale: float = 1.0  # non-keyframes at this fraction of the resolution (AR-Seg; the card records it)
    steps: int = 1000
    batch_size: int = 4  # pairs per worker per step; the global batch is workers × batch_size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights | None = None  # None: the paper's λ for the dataset family (LossWeights.for_dataset)
    seed: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0  # also the worker's torch threads
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the run fails
    decoded_cache_mb: int = 1024  # per worker: decoded synth videos kept in memory
    data_cache: str | None = None  # where workers stage s3:// data (None: $DCFM_DATA_CACHE or <tmp>/dcfm-data)
    ray_address: str | None = None
    fail_at_step: int | None = None  # fault injection for tests: the last worker SIGKILLs itself here, once

    def __post_init__(self) -> None:
        for name in ("crop", "scale", "mean", "std"):  # as tuples, also when read back from JSON
            setattr(self.augment, name, tuple(getattr(self.augment, name)))
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ConfigError("layout", f"{self.layout!r}: expected 'auto' or one of {LAYOUTS}")
        for name in ("steps", "batch_size", "workers", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.delta < 1 or (self.max_delta is not None and self.max_delta < self.delta):
            raise ConfigError("max_delta", f"needs 1 <= delta <= max_delta, got {self.delta} and {self.max_delta}")
        if not 0 < self.nonkey_scale <= 1:
            raise ConfigError("nonkey_scale", f"must be in (0, 1], got {self.nonkey_scale}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", f"must be > 0 (and gpus_per_worker >= 0), got {self.cpus_per_worker} "
                              f"and {self.gpus_per_worker}")
        if self.optim.warmup_steps is None:  # the recipe's warm-up depends on the run's length: fixed here
            self.optim.warmup_steps = self.optim.resolved(self.backbone, self.steps).warmup_steps
        self.data = _absolute(self.data)
        self.output = _absolute(self.output).rstrip("/")
        storage_path, name = self.storage_path_and_name
        in_bucket = "://" not in self.output or urlsplit(self.output).path.strip("/")
        if not name or not storage_path or not in_bucket:
            raise ConfigError("output", f"{self.output!r}: give a run directory below a bucket or folder, "
                             "e.g. s3://bucket/runs/run1 or ./runs/run1")

    @property
    def storage_path_and_name(self) -> tuple[str, str]:
        """Ray Train's RunConfig(storage_path, name) for ``output``: its parent and its last segment."""
        parent, _, name = self.output.rpartition("/")
        return parent, name

    def run_settings(self) -> dict[str, Any]:
        """What the trained weights depend on; a rerun with other values would not be a resume."""
        settings = {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS}
        return json.loads(json.dumps(settings))  # tuples -> lists, as they read back from JSON

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainJobConfig:
        data = dict(data)
        data["augment"] = AugmentConfig(**data["augment"])
        data["optim"] = OptimConfig(**data["optim"])
        data["loss"] = LossWeights(**data["loss"]) if data.get("loss") is not None else None
        return cls(**data)


def _absolute(uri: str) -> str:
    # Ray Train moves each worker into its own working directory, so relative paths must be resolved here.
    text = str(uri)
    if "://" in text:
        return text
    return str(Path(os.path.expanduser(text)).resolve())


def settings_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts (``key: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
