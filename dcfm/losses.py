"""DCFM's joint training loss (METHOD.md §3, eqs. 8-12)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcfm.data import IGNORE_INDEX
from dcfm.model import PairOutput, upsample_logits


@dataclass(frozen=True)
class LossWeights:
    """λ1 (reuse CE) and λ2 (consistency). Defaults: the paper's Cityscapes/CamVid values (Table I).

    ``similarity`` (λ3) weighs the FST-style loss of reduced-resolution models (``nonkey_scale`` < 1) and is
    unused otherwise. It defaults to λ2's 10: both are MSEs between L2-normalised fused features.
    """

    reuse: float = 0.4
    consistency: float = 10.0
    similarity: float = 10.0
    # λ4: distillation of the full-resolution keyframe logits into the low-resolution non-key logits of the same
    # frame, both directions (reduced-resolution models only; 0 = off, the first version's loss).
    distill: float = 0.0

    @classmethod
    def for_dataset(cls, name: str) -> LossWeights:
        """The paper's λ for a dataset family: VSPW uses 0.2 / 5.0, Cityscapes and CamVid 0.4 / 10.0."""
        return cls(0.2, 5.0) if name.lower() == "vspw" else cls()


@dataclass
class LossTerms:
    """The joint loss and its parts (the parts detached, for logging)."""

    total: torch.Tensor
    key_ce: torch.Tensor
    reuse_ce: torch.Tensor
    consistency: torch.Tensor
    similarity: torch.Tensor | None = None  # reduced-resolution models only
    distill: torch.Tensor | None = None  # reduced-resolution models with λ4 > 0 only


def segmentation_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy with logits upsampled to the label size."""
    return F.cross_entropy(
        upsample_logits(logits, tuple(labels.shape[-2:])), labels.long(), ignore_index=ignore_index
    )


def consistency_loss(
    labeled_fused: torch.Tensor,
    neighbour_fused: torch.Tensor,
    labeled_logits: torch.Tensor,
    neighbour_logits: torch.Tensor,
) -> torch.Tensor:
    """L_pc = MSE(F_L·M, F_U·M), M = pixels whose predicted class agrees between the frames (eqs. 10-11).

    The mask is a constant: it selects pixels, it is not trained. Where predictions differ the term is
    zero, so the loss only ever pulls same-class features together.
    """
    with torch.no_grad():
        mask = (labeled_logits.argmax(1) == neighbour_logits.argmax(1)).unsqueeze(1).to(labeled_fused.dtype)
    return F.mse_loss(labeled_fused * mask, neighbour_fused * mask)


def feature_similarity_loss(lowres: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FST-style explicit similarity: MSE between a reduced-resolution non-key fused feature and the
    full-resolution keyframe fused feature of the same frame, the latter area-resampled to the former's grid
    and detached (the high-resolution branch is the reference, not pulled towards the low-resolution one)."""
    target = target.detach()
    if target.shape[-2:] != lowres.shape[-2:]:
        target = F.interpolate(target, size=lowres.shape[-2:], mode="area")
    return F.mse_loss(lowres, target)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pixel KL(softmax(teacher) || softmax(student)), mean over pixels: the low-resolution non-key logits pulled
    towards the (detached) full-resolution keyframe logits of the same frame, area-resampled to the student's
    grid. Unlike the label CE it also supervises the unlabelled neighbour's low-resolution pass."""
    teacher = teacher.detach()
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="area")
    kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="none", log_target=True)
    return kl.sum(1).mean()


def dcfm_loss(
    outputs: PairOutput,
    labels: torch.Tensor,
    weights: LossWeights = LossWeights(),
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """L = CE_key + λ1·CE_reuse + λ2·L_pc (eq. 12), + λ3·FST similarity and λ4·distillation for
    reduced-resolution models."""
    key_ce = segmentation_ce(outputs.key_logits, labels, ignore_index)
    reuse_ce = segmentation_ce(outputs.reuse_logits, labels, ignore_index)
    pc = consistency_loss(
        outputs.labeled_fused, outputs.neighbour_fused, outputs.key_logits, outputs.neighbour_logits
    )
    total = key_ce + weights.reuse * reuse_ce + weights.consistency * pc
    if not outputs.lowres_fused:
        return LossTerms(total, key_ce.detach(), reuse_ce.detach(), pc.detach())
    similarity = sum(feature_similarity_loss(low, high)
                     for low, high in zip(outputs.lowres_fused, outputs.lowres_targets)) / len(outputs.lowres_fused)
    total = total + weights.similarity * similarity
    if not weights.distill:
        return LossTerms(total, key_ce.detach(), reuse_ce.detach(), pc.detach(), similarity.detach())
    distill = sum(distillation_loss(student, teacher)
                  for student, teacher in zip(outputs.lowres_logits, outputs.lowres_teachers)) / len(outputs.lowres_logits)
    total = total + weights.distill * distill
    return LossTerms(total, key_ce.detach(), reuse_ce.detach(), pc.detach(), similarity.detach(), distill.detach())
