"""The DCFM network (METHOD.md §2): shallow/deep split, projection, FFM, L2 norms and head.

Three entry points matter:

* ``forward_keyframe`` – eqs. (1)-(4): independent + common features and logits of a keyframe;
* ``forward_reuse`` – eqs. (5)-(6): a non-keyframe given cached common features; the deep layers do not run;
* ``forward_pair`` – the symmetric training pair of §3 (labelled frame + unlabelled neighbour).

Logits are returned at feature resolution; ``upsample_logits`` brings them to a label size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcfm.backbones import BackboneAdapter, create_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DCFMConfig:
    """Architecture of a DCFM network. ``None`` widths take the backbone family's official default."""

    backbone: str = "resnet18"
    num_classes: int = 19
    projection_channels: int | None = None
    fusion_channels: int | None = None  # FFM output width; defaults to the common feature width
    dropout: float = 0.1
    pretrained_backbone: bool = False  # ImageNet weights from the timm hub (needs network access)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DCFMConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DCFM config fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**data)


@dataclass
class KeyframeOutput:
    """Everything a keyframe pass produces; ``common`` is what non-keyframes reuse."""

    independent: torch.Tensor  # raw f_ind (stride 4), before normalisation
    common: torch.Tensor  # f_com = Conv(Enc(I)), before normalisation
    logits: torch.Tensor  # at the common feature's resolution


