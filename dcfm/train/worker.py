"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker.

Each worker reads its own shard of pairs, restores the latest checkpoint when Ray hands one over (after a
worker failure, or when a command is rerun on the same output), trains with DDP (gloo on CPU, NCCL on GPU)
and synchronised BatchNorm, and reports metrics every ``log_every`` steps and a checkpoint every
``checkpoint_every`` steps (and at the last step). Only rank 0 writes checkpoint files.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dcfm.checkpoint import CheckpointError, ModelCard, load_checkpoint
from dcfm.losses import LossWeights
from dcfm.model import DCFM, DCFMConfig
from dcfm.train.config import TrainJobConfig
from dcfm.train.data import PairStream, open_training_data, shard_refs
from dcfm.train.state import (TrainState, load_optimizer_tensors, read_train_state, restore_optimizer,
                              save_training_checkpoint)
from dcfm.train.syncbn import convert_sync_batchnorm
from dcfm.training import build_optimizer, poly_lr, set_lr, train_step

CHECKPOINT_PREFIX = "checkpoint_"


def _log(line: str) -> None:
    # Not print(): Ray Train patches print into its logger and echoes it, which doubles every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def _restore(checkpoint, model_config: DCFMConfig) -> tuple[dict[str, torch.Tensor], TrainState, dict, dict]:
    """Weights, progress and optimiser state of a Ray checkpoint (downloaded to a local directory)."""
    with checkpoint.as_directory() as directory:
        loaded = load_checkpoint(directory)
        if loaded.card.config != model_config:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds a {loaded.card.config} model but this run trains "
                f"{model_config}; use a new --output for another model")
        state, optimizer_meta = read_train_state(directory)
        return loaded.model.state_dict(), state, optimizer_meta, load_optimizer_tensors(directory)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class _Window:
    """Loss sums and timings between two reports."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.steps = 0
        self.sums = torch.zeros(4, dtype=torch.float64)  # total, key CE, reuse CE, consistency

    def add(self, terms) -> None:
        self.steps += 1
        self.sums += torch.tensor([terms.total.item(), terms.key_ce.item(), terms.reuse_ce.item(),
                                   terms.consistency.item()], dtype=torch.float64)


def _metrics(window: _Window, step: int, config: TrainJobConfig, world: int, lr: float, epoch: float) -> dict[str, float]:
    sums = window.sums.clone()
    if world > 1:  # the mean over all workers' batches, not rank 0's alone
        dist.all_reduce(sums)
        sums /= world
    sums /= max(1, window.steps)
    elapsed = time.perf_counter() - window.start
    return {
        "step": step, "epoch": round(epoch, 4), "loss": float(sums[0]), "key_ce": float(sums[1]),
        "reuse_ce": float(sums[2]), "consistency": float(sums[3]), "lr": lr,
        "pairs_per_s": world * config.batch_size * window.steps / elapsed if elapsed > 0 else float("nan"),
        "data_fraction": window.data_seconds / elapsed if elapsed > 0 else float("nan"),
    }


def train_loop_per_worker(config: TrainJobConfig) -> dict[str, Any]:
    """Ray Train entry point; returns (on every rank) the step reached and where this attempt started."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    device = ray.train.torch.get_device()

    dataset = open_training_data(config.data, config.layout, config.split, config.delta, config.decoded_cache_mb)
    stream = PairStream(dataset, shard_refs(dataset.refs, rank, world), config.augment, config.batch_size,
                        config.seed, rank)
    weights = config.loss or LossWeights.for_dataset(dataset.layout)
    model_config = DCFMConfig(config.backbone, num_classes=len(dataset.classes),
                              pretrained_backbone=config.pretrained_backbone)
    torch.manual_seed(config.seed)
    model = DCFM(model_config)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        weights_state, state, optimizer_meta, optimizer_tensors = _restore(checkpoint, model_config)
        model.load_state_dict(weights_state)
        restored = (optimizer_meta, optimizer_tensors)
    model.to(device)
    if world > 1:
        # A separate gloo group keeps BatchNorm's collectives apart from DDP's on the default group.
        group = dist.new_group(backend="gloo") if device.type != "cuda" else None
        model = convert_sync_batchnorm(model, device, group)
    optimizer = build_optimizer(model, config.optim)
    if restored is not None:
        restore_optimizer(optimizer, restored[1], restored[0])
    resolved = config.optim.resolved(config.backbone)
    network = model
    if world > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    card = ModelCard(model_config, list(dataset.classes), list(dataset.palette), train_size=tuple(config.augment.crop),
                     ignore_index=dataset.ignore_index)

    start = state.step
    state.attempt_starts.append(start)
    if rank == 0:
        _log(f"[train] worker 0/{world}: {len(dataset)} pairs ({dataset.layout}), {len(stream.refs)} in this shard; "
              f"{'resuming from step ' + str(start) if checkpoint is not None else 'starting'} of {config.steps} "
              f"on {device}")
    crash_here = (config.fail_at_step is not None and checkpoint is None and rank == world - 1)
    window = _Window()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        batch = stream.batch(step).to(device)
        window.data_seconds += time.perf_counter() - t0
        factor = poly_lr(step, config.steps, resolved.power, resolved.warmup_steps)
        set_lr(optimizer, factor)
        torch.manual_seed(_step_seed(config.seed, rank, step))  # dropout: reproducible across resumes
        window.add(train_step(network, optimizer, batch, weights))
        state.step = step + 1
        if crash_here and state.step == config.fail_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): a worker dies as if OOM-killed
        save = state.step % config.checkpoint_every == 0 or state.step == config.steps
        if not save and state.step % config.log_every:
            continue
        row = _metrics(window, state.step, config, world, resolved.lr * factor, stream.epoch_of(state.step))
        state.history.append(row)
        if rank == 0:
            _log(f"[train] step {row['step']}/{config.steps} loss {row['loss']:.4f} (key {row['key_ce']:.4f} "
                  f"reuse {row['reuse_ce']:.4f} pc {row['consistency']:.5f}) lr {row['lr']:.2e} | "
                  f"{row['pairs_per_s']:.2f} pairs/s on {world} worker(s), data {100 * row['data_fraction']:.0f}%")
        if save:
            _report_checkpoint(row, state, model, card, optimizer, config, rank)
        else:
            ray.train.report(row)
        window = _Window()
    return {"step": state.step, "attempt_starts": state.attempt_starts, "trained_steps": state.step - start}


def _report_checkpoint(row: dict, state: TrainState, model: DCFM, card: ModelCard,
                       optimizer: torch.optim.Optimizer, config: TrainJobConfig, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="dcfm-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            card.metadata = {"step": state.step, "steps": config.steps, "loss": row["loss"],
                             "settings": config.run_settings()}
            save_training_checkpoint(tmp, model, card, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # Every rank calls report (it is a barrier); only rank 0's carries files.
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step))
