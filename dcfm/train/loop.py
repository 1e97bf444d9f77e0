"""The training loop: the one ``dcfm train`` runs on every Ray Train worker and ``train_locally`` runs in
this process, without Ray, as one worker (``make demo``, tests).

Each worker reads its own shard of pairs, restores the latest checkpoint when Ray hands one over (after a
worker failure, or when a command is rerun on the same output), trains with DDP (gloo on CPU, NCCL on GPU)
and synchronised BatchNorm, logs loss and throughput every ``log_every`` steps, and reports a checkpoint
with its metrics every ``checkpoint_every`` steps and at the last step. Only rank 0 writes checkpoint files.

Only checkpoints go through ``ray.train.report``: a worker's report waits until the controller has taken the
previous one (its queue holds one, polled every couple of seconds), so reporting every step would throttle
training. Logged rows are kept in the training state and end up in the run record.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dcfm.checkpoint import CheckpointError, ModelCard, load_checkpoint, read_card
from dcfm.losses import LossWeights
from dcfm.model import DCFM, DCFMConfig
from dcfm.train.config import TrainJobConfig
from dcfm.progress import tell_progress
from dcfm.train.data import PairStream, open_training_pairs, shard_refs
from dcfm.train.state import (TrainState, load_optimizer_tensors, read_train_state, restore_optimizer,
                              save_training_checkpoint)
from dcfm.train.recipe import build_optimizer, poly_lr, set_lr, train_step
from dcfm.telemetry import TrainTelemetry
from dcfm.train.syncbn import convert_sync_batchnorm

CHECKPOINT_PREFIX = "checkpoint_"


def _log(line: str) -> None:
    # Not print(): Ray Train patches print into its logger and echoes it, which doubles every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def _restore(directory: str, where: str, model_config: DCFMConfig) -> tuple[dict[str, torch.Tensor], TrainState, dict, dict]:
    """Weights, progress and optimiser state of the training checkpoint in local ``directory`` (from ``where``)."""
    loaded = load_checkpoint(directory)
    if loaded.card.config != model_config:
        raise CheckpointError(
            f"checkpoint {where} holds a {loaded.card.config} model but this run trains "
            f"{model_config}; use a new --output for another model")
    state, optimizer_meta = read_train_state(directory)
    return loaded.model.state_dict(), state, optimizer_meta, load_optimizer_tensors(directory)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class _Window:
    """Loss sums and timings between two reports.

    The sums stay on the training device until a report: one host sync per report instead of one per loss
    term per step, and NCCL can all-reduce them (it cannot all-reduce host tensors)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.steps = 0
        self.sums: torch.Tensor | None = None  # total, key CE, reuse CE, consistency, similarity
        self.has_similarity = False

    def add(self, terms) -> None:
        self.steps += 1
        similarity = terms.similarity if terms.similarity is not None else torch.zeros_like(terms.total)
        self.has_similarity = terms.similarity is not None
        step_terms = torch.stack([terms.total.detach(), terms.key_ce, terms.reuse_ce, terms.consistency,
                                  similarity]).to(torch.float64)
        self.sums = step_terms if self.sums is None else self.sums + step_terms


def _metrics(window: _Window, step: int, config: TrainJobConfig, world: int, lr: float,
             epoch: float) -> dict[str, float]:
    sums = window.sums.clone() if window.sums is not None else torch.zeros(5, dtype=torch.float64)
    if world > 1:  # the mean over all workers' batches, not rank 0's alone
        dist.all_reduce(sums)
        sums /= world
    sums = (sums / max(1, window.steps)).tolist()
    elapsed = time.perf_counter() - window.start
    row = {
        "step": step, "epoch": round(epoch, 4), "loss": sums[0], "key_ce": sums[1],
        "reuse_ce": sums[2], "consistency": sums[3], "lr": lr,
        "pairs_per_s": world * config.batch_size * window.steps / elapsed if elapsed > 0 else float("nan"),
        "data_fraction": window.data_seconds / elapsed if elapsed > 0 else float("nan"),
    }
    if window.has_similarity:  # reduced-resolution models only: the FST term (λ3)
        row["similarity"] = sums[4]
    return row


def _similarity_part(row: dict[str, float]) -> str:
    return f" sim {row['similarity']:.5f}" if "similarity" in row else ""


@dataclass
class _Setup:
    """Everything a worker trains with, built from the config and (when resuming) a checkpoint."""

    stream: PairStream
    weights: LossWeights
    model: DCFM  # with synchronised BatchNorm when world > 1
    network: torch.nn.Module  # the model, DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    card: ModelCard
    state: TrainState
    dataset_size: int
    layout: str


