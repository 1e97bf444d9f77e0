"""The train job's driver: resume or refuse, run Ray Train's TorchTrainer, publish the final checkpoint.

Layout of a run directory ``OUTPUT`` (local or ``s3://``; Ray Train's ``RunConfig(storage_path=parent,
name=basename)``)::

    OUTPUT/checkpoint_<step:06d>/   a training checkpoint (see dcfm.train.state); the newest ``keep`` are kept
    OUTPUT/final/                   the finished model: model.safetensors + dcfm.json (card written last)
    OUTPUT/dcfm-train.json          run record: status, settings, checkpoint URIs, loss/throughput history
    OUTPUT/checkpoint_manager_snapshot.json, OUTPUT/.validate_storage_marker   Ray Train's own bookkeeping

Rerunning a command on the same ``OUTPUT`` resumes: Ray Train finds its snapshot and hands the latest
checkpoint to the workers; a finished run (the record says so) returns at once and trains nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dcfm import storage
from dcfm.checkpoint import CARD_FILE, WEIGHTS_FILE
from dcfm.storage import redact
from dcfm.train.config import RunMismatchError, TrainJobConfig, settings_difference
from dcfm.train.loop import CHECKPOINT_PREFIX, train_loop_per_worker
from dcfm.train.state import STATE_JSON

RECORD_FILE = "dcfm-train.json"
RECORD_FORMAT = "dcfm-train-run/1"
FINAL_DIR = "final"


@dataclass
class TrainSummary:
    """What one invocation of the job did and where the results are."""

    output: str
    steps: int  # steps the run trains in total
    start_step: int  # where this invocation began (0, or the step of the checkpoint it resumed)
    final_step: int
    latest_checkpoint: str  # OUTPUT/checkpoint_<step>: model + optimiser state
    final_checkpoint: str  # OUTPUT/final: the model only, a stable URI for segment/evaluate
    attempt_starts: list[int] = field(default_factory=list)  # step of every (re)start over the run's life
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    already_finished: bool = False

    @property
    def steps_trained(self) -> int:
        return self.final_step - self.start_step

    @property
    def pairs_per_second(self) -> float:
        rates = [row["pairs_per_s"] for row in self.history if math.isfinite(row.get("pairs_per_s", math.nan))]
        return sum(rates) / len(rates) if rates else math.nan


def read_record(output: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(output, RECORD_FILE)))
    except FileNotFoundError:
        return None


def checkpoint_steps(output: str) -> list[int]:
    """Steps of the complete training checkpoints under ``output`` (a card marks one complete)."""
    fs, path = storage.filesystem(output)
    fs.invalidate_cache(path)  # s3fs caches listings; the workers wrote here from other processes
    if not fs.exists(path):
        return []
    steps = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            if fs.exists(f"{entry.rstrip('/')}/{CARD_FILE}"):
                steps.append(int(name[len(CHECKPOINT_PREFIX):]))
    return sorted(steps)


def _write_record(config: TrainJobConfig, status: str, started: str, **extra) -> None:
    record = {
        "format": RECORD_FORMAT, "status": status, "output": redact(config.output), "started": started,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(), "settings": config.run_settings(),
        "execution": {"workers": config.workers, "gpus_per_worker": config.gpus_per_worker,
                      "cpus_per_worker": config.cpus_per_worker, "checkpoint_every": config.checkpoint_every},
        **extra,
    }
    storage.write_bytes_atomic(storage.join(config.output, RECORD_FILE), json.dumps(record, indent=2).encode())


def _as_recorded_today(recorded: dict[str, Any], config: TrainJobConfig) -> dict[str, Any]:
    """A run record's settings as this version would write them for the same training: fields added since
    then take the value every older run implicitly had, and removed fields go, so an old run still resumes."""
    recorded = dict(recorded)
    if recorded.get("optim", {}).get("extra") == {}:
        recorded["optim"] = {k: v for k, v in recorded["optim"].items() if k != "extra"}
    recorded.setdefault("nonkey_scale", 1.0)  # before reduced-resolution non-keyframes, all ran at full size
    loss = recorded.get("loss")
    if isinstance(loss, dict) and "similarity" not in loss and recorded["nonkey_scale"] == 1.0 and config.loss:
        # λ3 weighs a term full-resolution models do not have: any value trains the same weights.
        recorded["loss"] = {**loss, "similarity": config.loss.similarity}
    return recorded


def _check_same_run(config: TrainJobConfig, record: dict | None) -> None:
    if record is None:
        return
    if record.get("format") != RECORD_FORMAT:
        raise RunMismatchError(f"{storage.join(config.output, RECORD_FILE)}: format {record.get('format')!r}, "
                               f"expected {RECORD_FORMAT!r}; use another --output")
    diff = settings_difference(_as_recorded_today(record["settings"], config), config.run_settings())
    if diff:
        raise RunMismatchError(
            f"{redact(config.output)} holds a run with other settings ({'; '.join(diff)}); resuming it with these "
            "would mix two trainings. Rerun with the original settings, or use a new --output.")


def _publish_final(checkpoint_uri: str, output: str) -> str:
    """Copy the model files of the last checkpoint to OUTPUT/final (the card last: the completion marker)."""
    final = storage.join(output, FINAL_DIR)
    for name in (WEIGHTS_FILE, CARD_FILE):
        storage.write_bytes_atomic(storage.join(final, name), storage.read_bytes(storage.join(checkpoint_uri, name)))
    return final


def _read_state(checkpoint_uri: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(checkpoint_uri, STATE_JSON)))


def run_train_job(config: TrainJobConfig, log: Callable[[str], None] = print) -> TrainSummary:
    """Train (or resume, or recognise as finished) the run in ``config.output``."""
    log = storage.redacting(log)
    t0 = time.perf_counter()
    record = read_record(config.output)
    _check_same_run(config, record)
    if record is not None and record.get("status") == "finished":
        log(f"[train] {redact(config.output)} is finished at step {record['step']}/{config.steps}; nothing to train. "
            f"Model: {record['final_checkpoint']}")
        return TrainSummary(config.output, config.steps, record["step"], record["step"], record["latest_checkpoint"],
                            record["final_checkpoint"], record["attempt_starts"], record["history"],
                            time.perf_counter() - t0, already_finished=True)
    _preflight(config)
    done = checkpoint_steps(config.output)
    start_step = done[-1] if done else 0
    started = record["started"] if record else dt.datetime.now(dt.timezone.utc).isoformat()
    _write_record(config, "running", started, step=start_step)
    log(f"[train] {redact(config.output)}: {'resuming from step ' + str(start_step) if done else 'new run'}; "
        f"{config.steps} steps of {config.workers} x {config.batch_size} pairs, {config.backbone}, "
        f"crop {config.augment.crop[0]}x{config.augment.crop[1]}")

    result = _fit(config)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint in {redact(config.output)}")
    latest = storage.join(config.output, os.path.basename(result.checkpoint.path.rstrip("/")))
    state = _read_state(latest)
    if state["step"] != config.steps:
        raise RuntimeError(f"training stopped at step {state['step']} of {config.steps} ({latest}); rerun to resume")
    final = _publish_final(latest, config.output)
    summary = TrainSummary(config.output, config.steps, start_step, state["step"], latest, final,
                           state["attempt_starts"], state["history"], time.perf_counter() - t0)
    _write_record(config, "finished", started, step=summary.final_step, latest_checkpoint=latest,
                  final_checkpoint=final, attempt_starts=summary.attempt_starts, history=summary.history)
    last = summary.history[-1] if summary.history else {}
    log(f"[train] finished step {summary.final_step}/{config.steps} ({summary.steps_trained} trained now, "
        f"restarts from steps {summary.attempt_starts}); loss {last.get('loss', math.nan):.4f}, "
        f"{summary.pairs_per_second:.2f} pairs/s; {summary.seconds:.0f}s")
    log(f"[train] checkpoint {latest}")
    log(f"[train] model    {final}")
    return summary


def _preflight(config: TrainJobConfig) -> None:
    """Fail fast, before any worker starts (Ray would retry a worker's data error --max-failures times)."""
    if "://" in config.data:
        if not storage.exists(config.data):
            raise FileNotFoundError(f"--data {config.data}: nothing there; check the URI and the S3 credentials")
        return
    from dcfm.train.data import open_training_pairs, shard_refs

    _, candidates = open_training_pairs(config.data, config.layout, config.split, config.delta, config.max_delta)
    shard_refs(candidates, config.workers - 1, config.workers)  # the smallest shard must not be empty


def _ddp_backend(config: TrainJobConfig) -> str:
    """NCCL where the GPU workers' torch sees CUDA, else gloo. Asked on a node that holds a GPU worker (the
    driver's node may have none): a GPU bundle on a node without a usable CUDA device (the autoscaling
    rehearsal's simulated GPU nodes) trains on CPU, as the loop picks its device at run time."""
    if not config.gpus_per_worker:
        return "gloo"
    import ray

    @ray.remote(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker)
    def cuda_available() -> bool:
        import torch

        return torch.cuda.is_available()

    # As long as Ray Train itself waits for its workers (cluster/runtime_env.yaml sets it for GPU nodes from zero).
    timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    try:
        return "nccl" if ray.get(cuda_available.remote(), timeout=timeout) else "gloo"
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"no node with {config.cpus_per_worker:g} CPUs and {config.gpus_per_worker:g} GPUs for a "
                         f"training worker came up within {timeout:g}s: lower --gpus-per-worker / --cpus-per-worker, "
                         f"or check that the cluster can add such nodes") from None


def _fit(config: TrainJobConfig):
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # already Ray 2.60's default; the V1 API differs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dcfm.progress import RemoteProgress

    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True)
    storage_path, name = config.storage_path_and_name
    resources = {"CPU": config.cpus_per_worker}
    if config.gpus_per_worker:
        resources["GPU"] = config.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=_ddp_backend(config)),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own lines say what Ray's INFO lines would
        ),
    )
    progress = RemoteProgress(config.output, "train", config.steps, "steps")  # live only on a terminal
    try:
        return trainer.fit()
    finally:
        progress.close()
