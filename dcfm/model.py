"""The DCFM network (METHOD.md §2): shallow/deep split, projection, FFM, L2 norms and head.

Three entry points matter:

* ``forward_keyframe`` – eqs. (1)-(4): independent + common features and logits of a keyframe;
* ``forward_reuse`` – eqs. (5)-(6): a non-keyframe given cached common features; the deep layers do not run;
* ``forward_pair`` – the symmetric training pair of §3 (labelled frame + unlabelled neighbour).

Logits are returned at feature resolution; ``upsample_logits`` brings them to a label size.

Reduced-resolution non-keyframes (AR-Seg with DCFM, ``DCFMConfig.nonkey_scale`` s < 1): a non-keyframe's
shallow features are computed on the frame resized by s, by its own copy of the shallow layers
(``LowresShallow.OWN``; the first version shared the keyframe's). ``CrossResolutionFusion`` (CReFF-style) aligns the
keyframe's cached fusion term to the low-resolution independent feature by area resampling, and a zero-initialised
residual corrects the low-resolution independent feature (its statistics differ from the full-resolution one's
the FFM was fitted to): a 3x3 conv over all channels of the low-resolution f_ind, BN, ReLU, 1x1 conv, BN
(``LowresCorrection.CONV``; the first version, a depthwise 3x3 + BN on the used half, stays loadable as
``DEPTHWISE``). AR-Seg's motion-vector warping and local attention are left out, since DCFM reuses common
features without alignment. Training adds an FST-style similarity loss between the low-resolution non-key fused
feature and the (detached) full-resolution keyframe fused feature of the same frame. s = 1 builds no extra module
and runs exactly the original code.

METHOD notes, where this code departs from the authors' official code, and why:

* Reduced resolution, measured on the synth training benchmark (BENCHMARKS.md, issue 11): with its own shallow
  layers (``LowresShallow.OWN``) s = 0.5 is 0.2 / 0.4 points of non-keyframe mIoU below s = 1.0 at k = 6 (causal /
  bidirectional) at 128x256 frames after 400 steps (1.4 / 1.1 above it after 800), and 3.0 / 2.9 below at
  64x128 (1365 steps), where a half-size frame is 32x64 and its f_ind an 8x16 grid. At 64x128 most of that is
  information, not design: the s = 1.0 network given non-keyframes resized to half size and back up (the same
  pixels, 4x the shallow compute) is itself 2.2 / 2.3 below s = 1.0, and 0.4 / 0.4 at 128x256. With the
  keyframe's shared shallow layers (the first version) the gaps were 2.1 / 2.3 and 4.1 / 4.1; the levers
  screened against those moved them by at most ~1.4 points: the conv correction (kept), BN statistics
  recalibrated for the half-size pass, logit distillation, a 10x FST weight, a learned flow aligning the
  keyframe term (reverted), and neighbours 1..5 frames away (lifts s = 1.0 alike).

* L2 norm and the channel half: the official code L2-normalises all of f_ind, then the FFM takes its first half;
  here the half is taken first and normalised by itself. Kept: the used channels then have unit norm whatever
  the unused half holds, and changing it would silently change what every saved checkpoint computes.
* Head width: the ResNet head's hidden 1x1 conv is 256 wide (``FeatureContract.head_hidden_channels``).
  METHOD.md does not give this width; 256 is mmsegmentation's usual decode-head width and has not been checked
  against the authors' code. MiT/PVTv2 heads are dropout + classifier, as METHOD.md says.
* Decoder learning-rate group (``dcfm.train.recipe.build_optimizer``): the SegFormer all-MLP decoder and the PPM are
  built here, not by timm, so they sit in the decoder group (10x lr in the AdamW recipe). That matches the
  SegFormer-style configs, which give everything under the decode head (the all-MLP decoder included) lr_mult
  10; the SGD recipe uses 1x for every group. Their zero weight decay on norms and position blocks is not
  reproduced: every parameter gets the recipe's weight decay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dcfm.backbones import BackboneAdapter, create_backbone

E = TypeVar("E", bound=Enum)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LowresCorrection(str, Enum):
    """The learned correction of ``CrossResolutionFusion`` (reduced-resolution models only).

    ``conv`` (the default since its introduction): a 3x3 conv over *all* channels of the low-resolution f_ind
    (BN, ReLU) and a 1x1 conv (BN) to the used half. ``depthwise``: the first version, a depthwise 3x3 + BN on
    the used half only; kept so that checkpoints trained with it still load (their cards predate the field).
    """

    CONV = "conv"
    DEPTHWISE = "depthwise"


class LowresShallow(str, Enum):
    """Which shallow layers a reduced-resolution non-keyframe runs (reduced-resolution models only).

    ``own`` (the default since its introduction): a copy of the backbone's shallow layers, initialised from
    them and trained apart, so the keyframe's layers need not also serve frames whose objects are half as
    large. ``shared``: the keyframe's own shallow layers; the first version, kept so that checkpoints trained
    with it still load (their cards predate the field). Same compute either way.
    """

    OWN = "own"
    SHARED = "shared"


def _member(enum: type[E], value: Any, field: str) -> E:
    """``value`` as a member of ``enum`` (a member or its value), or an error naming ``field`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{field} must be one of {[m.value for m in enum]}, got {value!r}") from None


@dataclass
class DCFMConfig:
    """Architecture of a DCFM network. ``None`` widths take the backbone family's official default."""

    backbone: str = "resnet18"
    num_classes: int = 19
    projection_channels: int | None = None
    fusion_channels: int | None = None  # FFM output width; defaults to the common feature width
    dropout: float = 0.1
    pretrained_backbone: bool = False  # ImageNet weights from the timm hub (needs network access)
    # Non-keyframes run at this fraction of the keyframe resolution (AR-Seg's altered resolution; 0.5 is its
    # setting). 1.0 is plain DCFM. The architecture depends on it (s < 1 adds the cross-resolution fusion).
    nonkey_scale: float = 1.0
    # The cross-resolution fusion's learned correction (s < 1 only; see LowresCorrection).
    lowres_correction: LowresCorrection = LowresCorrection.CONV
    # The shallow layers of the reduced-resolution pass (s < 1 only; see LowresShallow).
    lowres_shallow: LowresShallow = LowresShallow.OWN

    def __post_init__(self) -> None:
        if not 0 < float(self.nonkey_scale) <= 1:
            raise ValueError(f"nonkey_scale must be in (0, 1], got {self.nonkey_scale}")
        self.nonkey_scale = float(self.nonkey_scale)
        self.lowres_correction = _member(LowresCorrection, self.lowres_correction, "lowres_correction")
        self.lowres_shallow = _member(LowresShallow, self.lowres_shallow, "lowres_shallow")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lowres_correction"] = self.lowres_correction.value
        data["lowres_shallow"] = self.lowres_shallow.value
        return data

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
    # nonkey_scale < 1 only: the low-resolution non-key fused features of both directions (L as non-key of U,
    # U as non-key of L) and the full-resolution keyframe fused features they are pulled towards (FST-style).
    lowres_fused: tuple[torch.Tensor, ...] = ()
    lowres_targets: tuple[torch.Tensor, ...] = ()


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


def resize_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Frames resized by ``scale`` (bilinear, antialiased): what a reduced-resolution non-keyframe sees."""
    if scale == 1.0:
        return images
    size = lowres_size(tuple(images.shape[-2:]), scale)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def lowres_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of a frame of ``size`` at ``scale`` (at least 1 pixel)."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


class CrossResolutionFusion(nn.Module):
    """CReFF-style bridge from a full-resolution keyframe to a reduced-resolution non-keyframe.

    ``align`` brings the keyframe's cached fusion term to the low-resolution independent feature's grid (area
    resampling, or nothing when the grids already agree, e.g. ResNet at s = 0.5: stride 8 of the keyframe =
    stride 4 of the half-size frame); ``correct`` adds a learned residual to the used half of the low-resolution
    f_ind (``LowresCorrection``: a 3x3 conv over all its channels, BN, ReLU, 1x1 conv, BN; or, in the first
    version, a depthwise 3x3 + BN on the used half). The last BN's weight starts at zero, so an untrained bridge
    is plain resampling.
    """

    def __init__(self, independent_channels: int, independent_used: int,
                 kind: LowresCorrection = LowresCorrection.CONV) -> None:
        super().__init__()
        self.kind = LowresCorrection(kind)
        self.independent_used = independent_used
        if self.kind is LowresCorrection.DEPTHWISE:
            self.depthwise = nn.Conv2d(independent_used, independent_used, 3, padding=1, groups=independent_used,
                                       bias=False)
        else:
            # All channels, not only the used half: the unused half is computed on every frame anyway and holds
            # what the shared shallow layers found at this (coarser) scale.
            self.conv = nn.Sequential(
                nn.Conv2d(independent_channels, independent_used, 3, padding=1, bias=False),
                nn.BatchNorm2d(independent_used),
                nn.ReLU(inplace=True),
                nn.Conv2d(independent_used, independent_used, 1, bias=False),
            )
        self.norm = nn.BatchNorm2d(independent_used)
        nn.init.zeros_(self.norm.weight)

    @staticmethod
    def align(keyframe_term: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The keyframe term on a grid no finer than ``size`` (the FFM itself resizes f_ind when it is finer)."""
        h, w = keyframe_term.shape[-2:]
        if h <= size[0] and w <= size[1]:
            return keyframe_term
        return F.interpolate(keyframe_term, size=(min(h, size[0]), min(w, size[1])), mode="area")

    def correct(self, independent: torch.Tensor) -> torch.Tensor:
        """The used half of a low-resolution f_ind (all channels given) plus the learned residual."""
        half = independent[:, : self.independent_used]
        if self.kind is LowresCorrection.DEPTHWISE:
            return half + self.norm(self.depthwise(half))
        return half + self.norm(self.conv(independent))


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
        self.nonkey_scale = config.nonkey_scale
        # Only a reduced-resolution model has the bridge, so s = 1 checkpoints keep their exact state dict.
        self.cross_resolution = (
            CrossResolutionFusion(contract.independent_channels, self.fusion.independent_used,
                                  config.lowres_correction)
            if config.nonkey_scale < 1 else None
        )
        self.shallow_lowres = (
            self.backbone.shallow_copy()
            if config.nonkey_scale < 1 and config.lowres_shallow is LowresShallow.OWN else None
        )

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

    # --- reduced-resolution non-keyframes (nonkey_scale < 1) ------------------------------------------------------
    def independent_lowres(self, images: torch.Tensor) -> torch.Tensor:
        """f_ind of full-resolution ``images`` resized by ``nonkey_scale`` (from the pass's own shallow layers,
        ``LowresShallow.OWN``), the bridge's correction applied to the half the FFM uses. The result goes to
        ``logits_from_term`` like any f_ind."""
        small = resize_images(images, self.nonkey_scale)
        independent = self.shallow_lowres(small) if self.shallow_lowres is not None else self.independent(small)
        if self.cross_resolution is None:
            return independent
        return self.cross_resolution.correct(independent)

    def align_term(self, keyframe_term: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        """A keyframe's cached term on the grid of a (low-resolution) non-keyframe's f_ind; cache it per keyframe."""
        return CrossResolutionFusion.align(keyframe_term, tuple(independent.shape[-2:]))

    def fuse_lowres(self, common: torch.Tensor, independent_lowres: torch.Tensor) -> torch.Tensor:
        """F of a reduced-resolution non-keyframe: eq. (5) with the keyframe term aligned to its grid."""
        term = self.align_term(self.fusion.keyframe_term(common), independent_lowres)
        return l2_normalize(self.fusion.combine(term, independent_lowres))

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
        """Non-keyframe path: logits of ``images`` given a keyframe's cached ``common`` feature (at the reduced
        resolution when ``nonkey_scale`` < 1; then the logits are coarser than a keyframe's)."""
        if self.nonkey_scale < 1:
            return self.decode(self.fuse_lowres(common, self.independent_lowres(images)))
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
        if self.nonkey_scale == 1:
            fused_reuse = self.fuse(com_u, ind_l)
            logits = self.decode(torch.cat([fused_l, fused_u, fused_reuse]))
            key_logits, neighbour_logits, reuse_logits = logits.split(batch)
            return PairOutput(key_logits, reuse_logits, fused_l, fused_u, neighbour_logits)
        # Reduced resolution: the non-key side of the pair runs at s. Both directions (L as non-key of U, which
        # also gets the CE, and U as non-key of L) are pulled towards the full-resolution keyframe feature of
        # the same frame (FST-style).
        key_logits, neighbour_logits = self.decode(torch.cat([fused_l, fused_u])).split(batch)
        lowres = self.independent_lowres(torch.cat([labeled, neighbour]))
        low_reuse_l = self.fuse_lowres(com_u, lowres[:batch])
        low_reuse_u = self.fuse_lowres(com_l, lowres[batch:])
        reuse_logits = self.decode(low_reuse_l)
        return PairOutput(key_logits, reuse_logits, fused_l, fused_u, neighbour_logits,
                          lowres_fused=(low_reuse_l, low_reuse_u), lowres_targets=(fused_l, fused_u))

    def forward(self, images: torch.Tensor, neighbour: torch.Tensor | None = None) -> torch.Tensor | PairOutput:
        """Per-frame logits at the input size (every frame a keyframe); with ``neighbour``, the training pair.

        Going through ``forward`` for pairs lets DistributedDataParallel see the training computation.
        """
        if neighbour is not None:
            return self.forward_pair(images, neighbour)
        return upsample_logits(self.forward_keyframe(images).logits, tuple(images.shape[-2:]))
