"""The joint DCFM loss and the symmetric pair forward."""

import pytest
import torch

from dcfm.losses import LossWeights, consistency_loss, dcfm_loss, segmentation_ce
from dcfm.model import DCFM, DCFMConfig


@pytest.fixture(scope="module")
def model() -> DCFM:
    torch.manual_seed(0)
    return DCFM(DCFMConfig("resnet18", num_classes=4))


def test_consistency_loss_is_zero_where_predictions_differ() -> None:
    fused_l, fused_u = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    logits_l = torch.zeros(2, 3, 5, 5)
    logits_u = torch.zeros(2, 3, 5, 5)
    logits_l[:, 0] = 1.0  # L predicts class 0 everywhere
    logits_u[:, 1] = 1.0  # U predicts class 1 everywhere
    assert consistency_loss(fused_l, fused_u, logits_l, logits_u).item() == 0.0


def test_consistency_loss_is_masked_mse() -> None:
    fused_l, fused_u = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    logits_l = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # classes 0 1 / 0 1
    logits_u = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]])  # classes 0 0 / 1 1
    agree = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # top-left and bottom-right agree
    expected = (((fused_l - fused_u) * agree) ** 2).mean()
    torch.testing.assert_close(consistency_loss(fused_l, fused_u, logits_l, logits_u), expected)


def test_pair_loss_gradients_reach_both_frames(model: DCFM) -> None:
    model.train()
    labeled = torch.randn(2, 3, 64, 64, requires_grad=True)
    neighbour = torch.randn(2, 3, 64, 64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[:, :8] = 255
    out = model.forward_pair(labeled, neighbour)
    terms = dcfm_loss(out, labels)
    terms.total.backward()
    assert labeled.grad is not None and labeled.grad.abs().sum() > 0
    assert neighbour.grad is not None and neighbour.grad.abs().sum() > 0
    # The consistency term alone also reaches both frames.
    labeled.grad = neighbour.grad = None
    out = model.forward_pair(labeled, neighbour)
    terms = dcfm_loss(out, labels, LossWeights(reuse=0.0, consistency=1.0))
    (terms.total - terms.key_ce).backward()
    assert labeled.grad.abs().sum() > 0 and neighbour.grad.abs().sum() > 0


def test_reuse_ce_uses_neighbour_common_with_labeled_independent(model: DCFM) -> None:
    """Eq. (9): Ŝ_L = Dec(Norm(FFM(f_com(I_U), f_ind(I_L))))."""
    model.eval()
    labeled, neighbour = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_pair(labeled, neighbour)
        common_u = model.forward_keyframe(neighbour).common
        expected = model.forward_reuse(labeled, common_u)
        key_l = model.forward_keyframe(labeled).logits
    torch.testing.assert_close(out.reuse_logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.key_logits, key_l, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.reuse_logits, out.key_logits)


def test_joint_loss_weights_and_ignore(model: DCFM) -> None:
    model.eval()
    labeled, neighbour = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    labels = torch.full((1, 64, 64), 255)
    labels[:, 10:20, 10:20] = 2
    with torch.no_grad():
        out = model.forward_pair(labeled, neighbour)
    weights = LossWeights(reuse=0.4, consistency=10.0)
    terms = dcfm_loss(out, labels, weights)
    torch.testing.assert_close(terms.total, terms.key_ce + 0.4 * terms.reuse_ce + 10.0 * terms.consistency)
    # Only the 100 labelled pixels count: CE equals the CE over that square alone.
    square = segmentation_ce(out.key_logits, labels)
    logits = torch.nn.functional.interpolate(out.key_logits, size=(64, 64), mode="bilinear", align_corners=False)
    manual = torch.nn.functional.cross_entropy(logits[:, :, 10:20, 10:20], labels[:, 10:20, 10:20])
    torch.testing.assert_close(square, manual)
    assert LossWeights.for_dataset("vspw") == LossWeights(0.2, 5.0)
