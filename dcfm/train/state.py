"""Training checkpoints: the core's model checkpoint plus the optimiser and progress needed to resume.

A training checkpoint directory holds

* ``model.safetensors`` + ``dcfm.json`` — a checkpoint in the core's format (``dcfm segment`` and
  ``dcfm evaluate`` load it as it is; the card's metadata records the step and the loss);
* ``train_state.safetensors`` — the optimiser's tensors (momentum buffers, Adam moments);
* ``train_state.json`` — the step, the optimiser's non-tensor state and parameter groups, the steps each
  attempt started from, and the logged loss/throughput history.

Nothing is unpickled on load: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dcfm.checkpoint import CheckpointError, ModelCard, save_checkpoint
from dcfm.model import DCFM

STATE_FORMAT = "dcfm-train-state/1"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


@dataclass
class TrainState:
    """Progress of a run, carried from checkpoint to checkpoint."""

    step: int = 0  # optimisation steps done
    attempt_starts: list[int] = field(default_factory=list)  # the step every (re)start began from
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log interval


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the rest (for JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`; tensors are moved to the parameters' device by torch."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split("/", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entry in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entry)
    groups = meta["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the checkpoint's optimiser has other parameter groups than this model's; "
                              "it was written by another backbone or another version of dcfm")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_checkpoint(directory: str | os.PathLike, model: DCFM, card: ModelCard,
                             optimizer: torch.optim.Optimizer, state: TrainState) -> str:
    """Write the model checkpoint and the resume state into a local directory; returns the weights' digest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = optimizer_state(optimizer)
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": STATE_FORMAT})
    payload = {"format": STATE_FORMAT, **asdict(state), "optimizer": meta}
    (directory / STATE_JSON).write_text(json.dumps(payload, indent=1))
    # The card goes last (inside save_checkpoint): it marks the directory complete.
    return save_checkpoint(directory, model, card)


def read_train_state(directory: str | os.PathLike) -> tuple[TrainState, dict[str, Any]]:
    """The progress and the optimiser's JSON part of a local training checkpoint."""
    path = Path(directory) / STATE_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing; {directory} is a model checkpoint without training state, "
                              "so it cannot be resumed") from err
    if data.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r}, expected {STATE_FORMAT!r}")
    state = TrainState(int(data["step"]), [int(s) for s in data["attempt_starts"]], list(data["history"]))
    return state, data["optimizer"]


def load_optimizer_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / STATE_TENSORS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the training checkpoint is incomplete")
    return load_file(str(path))
