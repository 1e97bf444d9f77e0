"""The DCFM network (METHOD.md §2): shallow/deep split, projection, FFM, L2 norms and head.

Three entry points matter:

* ``forward_keyframe`` – eqs. (1)-(4): independent + common features and logits of a keyframe;
* ``forward_reuse`` – eqs. (5)-(6): a non-keyframe given cached common features; the deep layers do not run;
* ``forward_pair`` – the symmetric training pair of §3 (labelled frame + unlabelled neighbour).

Logits are returned at feature resolution; ``upsample_logits`` brings them to a label size.

Reduced-resolution non-keyframes (AR-Seg with DCFM, ``DCFMConfig.nonkey_scale`` s < 1): a non-keyframe's
shallow features are computed on the frame resized by s. ``CrossResolutionFusion`` (CReFF-style) aligns the
keyframe's cached fusion term to the low-resolution independent feature by area resampling, and a zero-initialised
residual corrects the low-resolution independent feature (its statistics differ from the full-resolution one's
the FFM was fitted to): a 3x3 conv over all channels of the low-resolution f_ind, BN, ReLU, 1x1 conv, BN
(``LowresCorrection.CONV``; the first version, a depthwise 3x3 + BN on the used half, stays loadable as
``DEPTHWISE``). In place of AR-Seg's motion-vector warping and local attention there is an optional, cheap
feature-correlation flow (``lowres_alignment="flow"``, ``LowresAlignment.FLOW``): a local correlation of 32-channel
embeddings of the keyframe's and the non-keyframe's shallow features gives a per-position displacement, and the
keyframe term is warped by it. It is not the default yet: it is to be screened against plain resampling, which
stays the default (``RESAMPLE``, DCFM's own reuse without alignment). Training adds an FST-style similarity loss
between the low-resolution non-key fused feature and the (detached) full-resolution keyframe fused feature of the
same frame. s = 1 builds no extra module and runs exactly the original code.

METHOD notes, where this code departs from the authors' official code, and why:

* Reduced resolution, measured on the synth training benchmark (BENCHMARKS.md, issue 11; 64x128 frames, so a
  half-size non-keyframe is 32x64 and its f_ind an 8x16 grid): s = 0.5 stays 3-4 points of non-keyframe mIoU
  below s = 1.0 (4.1 at k = 6, 3.0 at k = 2, with the conv correction). Neither of the two suspects checked
  accounts for that: BatchNorm running statistics shared by the full- and half-size passes (recalibrating them
  on half-size passes only gains 0.4-0.5 points) and the capacity of the correction (the conv correction gains
  1.2-1.4 points over the depthwise one at the benchmark's full budget). The loss is concentrated in small objects
  (car, person). A frame twice as large (128x256, 400 steps) shrank the k = 6 gap only from 2.9 to 2.1 points, and
  distilling the keyframe logits into the half-size pass gained nothing. What remained was what AR-Seg has and the
  first design left out: aligning the keyframe's features to the current frame (motion-vector warping, local
  attention). ``LowresAlignment.FLOW`` is the cheap analogue, opt-in until it is screened.

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

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcfm.backbones import BackboneAdapter, create_backbone

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


class LowresAlignment(str, Enum):
    """How ``CrossResolutionFusion`` brings the keyframe's cached term to a reduced-resolution non-keyframe.

    ``resample`` (the default, and what every card written before the field means): area resampling to the
    non-key grid only, no motion alignment. ``flow``: resample, then warp the term by a displacement field
    estimated from a local correlation of learned embeddings of both frames' shallow features (see
    ``CrossResolutionFusion``); adds a 1x1 conv and a temperature to the bridge.
    """

    RESAMPLE = "resample"
    FLOW = "flow"


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
    # How the keyframe term is aligned to a reduced-resolution non-keyframe (s < 1 only; see LowresAlignment).
    lowres_alignment: LowresAlignment = LowresAlignment.RESAMPLE

    def __post_init__(self) -> None:
        if not 0 < float(self.nonkey_scale) <= 1:
            raise ValueError(f"nonkey_scale must be in (0, 1], got {self.nonkey_scale}")
        self.nonkey_scale = float(self.nonkey_scale)
        try:
            self.lowres_correction = LowresCorrection(self.lowres_correction)
        except ValueError:
            raise ValueError(f"lowres_correction must be one of {[c.value for c in LowresCorrection]}, "
                             f"got {self.lowres_correction!r}") from None
        try:
            self.lowres_alignment = LowresAlignment(self.lowres_alignment)
        except ValueError:
            raise ValueError(f"lowres_alignment must be one of {[a.value for a in LowresAlignment]}, "
                             f"got {self.lowres_alignment!r}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lowres_correction"] = self.lowres_correction.value
        data["lowres_alignment"] = self.lowres_alignment.value
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


# Search radius of the flow alignment's local correlation, in cells of the keyframe term's grid. With ResNet's
# stride-8 term, ±3 cells are ±24 px at the model's input size: enough for the synth benchmark's ~4 px a frame over a
# k = 6 interval (up to ~20 px at its far end). Each extra cell of radius adds 8(r+1) correlation steps.
FLOW_RADIUS = 3
# Width of the embeddings the correlation compares: each of its (2r+1)^2 steps then costs about a tenth of one
# elementwise pass over the ~320-channel term, which is why the term itself is warped once, not summed per offset.
FLOW_EMBED_CHANNELS = 32
# The scores are cosine similarities in [-1, 1]: at temperature 10 a similarity higher by 0.2 is e^2 ~ 7x likelier,
# a usable peak from the start that training can sharpen or soften.
FLOW_INITIAL_TEMPERATURE = 10.0


def soft_argmax_displacement(query: torch.Tensor, key: torch.Tensor, radius: int,
                             temperature: torch.Tensor | float) -> torch.Tensor:
    """Expected displacement (dy, dx) in cells, N x 2 x H x W, of ``query`` relative to ``key`` (both N x C x H x W).

    Offset d at position p scores ``temperature * <query(p), key(p + d)>`` for |dy|, |dx| <= ``radius``; the result
    is the softmax-weighted mean of the offsets. So d(p) points from p to where p's content sits in ``key``.
    Offsets that leave the frame are excluded rather than compared with zero padding, which would otherwise beat
    every negative similarity and pull displacements outwards at the border.
    """
    _, _, h, w = query.shape
    # One offset at a time over a zero-padded key: O(C·H·W) memory per step instead of unfolding a 49x copy.
    padded = F.pad(key, (radius, radius, radius, radius))
    steps = torch.arange(-radius, radius + 1, device=query.device)
    scores = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[:, :, radius + dy : radius + dy + h, radius + dx : radius + dx + w]
            scores.append((query * shifted).sum(dim=1))
    logits = torch.stack(scores, dim=1) * temperature  # N x (2r+1)^2 x H x W, dy-major like the loop
    rows = torch.arange(h, device=query.device)[None] + steps[:, None]  # (2r+1) x H: the key row each dy reads
    cols = torch.arange(w, device=query.device)[None] + steps[:, None]
    inside = (((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[None, :, None, :])
    inside = inside.reshape(1, -1, h, w)
    # The zero offset is always inside, so no position is left without a candidate.
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=1)
    offset_y, offset_x = torch.meshgrid(steps, steps, indexing="ij")
    dy = (weights * offset_y.reshape(1, -1, 1, 1).to(weights.dtype)).sum(dim=1)
    dx = (weights * offset_x.reshape(1, -1, 1, 1).to(weights.dtype)).sum(dim=1)
    return torch.stack([dy, dx], dim=1)


def warp_by_displacement(term: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``term`` (N x C x H x W) resampled so that output p = term(p + displacement(p)); displacement N x 2 x H x W
    as (dy, dx) in cells. Bilinear, border-clamped."""
    _, _, h, w = term.shape
    # Cell centres in grid_sample's normalised coordinates (align_corners=False): one cell is 2/W in x, 2/H in y.
    xs = (torch.arange(w, device=term.device, dtype=displacement.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=term.device, dtype=displacement.dtype) * 2 + 1) / h - 1
    x = xs.view(1, 1, w) + displacement[:, 1] * (2.0 / w)
    y = ys.view(1, h, 1) + displacement[:, 0] * (2.0 / h)
    grid = torch.stack([x, y], dim=-1).to(term.dtype)  # grid_sample wants (x, y) = (width, height) last
    return F.grid_sample(term, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CrossResolutionFusion(nn.Module):
    """CReFF-style bridge from a full-resolution keyframe to a reduced-resolution non-keyframe.

    ``align`` brings the keyframe's cached fusion term to the low-resolution independent feature's grid (area
    resampling, or nothing when the grids already agree, e.g. ResNet at s = 0.5: stride 8 of the keyframe =
    stride 4 of the half-size frame); ``correct`` adds a learned residual to the used half of the low-resolution
    f_ind (``LowresCorrection``: a 3x3 conv over all its channels, BN, ReLU, 1x1 conv, BN; or, in the first
    version, a depthwise 3x3 + BN on the used half). The last BN's weight starts at zero, so an untrained bridge
    is plain resampling.

    With ``LowresAlignment.FLOW`` the resampled term is then warped to the non-keyframe's content (AR-Seg aligns
    its reference features with motion vectors and local attention; this learns the motion instead): a shared 1x1
    conv ``motion_embed`` maps the L2-normalised used half of both frames' f_ind (the keyframe's full-resolution
    one as ``keyframe_keys``, cached per keyframe; the non-keyframe's corrected low-resolution one as the query) to
    32 L2-normalised channels on the term's grid; a local correlation within ``FLOW_RADIUS`` cells, a softmax
    with a learned temperature and a soft-argmax give one displacement per position, and one bilinear
    ``grid_sample`` warps the term. A displacement and one warp rather than an attention-weighted sum of shifted
    terms: the sum would be (2r+1)^2 passes over the term's ~320 channels, the correlation is over 32.
    """

    def __init__(self, independent_channels: int, independent_used: int,
                 kind: LowresCorrection = LowresCorrection.CONV,
                 alignment: LowresAlignment = LowresAlignment.RESAMPLE) -> None:
        super().__init__()
        self.kind = LowresCorrection(kind)
        self.alignment = LowresAlignment(alignment)
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
        if self.alignment is LowresAlignment.FLOW:
            # Shared by both frames, so that matching embeddings means matching content whatever the resolution.
            self.motion_embed = nn.Conv2d(independent_used, FLOW_EMBED_CHANNELS, 1, bias=False)
            # Stored as a log so that it stays positive under any update.
            self.log_temperature = nn.Parameter(torch.tensor(math.log(FLOW_INITIAL_TEMPERATURE)))

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

    def _embed(self, independent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        half = l2_normalize(independent[:, : self.independent_used])
        if tuple(half.shape[-2:]) != tuple(size):
            half = F.interpolate(half, size=size, mode="bilinear", align_corners=False)
        return l2_normalize(self.motion_embed(half))

    def keyframe_keys(self, full_independent: torch.Tensor, term_size: tuple[int, int]) -> torch.Tensor:
        """Motion embeddings of keyframes (their full-resolution raw f_ind) on the term's grid ``term_size``:
        what ``warp`` compares a non-keyframe with; compute once per keyframe (FLOW only)."""
        return self._embed(full_independent, term_size)

    def warp(self, term: torch.Tensor, keys: torch.Tensor, lowres_independent: torch.Tensor) -> torch.Tensor:
        """A keyframe term already resampled by ``align``, warped onto the content of the non-keyframes whose
        corrected low-resolution f_ind (``correct``'s output) is ``lowres_independent`` (FLOW only)."""
        size = tuple(term.shape[-2:])
        if tuple(keys.shape[-2:]) != size:
            # ``align`` made the term coarser than the grid the keys were cached on (e.g. PVT, whose term is at
            # stride 4): bring them along (a linear map commutes with the resize; the norm does not).
            keys = l2_normalize(F.interpolate(keys, size=size, mode="bilinear", align_corners=False))
        query = self._embed(lowres_independent, size)
        displacement = soft_argmax_displacement(query, keys, FLOW_RADIUS, self.log_temperature.exp())
        return warp_by_displacement(term, displacement)


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
                                  config.lowres_correction, config.lowres_alignment)
            if config.nonkey_scale < 1 else None
        )

    @property
    def aligns_by_flow(self) -> bool:
        """True when non-keyframes warp the keyframe term by estimated motion (s < 1 with ``LowresAlignment.FLOW``)."""
        return self.cross_resolution is not None and self.cross_resolution.alignment is LowresAlignment.FLOW

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
        """f_ind of full-resolution ``images`` resized by ``nonkey_scale``, the bridge's correction applied to the
        half the FFM uses. The result goes to ``logits_from_term`` like any f_ind."""
        independent = self.independent(resize_images(images, self.nonkey_scale))
        if self.cross_resolution is None:
            return independent
        return self.cross_resolution.correct(independent)

    def keyframe_keys(self, full_independent: torch.Tensor, keyframe_term: torch.Tensor) -> torch.Tensor | None:
        """Motion keys of keyframes from their full-resolution raw f_ind, on the grid of their cached term; cache
        them with the term. None unless the model aligns by flow (``aligns_by_flow``)."""
        if not self.aligns_by_flow:
            return None
        return self.cross_resolution.keyframe_keys(full_independent, tuple(keyframe_term.shape[-2:]))

    def align_term(self, keyframe_term: torch.Tensor, independent: torch.Tensor,
                   keys: torch.Tensor | None = None) -> torch.Tensor:
        """A keyframe's cached term on the grid of a (low-resolution) non-keyframe's f_ind. Without ``keys`` it
        depends on the grid only (cache it per keyframe and grid); with the keyframe's ``keyframe_keys`` (flow
        models) it is also warped onto this frame's content, so it is per frame."""
        term = CrossResolutionFusion.align(keyframe_term, tuple(independent.shape[-2:]))
        if keys is None:
            return term
        return self.warp_term(term, keys, independent)

    def warp_term(self, aligned_term: torch.Tensor, keys: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        """A term already on the non-keyframes' grid (``align_term`` without keys) warped onto their content:
        batched over (frame, keyframe) pairs, ``independent`` being the frames' ``independent_lowres``."""
        if not self.aligns_by_flow:
            raise ValueError("keyframe keys given to a model without flow alignment (its config has nonkey_scale "
                             f"{self.nonkey_scale:g}, lowres_alignment {self.config.lowres_alignment.value!r})")
        return self.cross_resolution.warp(aligned_term, keys, independent)

    def fuse_lowres(self, common: torch.Tensor, independent_lowres: torch.Tensor,
                    key_independent: torch.Tensor | None = None) -> torch.Tensor:
        """F of a reduced-resolution non-keyframe: eq. (5) with the keyframe term aligned to its grid.
        ``key_independent``: the keyframe's full-resolution raw f_ind, which flow models need (others ignore it)."""
        term = self.fusion.keyframe_term(common)
        keys = None
        if self.aligns_by_flow:
            if key_independent is None:
                raise ValueError("this model aligns the keyframe term by flow (lowres_alignment 'flow'): pass the "
                                 "keyframe's full-resolution f_ind as key_independent")
            keys = self.keyframe_keys(key_independent, term)
        term = self.align_term(term, independent_lowres, keys)
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

    def forward_reuse(self, images: torch.Tensor, common: torch.Tensor,
                      key_independent: torch.Tensor | None = None) -> torch.Tensor:
        """Non-keyframe path: logits of ``images`` given a keyframe's cached ``common`` feature (at the reduced
        resolution when ``nonkey_scale`` < 1; then the logits are coarser than a keyframe's). Flow-aligned models
        also need the keyframe's full-resolution raw f_ind, ``key_independent``."""
        if self.nonkey_scale < 1:
            return self.decode(self.fuse_lowres(common, self.independent_lowres(images), key_independent))
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
        low_reuse_l = self.fuse_lowres(com_u, lowres[:batch], ind_u)
        low_reuse_u = self.fuse_lowres(com_l, lowres[batch:], ind_l)
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
