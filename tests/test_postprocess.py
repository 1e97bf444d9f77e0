"""Labels from feature-resolution logits equal argmax of the bilinearly upsampled logits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcfm.postprocess import frame_labels, stat_stride
from dcfm.model import upsample_logits


def blob_logits(classes: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Logits shaped like a segmentation model's: regions of one class, soft borders, some noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), dtype=np.int64)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(10):
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, h // 2))
        labels[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(0, classes)
    one_hot = F.one_hot(torch.from_numpy(labels), classes).permute(2, 0, 1).float()
    noise = torch.from_numpy(rng.normal(0, 0.7, (classes, h, w)).astype(np.float32))
    return F.avg_pool2d((one_hot * 4 + noise)[None], 3, 1, 1)[0].contiguous()


def reference(logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    up = upsample_logits(logits[None], size)[0]
    return up, up.argmax(0)


def assert_same_labels_except_float_ties(got: np.ndarray, up: torch.Tensor, expected: torch.Tensor) -> None:
    differ = torch.from_numpy(got.astype(np.int64)) != expected
    if differ.any():  # only where the reference's top two classes tie to float rounding
        top2 = up.topk(2, dim=0).values
        assert float((top2[0] - top2[1])[differ].max()) < 1e-6 * float(up.abs().max())


@pytest.mark.parametrize(
    ("classes", "logit_size", "size"),
    [(19, (32, 64), (720, 1280)), (19, (34, 60), (1080, 1920)), (8, (8, 16), (48, 96)), (5, (9, 14), (37, 53)),
     (3, (16, 16), (16, 16)), (4, (20, 30), (10, 15)), (300, (6, 7), (25, 31))],
)
def test_labels_equal_argmax_of_upsampled_logits(classes, logit_size, size) -> None:
    for seed in range(3 if size[0] * size[1] < 100_000 else 1):
        logits = blob_logits(classes, *logit_size, seed)
        up, expected = reference(logits, size)
        got = frame_labels(logits, size, np.dtype(np.uint8 if classes <= 256 else np.uint16))
        assert got.labels.shape == size and got.labels.dtype == (np.uint8 if classes <= 256 else np.uint16)
        assert_same_labels_except_float_ties(got.labels, up, expected)


def test_noisy_logits_take_the_exact_path_everywhere() -> None:
    logits = torch.randn(19, 24, 40)  # no regions: almost every cell has corners that disagree
    up, expected = reference(logits, (200, 333))
    assert_same_labels_except_float_ties(frame_labels(logits, (200, 333), np.dtype(np.uint8)).labels, up, expected)


def test_statistics_are_exact_up_to_the_sample_budget() -> None:
    logits = blob_logits(8, 12, 20, seed=1)
    pair = (logits * 0.6, logits * 0.4 + torch.randn(8, 12, 20))
    size = (100, 160)
    assert stat_stride(size) == 1
    got = frame_labels(pair[0] + pair[1], size, np.dtype(np.uint8), pair=pair)
    up = upsample_logits((pair[0] + pair[1])[None], size)[0]
    assert got.confidence == pytest.approx(float(up.softmax(0).amax(0).mean()), rel=1e-5)
    a, b = (upsample_logits(p[None], size)[0].argmax(0) for p in pair)
    assert got.agreement == pytest.approx(float((a == b).float().mean()), abs=1e-6)


def test_statistics_of_large_outputs_are_sampled_close_to_the_full_value() -> None:
    logits = blob_logits(19, 34, 60, seed=2)
    size = (1080, 1920)
    assert stat_stride(size) > 1
    full = float(upsample_logits(logits[None], size)[0].softmax(0).amax(0).mean())
    assert frame_labels(logits, size, np.dtype(np.uint8)).confidence == pytest.approx(full, abs=2e-3)


def test_device_path_gives_the_reference_and_syncs_once_per_block() -> None:
    """The CUDA path (plain upsample on the device, statistics left as tensors, one transfer per block),
    run here on CPU tensors: same labels and statistics as the reference."""
    from dcfm.inference import FrameResult, _to_host
    from dcfm.postprocess import _frame_labels_device

    size = (40, 72)
    results = []
    for seed in range(3):
        pair = (blob_logits(6, 10, 18, seed), blob_logits(6, 10, 18, seed + 10))
        out = _frame_labels_device(pair[0] + pair[1], size, pair if seed else None)
        assert isinstance(out.confidence, torch.Tensor)  # no host sync per frame
        results.append(FrameResult(seed, out.labels, False, (0,), out.confidence, out.agreement))
    host = _to_host(results, np.dtype(np.uint8))
    for seed, result in enumerate(host):
        pair = (blob_logits(6, 10, 18, seed), blob_logits(6, 10, 18, seed + 10))
        up, expected = reference(pair[0] + pair[1], size)
        assert result.labels.dtype == np.uint8 and np.array_equal(result.labels, expected.numpy())
        assert result.confidence == pytest.approx(float(up.softmax(0).amax(0).mean()), rel=1e-5)
        assert (result.agreement is None) == (seed == 0)
