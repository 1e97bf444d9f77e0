"""Backbone adapters: split a timm network into DCFM's shallow and deep parts.

An adapter owns a timm ``features_only`` network and exposes the two halves DCFM needs:

* ``shallow(images)`` -> the *independent* feature ``f_ind`` (stride 4, computed on every frame);
* ``deep(f_ind)`` -> the *encoder output* ``Enc(I)`` that becomes the *common* feature after projection.

``deep`` continues from ``shallow``'s output, so a keyframe pays for the encoder exactly once.
Channel counts and strides are read from timm's ``feature_info``; adding a timm family means writing
one small adapter class and registering its name prefix in ``ADAPTERS``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

RESNET_BACKBONES = ("resnet18", "resnet50", "resnet101")
PVT_V2_BACKBONES = tuple(f"pvt_v2_b{i}" for i in range(6))


@dataclass(frozen=True)
class FeatureContract:
    """What a backbone adapter promises about its two outputs."""

    independent_channels: int
    independent_stride: int
    common_channels: int  # channels of Enc(I), before DCFM's projection
    common_stride: int
    default_projection_channels: int | None  # None: the projection is the identity
    head_hidden_channels: int | None  # None: the head is dropout + a 1x1 classifier


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module; output = input concatenated with the pooled branches."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.bins = bins
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, branch_channels) for _ in bins)
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
            for b, branch in zip(self.bins, self.branches)
        ]
        return torch.cat([x, *pooled], dim=1)


class BackboneAdapter(nn.Module):
    """Base class: subclasses build ``self.contract`` and implement ``shallow`` and ``deep``."""

    contract: FeatureContract

    def shallow(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def deep(self, independent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shallow_copy(self) -> nn.Module:
        """A module that maps images to f_ind as ``shallow`` does, with its own copy of the shallow weights (the
        reduced-resolution non-key pass trains them apart from the keyframe's)."""
        raise NotImplementedError


class ResNetAdapter(BackboneAdapter):
    """Dilated ResNet (output stride 8) with PPM on the deep path; shallow = stem + maxpool + layer1."""

    def __init__(self, name: str, pretrained: bool = False) -> None:
        super().__init__()
        net = timm.create_model(name, pretrained=pretrained, features_only=True, output_stride=8, out_indices=(1, 4))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool, net.layer1)
        self.body = nn.Sequential(net.layer2, net.layer3, net.layer4)
        ind_channels, deep_channels = net.feature_info.channels()
        ind_stride, deep_stride = net.feature_info.reduction()
        self.ppm = PyramidPooling(deep_channels)
        self.contract = FeatureContract(
            independent_channels=ind_channels,
            independent_stride=ind_stride,
            common_channels=self.ppm.out_channels,
            common_stride=deep_stride,
            # 5/8 of the last stage's width reproduces the official 320 (R18) and 1280 (R50/R101) projections.
            default_projection_channels=deep_channels * 5 // 8,
            head_hidden_channels=256,
        )

    def shallow(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images)

    def shallow_copy(self) -> nn.Module:
        return copy.deepcopy(self.stem)

    def deep(self, independent: torch.Tensor) -> torch.Tensor:
        return self.ppm(self.body(independent))


class SegFormerMLPDecoder(nn.Module):
    """SegFormer's all-MLP decoder without its classifier: every stage to ``width`` channels at stride 4."""

    def __init__(self, in_channels: list[int], width: int = 256) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = _conv_bn_relu(width * len(in_channels), width)
        self.out_channels = width

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        projected = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else proj(f)
            for proj, f in zip(self.projections, features)
        ]
        # SegFormer concatenates the deepest stage first.
        return self.fuse(torch.cat(projected[::-1], dim=1))


def _pvt_v2_shallow(patch_embed: nn.Module, first_block: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = patch_embed(images)  # B, H, W, C
    size = (x.shape[1], x.shape[2])
    tokens = first_block(x.flatten(1, 2), list(size))
    return PVTv2Adapter._map(tokens, size)


class _PVTv2Shallow(nn.Module):
    """PVTv2's shallow layers on their own (``PVTv2Adapter.shallow_copy``)."""

    def __init__(self, patch_embed: nn.Module, first_block: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.first_block = patch_embed, first_block

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pvt_v2_shallow(self.patch_embed, self.first_block, images)


class PVTv2Adapter(BackboneAdapter):
    """PVTv2 (timm's closest relative of MiT). Shallow = patch embedding + the first block of stage 1."""

    def __init__(self, name: str, pretrained: bool = False, decoder_width: int = 256) -> None:
        super().__init__()
        net = timm.create_model(name, pretrained=pretrained, features_only=True)
        self.patch_embed = net.patch_embed
        self.first_stage = net.stages_0
        self.later_stages = nn.ModuleList([net.stages_1, net.stages_2, net.stages_3])
        channels = net.feature_info.channels()
        self.decoder = SegFormerMLPDecoder(channels, decoder_width)
        self.contract = FeatureContract(
            independent_channels=channels[0],
            independent_stride=net.feature_info.reduction()[0],
            common_channels=self.decoder.out_channels,
            common_stride=net.feature_info.reduction()[0],
            default_projection_channels=None,
            head_hidden_channels=None,
        )

    @staticmethod
    def _tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        b, c, h, w = x.shape
        return x.flatten(2).transpose(1, 2), (h, w)

    @staticmethod
    def _map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Contiguous NCHW: convolutions take different kernels (and round differently) for other layouts,
        # and the keyframe and reuse paths must see the same layout to agree bit for bit.
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, size[0], size[1]).contiguous()

    def shallow(self, images: torch.Tensor) -> torch.Tensor:
        return _pvt_v2_shallow(self.patch_embed, self.first_stage.blocks[0], images)

    def shallow_copy(self) -> nn.Module:
        return _PVTv2Shallow(copy.deepcopy(self.patch_embed), copy.deepcopy(self.first_stage.blocks[0]))

    def deep(self, independent: torch.Tensor) -> torch.Tensor:
        tokens, size = self._tokens(independent)
        for block in self.first_stage.blocks[1:]:
            tokens = block(tokens, list(size))
        x = self._map(self.first_stage.norm(tokens), size)
        features = [x]
        for stage in self.later_stages:
            x = stage(x)
            features.append(x)
        return self.decoder(features)


# Name prefix -> adapter class. A new timm family is one adapter plus one entry here.
ADAPTERS: dict[str, Callable[..., BackboneAdapter]] = {
    "resnet": ResNetAdapter,
    "pvt_v2_": PVTv2Adapter,
}
REGISTERED_BACKBONES: tuple[str, ...] = RESNET_BACKBONES + PVT_V2_BACKBONES


def create_backbone(name: str, pretrained: bool = False) -> BackboneAdapter:
    """Build the adapter for a timm model name such as ``resnet18`` or ``pvt_v2_b2``."""
    for prefix, adapter in ADAPTERS.items():
        if name.startswith(prefix):
            if name not in timm.list_models(f"{prefix}*"):
                raise ValueError(f"backbone {name!r}: timm has no such model; try one of {REGISTERED_BACKBONES}")
            return adapter(name, pretrained=pretrained)
    raise ValueError(
        f"backbone {name!r} has no DCFM adapter; supported families: {sorted(ADAPTERS)} "
        f"(tested: {REGISTERED_BACKBONES})"
    )