def _setup(config: TrainJobConfig, rank: int, world: int, device: torch.device, resume: tuple[str, str] | None) -> _Setup:
    """``resume``: (local directory, where it came from) of the checkpoint to continue, or None."""
    from torch.nn.parallel import DistributedDataParallel

    dataset, candidates = open_training_pairs(config.data, config.layout, config.split, config.delta,
                                              config.max_delta, config.decoded_cache_mb, config.data_cache)
    stream = PairStream(dataset, shard_refs(candidates, rank, world), config.augment, config.batch_size,
                        config.seed, rank)
    model_config = DCFMConfig(config.backbone, num_classes=len(dataset.classes),
                              pretrained_backbone=config.pretrained_backbone, nonkey_scale=config.nonkey_scale)
    if resume is not None:
        # A run keeps the reduced-resolution bridge it started with: the job has no setting for these choices,
        # whose defaults changed between versions, and a run begun under the old ones must still resume.
        started_with = read_card(resume[0])[0].config
        model_config = replace(model_config, lowres_correction=started_with.lowres_correction,
                               lowres_shallow=started_with.lowres_shallow)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DCFM(model_config)
    state, restored = TrainState(), None
    if resume is not None:
        weights_state, state, optimizer_meta, optimizer_tensors = _restore(*resume, model_config)
        model.load_state_dict(weights_state)
        restored = (optimizer_tensors, optimizer_meta)
    model.to(device)
    if world > 1:
        # A separate gloo group keeps BatchNorm's collectives apart from DDP's on the default group.
        group = dist.new_group(backend="gloo") if device.type != "cuda" else None
        model = convert_sync_batchnorm(model, device, group)
    optimizer = build_optimizer(model, config.optim)
    if restored is not None:
        restore_optimizer(optimizer, *restored)
    network = model
    if world > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    card = ModelCard(model_config, list(dataset.classes), list(dataset.palette), train_size=tuple(config.augment.crop),
                     ignore_index=dataset.ignore_index)
    weights = config.loss or LossWeights.for_dataset(dataset.layout)
    return _Setup(stream, weights, model, network, optimizer, card, state, len(dataset), dataset.layout)


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO with its metrics; our own step lines already say the same."""
    try:  # its logger is named by the module's file path
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# Called with the logged row at every checkpoint step: (row, state, model, card, optimizer).
SaveCheckpoint = Callable[[dict, TrainState, DCFM, ModelCard, torch.optim.Optimizer], None]


def _train(config: TrainJobConfig, run: _Setup, rank: int, world: int, device: torch.device, resumed: bool,
           save: SaveCheckpoint, after_step: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """The loop itself: steps from the restored one to ``config.steps``; returns the step reached and where
    this attempt started. ``after_step(step, last_saved)`` runs after every step (fault injection)."""
    state, resolved = run.state, config.optim.resolved(config.backbone, config.steps)

    start = state.step
    state.attempt_starts.append(start)
    if rank == 0:
        _log(f"[train] worker 0/{world}: {run.dataset_size} pairs ({run.layout}), {len(run.stream.refs)} in this "
             f"shard; {'resuming from step ' + str(start) if resumed else 'starting'} of "
             f"{config.steps} on {device}")
    last_saved: int | None = None
    window = _Window()
    telemetry = TrainTelemetry(config.storage_path_and_name[1]) if rank == 0 else None  # no-op outside Ray
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        batch = run.stream.batch(step).to(device)
        window.data_seconds += time.perf_counter() - t0
        factor = poly_lr(step, config.steps, resolved.power, resolved.warmup_steps)
        set_lr(run.optimizer, factor)
        torch.manual_seed(_step_seed(config.seed, rank, step))  # dropout: reproducible across resumes
        window.add(train_step(run.network, run.optimizer, batch, run.weights))
        state.step = step + 1
        if rank == 0:
            tell_progress(config.output, state.step)
        if after_step is not None:
            after_step(state.step, last_saved)
        save_now = state.step % config.checkpoint_every == 0 or state.step == config.steps
        if save_now or state.step % config.log_every == 0:
            # "lr" is the encoder's; the decoder's is decoder_lr_mult times it.
            row = _metrics(window, state.step, config, world, resolved.lr * factor, run.stream.epoch_of(state.step))
            state.history.append(row)
            if telemetry is not None:
                telemetry.logged(row, window.steps)
            window = _Window()
            if rank == 0:
                _log(f"[train] step {row['step']}/{config.steps} loss {row['loss']:.4f} (key {row['key_ce']:.4f} "
                     f"reuse {row['reuse_ce']:.4f} pc {row['consistency']:.5f}{_similarity_part(row)}) "
                     f"lr {row['lr']:.2e} | "
                     f"{row['pairs_per_s']:.2f} pairs/s on {world} worker(s), data {100 * row['data_fraction']:.0f}%")
        if save_now:
            save(row, state, run.model, run.card, run.optimizer)
            last_saved = state.step
    return {"step": state.step, "attempt_starts": state.attempt_starts, "trained_steps": state.step - start}


def train_loop_per_worker(config: TrainJobConfig) -> dict[str, Any]:
    """Ray Train entry point; returns (on every rank) the step reached and where this attempt started."""
    import ray.train
    import ray.train.torch

    _quiet_report_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    # Ray's device for the worker's GPU bundle, if torch can use CUDA here; else the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext() as directory:
        run = _setup(config, rank, world, device, (directory, checkpoint.path) if checkpoint is not None else None)
    crash_here = config.fail_at_step is not None and checkpoint is None and rank == world - 1

    def after_step(step: int, last_saved: int | None) -> None:
        if crash_here and step == config.fail_at_step:
            _die_after_registration(context, last_saved)

    def save(row: dict, state: TrainState, model: DCFM, card: ModelCard, optimizer: torch.optim.Optimizer) -> None:
        _report_checkpoint(row, state, model, card, optimizer, config, rank)

    return _train(config, run, rank, world, device, checkpoint is not None, save, after_step)


@dataclass
class LocalRun:
    """What :func:`train_locally` trained: the model (in eval mode), its card, and the run's progress."""

    model: DCFM
    card: ModelCard
    state: TrainState


