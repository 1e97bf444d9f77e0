"""Feature contract of every registered backbone, on tiny random inputs."""

import pytest
import torch

from dcfm.backbones import REGISTERED_BACKBONES, create_backbone
from dcfm.model import DCFM, DCFMConfig

H, W = 64, 96


@pytest.fixture(scope="module", params=REGISTERED_BACKBONES)
def model(request) -> DCFM:
    torch.manual_seed(0)
    return DCFM(DCFMConfig(backbone=request.param, num_classes=7)).eval()


def test_features_match_contract(model: DCFM) -> None:
    contract = model.backbone.contract
    images = torch.randn(2, 3, H, W)
    with torch.inference_mode():
        independent = model.independent(images)
        encoded = model.backbone.deep(independent)
        out = model.forward_keyframe(images)
    assert independent.shape == (2, contract.independent_channels, H // contract.independent_stride, W // contract.independent_stride)
    assert encoded.shape == (2, contract.common_channels, H // contract.common_stride, W // contract.common_stride)
    assert out.common.shape == (2, model.common_channels, H // contract.common_stride, W // contract.common_stride)
    assert out.logits.shape == (2, 7, H // contract.common_stride, W // contract.common_stride)
    assert torch.isfinite(out.logits).all()
    assert model(images).shape == (2, 7, H, W)


def test_channel_counts_come_from_timm_feature_info(model: DCFM) -> None:
    import timm

    name = model.config.backbone
    kwargs = {"output_stride": 8} if name.startswith("resnet") else {}
    info = timm.create_model(name, features_only=True, **kwargs).feature_info
    assert model.backbone.contract.independent_channels == info.channels()[0 if name.startswith("pvt") else 1]
    assert model.backbone.contract.independent_stride == 4


def test_official_projection_widths() -> None:
    # METHOD.md: 320 channels for ResNet-18, 1280 for ResNet-50/101, identity for MiT/PVTv2.
    assert DCFM(DCFMConfig("resnet18", 3)).common_channels == 320
    assert DCFM(DCFMConfig("resnet50", 3)).common_channels == 1280
    assert isinstance(DCFM(DCFMConfig("pvt_v2_b0", 3)).projection, torch.nn.Identity)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no DCFM adapter"):
        create_backbone("vit_base_patch16_224")
    with pytest.raises(ValueError, match="timm has no such model"):
        create_backbone("resnet7")


def test_nonkeyframe_path_skips_deep_layers(model: DCFM) -> None:
    calls = []
    model.backbone.deep = lambda x, _orig=model.backbone.deep: calls.append(1) or _orig(x)  # type: ignore[method-assign]
    images = torch.randn(1, 3, H, W)
    with torch.inference_mode():
        key = model.forward_keyframe(images)
        reuse = model.forward_reuse(images, key.common)
    del model.backbone.deep
    assert len(calls) == 1
    # Reusing a frame's own common feature is exactly its keyframe output.
    torch.testing.assert_close(reuse, key.logits)
