"""Checkpoints: safetensors weights + a JSON model card, local or in object storage.

A checkpoint is a directory (or URI prefix) holding ``model.safetensors`` and ``dcfm.json``. The JSON
is written last and records the weights' SHA-256, so it doubles as the completion marker: a directory
without it, or whose weights do not match the recorded digest, is not a checkpoint. Loading never
unpickles anything, and never downloads anything (the card's ``pretrained_backbone`` only records how
training started).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dcfm import storage
from dcfm.classes import default_class_names, default_palette
from dcfm.data import IGNORE_INDEX
from dcfm.model import DCFM, IMAGENET_MEAN, IMAGENET_STD, DCFMConfig, LowresCorrection, LowresShallow

CHECKPOINT_FORMAT = "dcfm-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "dcfm.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the URI and what to do."""


@dataclass
class ModelCard:
    """Everything besides the weights that a user of the model needs."""

    config: DCFMConfig
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    train_size: tuple[int, int]  # (H, W) the model was trained at; segmentation resizes frames to it
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. training step, metrics; JSON values only

    def __post_init__(self) -> None:
        if len(self.class_names) != self.config.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for a model with {self.config.num_classes} classes"
            )
        if len(self.palette) != len(self.class_names):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.class_names)} classes")

    @property
    def nonkey_scale(self) -> float:
        """The non-keyframe resolution scale the model was trained for (recorded in ``config``; 1.0 = plain DCFM,
        and what cards written before the field existed mean)."""
        return self.config.nonkey_scale

    def check_nonkey_scale(self, requested: float | None, checkpoint_uri: str) -> None:
        """Refuse a non-keyframe scale other than the one the model was trained for (None: the card's)."""
        if requested is not None and requested != self.nonkey_scale:
            raise ValueError(f"--nonkey-scale {requested:g}: {storage.redact(checkpoint_uri)} was trained for "
                             f"non-keyframes at {self.nonkey_scale:g}; pass --nonkey-scale {self.nonkey_scale:g} "
                             "or leave it out")

    def to_json(self, weights_sha256: str) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return {"format": CHECKPOINT_FORMAT, "weights": WEIGHTS_FILE, "weights_sha256": weights_sha256, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        recorded = dict(data["config"])
        if float(recorded.get("nonkey_scale", 1.0)) < 1:
            # Reduced-resolution cards written before the correction was selectable were trained with the first
            # (depthwise) one; their weights load into that architecture.
            recorded.setdefault("lowres_correction", LowresCorrection.DEPTHWISE.value)
            # ... and those written before the reduced-resolution pass had its own shallow layers, with shared ones.
            recorded.setdefault("lowres_shallow", LowresShallow.SHARED.value)
        config = DCFMConfig.from_dict(recorded)
        # Cards from before names and colours were recorded still load, with the documented defaults.
        names = data.get("class_names") or default_class_names(config.num_classes)
        palette = data.get("palette") or default_palette(config.num_classes)
        return cls(
            config=config,
            class_names=[str(n) for n in names],
            palette=[tuple(int(v) for v in c) for c in palette],
            train_size=tuple(data["train_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            ignore_index=int(data["ignore_index"]),
            metadata=dict(data.get("metadata", {})),
        )


@dataclass
class LoadedCheckpoint:
    model: DCFM
    card: ModelCard
    digest: str  # SHA-256 of the weights file: identifies the model in outputs


def save_checkpoint(uri: str | os.PathLike, model: DCFM, card: ModelCard) -> str:
    """Write weights, then the card; returns the weights' SHA-256."""
    if card.config != model.config:
        raise ValueError("the model card's config differs from the model's own config")
    # Unwrap DDP / compiled modules so names match a bare DCFM.
    bare = getattr(model, "module", model)
    tensors = {name: t.detach().cpu().contiguous() for name, t in bare.state_dict().items()}
    weights = save_safetensors(tensors, metadata={"format": CHECKPOINT_FORMAT})
    digest = hashlib.sha256(weights).hexdigest()
    storage.write_bytes_atomic(storage.join(uri, WEIGHTS_FILE), weights)
    card_bytes = json.dumps(card.to_json(digest), indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(uri, CARD_FILE), card_bytes)
    return digest


def is_checkpoint(uri: str | os.PathLike) -> bool:
    """True when the completion marker (the card) exists."""
    return storage.exists(storage.join(uri, CARD_FILE))


def read_card(uri: str | os.PathLike) -> tuple[ModelCard, str]:
    """The model card and recorded weights digest, without touching the weights."""
    card_uri = storage.join(uri, CARD_FILE)
    try:
        data = json.loads(storage.read_bytes(card_uri))
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{uri}: no {CARD_FILE}; not a DCFM checkpoint, or one whose save did not finish. "
            "Point --checkpoint at a directory written by `dcfm train`."
        ) from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{card_uri}: not valid JSON ({err})") from err
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{card_uri}: format {data.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        return ModelCard.from_json(data), str(data["weights_sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{card_uri}: malformed model card ({err})") from err


def load_checkpoint(uri: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Build the model from the card and load the weights (safetensors only: nothing is unpickled)."""
    card, recorded_digest = read_card(uri)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        weights = storage.read_bytes(weights_uri)
    except FileNotFoundError as err:
        raise CheckpointError(f"{weights_uri}: missing; the checkpoint is incomplete") from err
    digest = hashlib.sha256(weights).hexdigest()
    if digest != recorded_digest:
        raise CheckpointError(
            f"{weights_uri}: SHA-256 {digest[:12]}… does not match {recorded_digest[:12]}… recorded in "
            f"{CARD_FILE}; the weights were replaced or truncated. Re-save the checkpoint."
        )
    try:
        state = load_safetensors(weights)
    except Exception as err:  # safetensors raises its own error type for a non-safetensors payload
        raise CheckpointError(f"{weights_uri}: not a safetensors file ({err}); pickled weights are refused") from err
    # The weights come from the checkpoint: a model trained from ImageNet weights (`--pretrained`, recorded in
    # the card) is built without them, so loading never downloads anything (actors often have no internet).
    model = DCFM(replace(card.config, pretrained_backbone=False))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reduced = card.config.nonkey_scale < 1
        bridge = (f", non-key scale {card.config.nonkey_scale:g} with lowres_correction "
                  f"{card.config.lowres_correction.value!r} and lowres_shallow {card.config.lowres_shallow.value!r}"
                  if reduced else "")
        hint = (f"; a reduced-resolution card must name the correction and shallow layers its weights were trained "
                f"with (cards without the fields mean {LowresCorrection.DEPTHWISE.value!r} and "
                f"{LowresShallow.SHARED.value!r})" if reduced else "")
        raise CheckpointError(
            f"{uri}: weights do not fit the architecture in {CARD_FILE} "
            f"(backbone {card.config.backbone!r}, {card.config.num_classes} classes{bridge}){hint}: {err}"
        ) from err
    return LoadedCheckpoint(model.to(device).eval(), card, digest)