def train_locally(config: TrainJobConfig, device: torch.device | str | None = None) -> LocalRun:
    """Train in this process, without Ray, as the one worker of a ``config.workers == 1`` run.

    Checkpoints go to ``config.output`` (a local directory) as ``dcfm train`` writes them: every
    ``checkpoint_every`` steps and at the last, the newest ``keep_checkpoints`` kept, each complete or absent.
    A local run always starts at step 0 (resuming is the Ray job's).
    """
    from dcfm.devices import pick_device

    if config.workers != 1:
        raise ValueError(f"a local run is one worker; got workers={config.workers} (use the Ray job)")
    if "://" in config.output:
        raise ValueError(f"a local run writes its checkpoints to a local directory, not {config.output}")
    device = pick_device(str(device or "auto")) if not isinstance(device, torch.device) else device
    output = Path(config.output)
    run = _setup(config, 0, 1, device, None)

    def save(row: dict, state: TrainState, model: DCFM, card: ModelCard, optimizer: torch.optim.Optimizer) -> None:
        target = output / checkpoint_dir_name(state.step)
        output.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output, prefix=f".{target.name}."))
        try:
            _write_checkpoint(tmp, row, state, model, card, optimizer, config)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = sorted(p for p in output.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit())
        for old in kept[: -config.keep_checkpoints]:
            shutil.rmtree(old)

    _train(config, run, 0, 1, device, False, save)
    run.model.eval()
    return LocalRun(run.model, run.card, run.state)


def _die_after_registration(context, last_saved: int | None, timeout_s: float = 120.0) -> None:
    """Fault injection for tests: SIGKILL this worker (as the OOM killer would), but only once Ray Train has
    registered the latest checkpoint in its snapshot, so the test knows which step the run must resume from."""
    if last_saved is not None:
        storage = context.get_storage()
        wanted = checkpoint_dir_name(last_saved).encode()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
                    if wanted in f.read():
                        break
            except (FileNotFoundError, OSError):
                pass
            time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _write_checkpoint(directory: str | Path, row: dict, state: TrainState, model: DCFM, card: ModelCard,
                      optimizer: torch.optim.Optimizer, config: TrainJobConfig) -> None:
    """A training checkpoint in a local directory, its card recording the step, the loss and the settings."""
    card.metadata = {"step": state.step, "steps": config.steps, "loss": row["loss"], "settings": config.run_settings()}
    save_training_checkpoint(directory, model, card, optimizer, state)


def _report_checkpoint(row: dict, state: TrainState, model: DCFM, card: ModelCard,
                       optimizer: torch.optim.Optimizer, config: TrainJobConfig, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="dcfm-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            _write_checkpoint(tmp, row, state, model, card, optimizer, config)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # Every rank calls report (it is a barrier); only rank 0's carries files.
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step))
