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


def dcfm_loss(
    outputs: PairOutput,
    labels: torch.Tensor,
    weights: LossWeights = LossWeights(),
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """L = CE_key + λ1·CE_reuse + λ2·L_pc (eq. 12), + λ3·FST similarity for reduced-resolution models."""
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
    return LossTerms(total, key_ce.detach(), reuse_ce.detach(), pc.detach(), similarity.detach())
