"""The training recipe (METHOD.md §3): what one step of symmetric-pair training does, used by the loop in
:mod:`dcfm.train.loop`.

* ``PairAugment``: one random scale / rotation / crop / flip / colour jitter drawn per pair and applied
  identically to the labelled frame, its neighbour and the label;
* ``build_optimizer`` / ``poly_lr``: the official optimisation recipes (SGD for ResNet, AdamW with a 10x
  decoder learning rate for MiT/PVTv2; poly decay with linear warm-up);
* ``train_step``: one optimisation step of the joint loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from dcfm.data import IGNORE_INDEX
from dcfm.data.base import PairSample
from dcfm.losses import LossTerms, LossWeights, dcfm_loss
from dcfm.model import DCFM, IMAGENET_MEAN, IMAGENET_STD


@dataclass
class AugmentConfig:
    """Random pair augmentation; ``crop`` is the (H, W) every sample ends up at."""

    crop: tuple[int, int] = (256, 512)
    scale: tuple[float, float] = (0.75, 1.5)
    max_rotation_deg: float = 5.0
    flip: bool = True
    colour_jitter: float = 0.2  # brightness / contrast / saturation factors drawn from [1-j, 1+j]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class PairBatch:
    labeled: torch.Tensor  # B x 3 x H x W, normalised
    neighbour: torch.Tensor
    labels: torch.Tensor  # B x H x W int64, 255 = ignore

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.labeled.to(device), self.neighbour.to(device), self.labels.to(device))


class PairAugment:
    """Draws one set of augmentation parameters per pair and applies it to both frames and the label."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        self._mean = torch.tensor(config.mean).view(3, 1, 1)
        self._std = torch.tensor(config.std).view(3, 1, 1)

    def __call__(
        self, sample: PairSample, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        # np.stack copies: decoded frames may be read-only arrays, which torch warns about sharing.
        frames = torch.from_numpy(np.stack([sample.labeled, sample.neighbour])).permute(0, 3, 1, 2)  # 2x3xHxW uint8
        label = torch.tensor(sample.label)[None]  # 1 x H x W; a copy: decoded PNGs are read-only
        height, width = label.shape[-2:]
        crop_h, crop_w = cfg.crop
        # Scale relative to the size that makes the crop fit, so small sources still fill the crop.
        base = max(crop_h / height, crop_w / width)
        factor = base * rng.uniform(*cfg.scale)
        size = [max(crop_h, round(height * factor)), max(crop_w, round(width * factor))]
        frames = TF.resize(frames, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label, size, interpolation=InterpolationMode.NEAREST)
        if cfg.max_rotation_deg > 0:
            angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
            frames = TF.rotate(frames, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
            label = TF.rotate(label, angle, interpolation=InterpolationMode.NEAREST, fill=IGNORE_INDEX)
        top = int(rng.integers(0, size[0] - crop_h + 1))
        left = int(rng.integers(0, size[1] - crop_w + 1))
        frames = frames[..., top : top + crop_h, left : left + crop_w]
        label = label[..., top : top + crop_h, left : left + crop_w]
        if cfg.flip and rng.random() < 0.5:
            frames, label = frames.flip(-1), label.flip(-1)
        if cfg.colour_jitter > 0:
            low, high = 1 - cfg.colour_jitter, 1 + cfg.colour_jitter
            frames = TF.adjust_brightness(frames, float(rng.uniform(low, high)))
            frames = TF.adjust_contrast(frames, float(rng.uniform(low, high)))
            frames = TF.adjust_saturation(frames, float(rng.uniform(low, high)))
        normalised = (frames.float() / 255.0 - self._mean) / self._std
        return normalised[0], normalised[1], label[0].long()

    def batch(self, samples: list[PairSample], rng: np.random.Generator) -> PairBatch:
        """Augment and stack samples into a training batch."""
        parts = [self(sample, rng) for sample in samples]
        return PairBatch(*(torch.stack(p) for p in zip(*parts)))


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``None`` fields take the backbone family's official recipe (METHOD.md §3)."""

    name: str | None = None  # "sgd" | "adamw"
    lr: float | None = None
    decoder_lr_mult: float | None = None  # AdamW recipe: 10x for everything outside the backbone
    weight_decay: float | None = None
    momentum: float = 0.9
    power: float | None = None  # poly exponent
    # Linear warm-up steps before poly decay. None: the recipe's, which needs the run's length (see resolved).
    warmup_steps: int | None = None

    def resolved(self, backbone: str, total_steps: int | None = None) -> OptimConfig:
        """Fill unset fields from the official recipe for ``backbone``.

        The AdamW (MiT) recipe warms up for 1500 of its 160k iterations, so an unset ``warmup_steps`` becomes
        ``min(1500, total_steps // 10)`` for AdamW (0 when ``total_steps`` is not given) and 0 for SGD.
        """
        if backbone.startswith("resnet"):
            defaults = OptimConfig("sgd", 0.01, 1.0, 5e-4, power=0.9)
        else:
            defaults = OptimConfig("adamw", 6e-5, 10.0, 0.01, power=1.0)
        name = self.name or defaults.name
        warmup = self.warmup_steps
        if warmup is None:
            warmup = min(1500, total_steps // 10) if name == "adamw" and total_steps else 0
        return OptimConfig(
            name=name,
            lr=self.lr if self.lr is not None else defaults.lr,
            decoder_lr_mult=self.decoder_lr_mult if self.decoder_lr_mult is not None else defaults.decoder_lr_mult,
            weight_decay=self.weight_decay if self.weight_decay is not None else defaults.weight_decay,
            momentum=self.momentum,
            power=self.power if self.power is not None else defaults.power,
            warmup_steps=warmup,
        )


def build_optimizer(model: DCFM, config: OptimConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the timm backbone (with the reduced-resolution pass's copy of its shallow layers),
    and everything after it (projection, FFM, head, PPM/decoder count as backbone only where timm owns them)."""
    cfg = config.resolved(model.config.backbone)
    bare = getattr(model, "module", model)
    timm_params = {id(p) for name, p in bare.backbone.named_parameters() if not name.startswith(("ppm.", "decoder."))}
    if bare.shallow_lowres is not None:  # the reduced-resolution pass's copy of timm's shallow layers
        timm_params |= {id(p) for p in bare.shallow_lowres.parameters()}
    encoder = [p for p in bare.parameters() if id(p) in timm_params]
    decoder = [p for p in bare.parameters() if id(p) not in timm_params]
    groups = [
        {"params": encoder, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": decoder, "lr": cfg.lr * cfg.decoder_lr_mult, "base_lr": cfg.lr * cfg.decoder_lr_mult},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.name!r}: expected 'sgd' or 'adamw'")


def poly_lr(step: int, total_steps: int, power: float, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then (1 - progress)^power."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, step / max(1, total_steps))
    return max(0.0, 1.0 - progress) ** power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    weights: LossWeights,
) -> LossTerms:
    """One step of CE_key + λ1·CE_reuse + λ2·L_pc on a pair batch (model may be DDP-wrapped)."""
    model.train()
    outputs = model(batch.labeled, batch.neighbour)
    terms = dcfm_loss(outputs, batch.labels, weights)
    if not math.isfinite(terms.total.item()):
        raise FloatingPointError(f"non-finite loss {terms.total.item()}: lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    return terms