@dataclass
class PairOutput:
    """Outputs of the symmetric training step on (labelled L, unlabelled neighbour U)."""

    key_logits: torch.Tensor  # S_L: L as its own keyframe, eq. (8)
    reuse_logits: torch.Tensor  # Ŝ_L: L as a non-keyframe of keyframe U, eq. (9)
    labeled_fused: torch.Tensor  # F_L, eq. (10)
    neighbour_fused: torch.Tensor  # F_U
    neighbour_logits: torch.Tensor  # Dec(F_U), only used to build the consistency mask


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation over channels (the paper's Norm)."""
    return F.normalize(x, p=2.0, dim=1)


class FeatureFusion(nn.Module):
    """FFM: resize f_ind to f_com's size, concat f_com with the first half of f_ind, 1x1 conv + BN + ReLU.

    The 1x1 conv over ``[f_com, f_ind_half]`` is stored as its two column blocks (``common_term`` with the bias,
    ``independent_term`` without): the same function, but the keyframe's block can be computed once and
    reused by every non-keyframe, which then pays only for the small independent block.
    """

    def __init__(self, common_channels: int, independent_channels: int, out_channels: int) -> None:
        super().__init__()
        self.independent_used = independent_channels // 2
        self.common_term = nn.Conv2d(common_channels, out_channels, 1, bias=True)
        self.independent_term = nn.Conv2d(self.independent_used, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def keyframe_term(self, common: torch.Tensor) -> torch.Tensor:
        """The keyframe's share of the fusion conv; cache it alongside (or instead of) f_com."""
        # The official code L2-normalises both inputs so neither dominates the concatenation.
        return self.common_term(l2_normalize(common))

    def combine(self, keyframe_term: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        """Finish the fusion of a cached keyframe term with a frame's raw f_ind."""
        independent = independent[:, : self.independent_used]
        if independent.shape[-2:] != keyframe_term.shape[-2:]:
            independent = F.interpolate(
                independent, size=keyframe_term.shape[-2:], mode="bilinear", align_corners=False
            )
        return F.relu(self.norm(keyframe_term + self.independent_term(l2_normalize(independent))))

    def forward(self, common: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        return self.combine(self.keyframe_term(common), independent)


def build_head(in_channels: int, num_classes: int, hidden: int | None, dropout: float) -> nn.Sequential:
    """The decoder Dec: ResNet style (1x1 conv-BN-ReLU, dropout, classifier) or MiT style (dropout, classifier)."""
    if hidden is None:
        return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, 1))
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden, num_classes, 1),
    )


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of logits to a label size (align_corners=False, as in training)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DCFM(nn.Module):
    """Deep Common Feature Mining segmentation network."""

    def __init__(self, config: DCFMConfig) -> None:
        super().__init__()
        if config.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {config.num_classes}")
        self.config = config
        self.backbone: BackboneAdapter = create_backbone(config.backbone, pretrained=config.pretrained_backbone)
        contract = self.backbone.contract
        projection = config.projection_channels or contract.default_projection_channels
        if projection is None:
            self.projection: nn.Module = nn.Identity()
            common_channels = contract.common_channels
        else:
            self.projection = nn.Conv2d(contract.common_channels, projection, 1, bias=False)
            common_channels = projection
        fusion_channels = config.fusion_channels or common_channels
        self.fusion = FeatureFusion(common_channels, contract.independent_channels, fusion_channels)
        self.head = build_head(fusion_channels, config.num_classes, contract.head_hidden_channels, config.dropout)
        self.common_channels = common_channels
        self.fusion_channels = fusion_channels

    # --- the building blocks, eqs. (1)-(6) -------------------------------------------------------------------
    def independent(self, images: torch.Tensor) -> torch.Tensor:
        """f_ind = Enc_shallow(I), eq. (1). Cheap; runs on every frame."""
        return self.backbone.shallow(images)

    def common(self, independent: torch.Tensor) -> torch.Tensor:
        """f_com = Conv(Enc(I)), eq. (2), continuing from the frame's own f_ind. Runs on keyframes only."""
        return self.projection(self.backbone.deep(independent))

    def fuse(self, common: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        """F = Norm(FFM(f_com, f_ind)), eqs. (3) and (5)."""
        return l2_normalize(self.fusion(common, independent))

    def logits_from_term(self, keyframe_term: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        """Logits of frames given a keyframe's cached fusion term (``fusion.keyframe_term(f_com)``)."""
        return self.decode(l2_normalize(self.fusion.combine(keyframe_term, independent)))

    def decode(self, fused: torch.Tensor) -> torch.Tensor:
        """S = Dec(F), eqs. (4) and (6), at feature resolution."""
        return self.head(fused)

    # --- the three paths -------------------------------------------------------------------------------------
    def forward_keyframe(self, images: torch.Tensor) -> KeyframeOutput:
        """Keyframe path: independent and common features plus logits."""
        independent = self.independent(images)
        common = self.common(independent)
        return KeyframeOutput(independent, common, self.decode(self.fuse(common, independent)))

    def forward_reuse(self, images: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
        """Non-keyframe path: logits of ``images`` given a keyframe's cached ``common`` feature."""
        return self.decode(self.fuse(common, self.independent(images)))

    def forward_pair(self, labeled: torch.Tensor, neighbour: torch.Tensor) -> PairOutput:
        """Symmetric training forward: both frames through the whole encoder, then the three fusions."""
        batch = labeled.shape[0]
        independent = self.independent(torch.cat([labeled, neighbour]))
        common = self.common(independent)
        ind_l, ind_u = independent[:batch], independent[batch:]
        com_l, com_u = common[:batch], common[batch:]
        fused_l = self.fuse(com_l, ind_l)
        fused_u = self.fuse(com_u, ind_u)
        fused_reuse = self.fuse(com_u, ind_l)
        logits = self.decode(torch.cat([fused_l, fused_u, fused_reuse]))
        key_logits, neighbour_logits, reuse_logits = logits.split(batch)
        return PairOutput(key_logits, reuse_logits, fused_l, fused_u, neighbour_logits)

    def forward(self, images: torch.Tensor, neighbour: torch.Tensor | None = None) -> torch.Tensor | PairOutput:
        """Per-frame logits at the input size (every frame a keyframe); with ``neighbour``, the training pair.

        Going through ``forward`` for pairs lets DistributedDataParallel see the training computation.
        """
        if neighbour is not None:
            return self.forward_pair(images, neighbour)
        return upsample_logits(self.forward_keyframe(images).logits, tuple(images.shape[-2:]))
