"""Metrics vs. plain loop-over-pixels references, plus hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcfm.metrics import (
    IGNORE_INDEX,
    ConfusionMatrix,
    SegmentationScores,
    VideoConsistency,
    agreement,
    class_pixel_counts,
    confusion_matrix,
    label_change_rate,
    video_consistency_windows,
)

# Division by zero must be handled explicitly (NaN), never via numpy warnings.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

SEEDS = list(range(8))
H, W = 5, 7


# --------------------------------------------------------------------------- #
# Reference implementations: deliberately naive, one pixel at a time.
# --------------------------------------------------------------------------- #


def ref_confusion(pred, gt, c, ignore=IGNORE_INDEX):
    m = [[0] * c for _ in range(c)]
    for p, g in zip(np.asarray(pred).ravel().tolist(), np.asarray(gt).ravel().tolist()):
        if g == ignore:
            continue
        m[g][p] += 1
    return m


def ref_iou(m):
    c = len(m)
    out = []
    for k in range(c):
        tp = m[k][k]
        fn = sum(m[k][j] for j in range(c)) - tp
        fp = sum(m[i][k] for i in range(c)) - tp
        out.append(math.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return out


def ref_miou(m, absent):
    ious = ref_iou(m)
    if absent == "nan":
        present = [v for v in ious if not math.isnan(v)]
        return sum(present) / len(present) if present else math.nan
    return sum(0.0 if math.isnan(v) else v for v in ious) / len(ious)


def ref_fwiou(m):
    c = len(m)
    total = sum(sum(row) for row in m)
    ious = ref_iou(m)
    acc = 0.0
    for k in range(c):
        gt_k = sum(m[k])
        if gt_k:
            acc += gt_k / total * ious[k]
    return acc


def ref_pixacc(m):
    total = sum(sum(row) for row in m)
    return sum(m[k][k] for k in range(len(m))) / total


def ref_vc_windows(preds, gts, n, drop_last=True, ignore=None):
    t = len(gts)
    h, w = gts[0].shape if t else (0, 0)
    starts = range(t - n) if drop_last else range(t - n + 1)
    scores = []
    for i in starts:
        gt_cons = pred_and_gt = 0
        for y in range(h):
            for x in range(w):
                g_ok = all(gts[i + j][y, x] == gts[i][y, x] for j in range(n))
                if ignore is not None and gts[i][y, x] == ignore:
                    g_ok = False
                p_ok = all(preds[i + j][y, x] == preds[i][y, x] for j in range(n))
                gt_cons += g_ok
                pred_and_gt += g_ok and p_ok
        scores.append(math.nan if gt_cons == 0 else pred_and_gt / gt_cons)
    return scores


def ref_nanmean(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


# --------------------------------------------------------------------------- #
# Random inputs
# --------------------------------------------------------------------------- #


def random_maps(rng, shape, num_classes, gt_classes, pred_classes, ignore_frac=0.15):
    """GT drawn from ``gt_classes`` (+ ignore), pred from ``pred_classes``."""
    gt = rng.choice(gt_classes, size=shape)
    gt[rng.random(shape) < ignore_frac] = IGNORE_INDEX
    pred = rng.choice(pred_classes, size=shape)
    # Make predictions partly right so IoUs are not all ~0.
    right = (rng.random(shape) < 0.5) & (gt != IGNORE_INDEX)
    pred[right] = gt[right]
    pred[~np.isin(pred, pred_classes)] = pred_classes[0]
    return pred.astype(np.int64), gt.astype(np.int64)


def random_video(rng, t, num_classes=4, change=0.04, with_ignore=True):
    """Slowly changing label video: each frame flips a few pixels of the last."""
    frames = [rng.integers(0, num_classes, size=(H, W))]
    if with_ignore:
        frames[0][rng.random((H, W)) < 0.1] = IGNORE_INDEX
    for _ in range(t - 1):
        f = frames[-1].copy()
        flip = rng.random((H, W)) < change
        f[flip] = rng.integers(0, num_classes, size=int(flip.sum()))
        frames.append(f)
    return frames


def assert_close(a, b):
    if isinstance(b, float) and math.isnan(b):
        assert math.isnan(a), (a, b)
    else:
        assert a == pytest.approx(b, abs=1e-12), (a, b)


def assert_close_seq(a, b):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert_close(float(x), float(y))


# --------------------------------------------------------------------------- #
# Hand-computed cases
# --------------------------------------------------------------------------- #


def test_hand_2x2_miou_fwiou_and_both_absent_conventions():
    # gt   = [[0, 0],   pred = [[0, 0],
    #         [0, 1]]           [1, 1]]     num_classes = 3 (class 2 absent)
    # Confusion (rows gt, cols pred): gt0 -> pred0 x2, pred1 x1; gt1 -> pred1 x1
    #   [[2, 1, 0],
    #    [0, 1, 0],
    #    [0, 0, 0]]
    # IoU0 = 2 / (3 + 2 - 2) = 2/3, IoU1 = 1 / (1 + 2 - 1) = 1/2, IoU2 = 0/0 -> NaN
    # mIoU (nan)  = (2/3 + 1/2) / 2      = 7/12
    # mIoU (zero) = (2/3 + 1/2 + 0) / 3  = 7/18
    # fwIoU = 3/4 * 2/3 + 1/4 * 1/2      = 5/8
    #   (rows/cols swapped, freq would come from pred: 2/4*2/3 + 2/4*1/2 = 7/12)
    # pixel accuracy = 3/4
    gt = np.array([[0, 0], [0, 1]])
    pred = np.array([[0, 0], [1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    iou = cm.iou()
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(1 / 2)
    assert math.isnan(iou[2])
    assert cm.miou() == pytest.approx(7 / 12)
    assert cm.miou(absent="zero") == pytest.approx(7 / 18)
    assert cm.fwiou() == pytest.approx(5 / 8)
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)


def test_hand_2x2_with_ignore_pixel():
    # gt = [[0, 255], [1, 1]], pred = [[0, 1], [1, 0]], 2 classes.
    # The ignored pixel predicts 1; counting it would make IoU1 = 1/3.
    # Valid: (0->0), (1->1), (1->0) -> [[1, 0], [1, 1]]
    # IoU0 = 1 / (1 + 2 - 1) = 1/2, IoU1 = 1 / (2 + 1 - 1) = 1/2, mIoU = 1/2
    # fwIoU = 1/3 * 1/2 + 2/3 * 1/2 = 1/2, pixel accuracy = 2/3
    gt = np.array([[0, 255], [1, 1]])
    pred = np.array([[0, 1], [1, 0]])
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [1, 1]])
    assert cm.total == 3
    assert cm.miou() == pytest.approx(0.5)
    assert cm.fwiou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(2 / 3)


def test_class_only_in_prediction_has_zero_iou_not_nan():
    gt = np.array([[0, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    iou = cm.iou()
    assert iou[0] == pytest.approx(3 / 4)
    assert math.isnan(iou[1])  # absent everywhere
    assert iou[2] == 0.0  # false positives only
    assert cm.miou() == pytest.approx((3 / 4 + 0) / 2)
    assert cm.miou(absent="zero") == pytest.approx((3 / 4 + 0 + 0) / 3)
    # Class 2 has no GT pixels: contributes nothing to fwIoU.
    assert cm.fwiou() == pytest.approx(3 / 4)


def test_hand_vc_window_range_follows_official_script():
    # One row of 2 pixels, 4 frames, n = 2.
    # gt  : [1,2] [1,3] [1,3] [1,3]
    # pred: [1,1] [2,1] [2,1] [2,2]
    # window 0 (f0,f1): GT-cons {p0}, pred-cons {p1}    -> 0/1 = 0
    # window 1 (f1,f2): GT-cons {p0,p1}, pred-cons both  -> 2/2 = 1
    # window 2 (f2,f3): GT-cons {p0,p1}, pred-cons {p0}  -> 1/2
    # VC_perclip.py iterates range(len - n) = starts 0, 1 only.
    gts = [np.array([[1, 2]]), np.array([[1, 3]]), np.array([[1, 3]]), np.array([[1, 3]])]
    preds = [np.array([[1, 1]]), np.array([[2, 1]]), np.array([[2, 1]]), np.array([[2, 2]])]
    assert_close_seq(video_consistency_windows(preds, gts, 2), [0.0, 1.0])
    assert_close_seq(
        video_consistency_windows(preds, gts, 2, drop_last_window=False), [0.0, 1.0, 0.5]
    )
    vc = VideoConsistency(window_sizes=(2,))
    vc.add_video(preds, gts)
    assert vc.pooled(2) == pytest.approx(0.5)


def test_hand_vc_prediction_need_not_match_gt():
    # Prediction is constant and wrong everywhere, GT constant: still VC = 1.
    gts = [np.zeros((2, 2), dtype=np.int64)] * 5
    preds = [np.full((2, 2), 3, dtype=np.int64)] * 5
    assert_close_seq(video_consistency_windows(preds, gts, 3), [1.0, 1.0])


def test_pooled_and_per_video_differ_on_constructed_case():
    n = 8
    # Video A: n+1 frames -> 1 window, perfectly consistent -> score 1.
    gts_a = [np.zeros((2, 2), dtype=np.int64)] * (n + 1)
    preds_a = list(gts_a)
    # Video B: n+3 frames -> 3 windows; GT constant, prediction flickers
    # every frame at every pixel -> score 0 for each window.
    gts_b = [np.zeros((2, 2), dtype=np.int64)] * (n + 3)
    preds_b = [np.full((2, 2), k % 2, dtype=np.int64) for k in range(n + 3)]
    vc = VideoConsistency(window_sizes=(n,))
    vc.add_video(preds_a, gts_a)
    vc.add_video(preds_b, gts_b)
    assert vc.num_windows(n) == 4
    assert vc.pooled(n) == pytest.approx(1 / 4)  # (1 + 0 + 0 + 0) / 4
    assert vc.per_video(n) == pytest.approx(1 / 2)  # (1 + 0) / 2


def test_vc_nan_windows_are_skipped_by_both_conventions():
    # Video A: GT changes every frame at its only pixel -> every window NaN.
    gts_a = [np.array([[k]]) for k in range(6)]
    preds_a = [np.array([[0]])] * 6
    # Video B: score 1 everywhere.
    gts_b = [np.array([[1]])] * 6
    preds_b = [np.array([[2]])] * 6
    vc = VideoConsistency(window_sizes=(3,))
    vc.add_video(preds_a, gts_a)
    assert np.isnan(video_consistency_windows(preds_a, gts_a, 3)).all()
    assert math.isnan(vc.pooled(3)) and math.isnan(vc.per_video(3))
    vc.add_video(preds_b, gts_b)
    assert vc.pooled(3) == 1.0
    assert vc.per_video(3) == 1.0


@pytest.mark.parametrize("n", [8, 16])
def test_short_videos_give_no_windows(n):
    rng = np.random.default_rng(n)
    vc = VideoConsistency()
    for t in (1, 3, n - 1, n):  # official: len <= n -> skipped
        frames = random_video(rng, t)
        assert video_consistency_windows(frames, frames, n).size == 0
        vc.add_video(frames, frames)
    assert vc.num_videos == 4
    assert vc.num_windows(n) == 0
    assert math.isnan(vc.pooled(n)) and math.isnan(vc.per_video(n))
    # Exactly n frames has one window when the last window is kept.
    frames = random_video(rng, n)
    assert video_consistency_windows(frames, frames, n, drop_last_window=False).size == 1
    assert video_consistency_windows([], [], n).size == 0


# --------------------------------------------------------------------------- #
# Randomised comparisons with the references
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_and_scores_match_reference(seed):
    rng = np.random.default_rng(seed)
    c = 6
    cm = ConfusionMatrix(c)
    ref = [[0] * c for _ in range(c)]
    # Class 4 never appears (absent); class 5 only in predictions.
    for _ in range(3):
        pred, gt = random_maps(rng, (H, W), c, [0, 1, 2, 3], [0, 1, 2, 3, 5])
        one = confusion_matrix(pred, gt, c)
        r = ref_confusion(pred, gt, c)
        np.testing.assert_array_equal(one, r)
        assert one.dtype == np.int64
        cm.update(pred, gt)
        ref = [[ref[i][j] + r[i][j] for j in range(c)] for i in range(c)]
    np.testing.assert_array_equal(cm.matrix, ref)
    assert_close_seq(cm.iou(), ref_iou(ref))
    iou = cm.iou()
    assert math.isnan(iou[4]) and iou[5] == 0.0
    assert_close(cm.miou(), ref_miou(ref, "nan"))
    assert_close(cm.miou(absent="zero"), ref_miou(ref, "zero"))
    assert cm.miou() != pytest.approx(cm.miou(absent="zero"))
    assert_close(cm.fwiou(), ref_fwiou(ref))
    assert_close(cm.pixel_accuracy(), ref_pixacc(ref))


@pytest.mark.parametrize("seed", SEEDS)
def test_batched_torch_update_merge_and_summary(seed):
    rng = np.random.default_rng(seed)
    c = 5
    pred, gt = random_maps(rng, (4, H, W), c, [0, 1, 2], [0, 1, 2, 3])
    ref = ref_confusion(pred, gt, c)

    batched = ConfusionMatrix(c)
    batched.update(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8))
    np.testing.assert_array_equal(batched.matrix, ref)

    a, b = ConfusionMatrix(c), ConfusionMatrix(c)
    a.update(pred[:1], gt[:1])
    b.update(pred[1:], gt[1:])
    np.testing.assert_array_equal(a.merge(b).matrix, ref)

    names = ["road", "car", "sky", "tree", "void"]
    s = batched.summary(names)
    assert isinstance(s, SegmentationScores)
    assert list(s.per_class_iou) == names
    assert_close_seq(list(s.per_class_iou.values()), ref_iou(ref))
    assert_close(s.miou, ref_miou(ref, "nan"))
    assert_close(batched.summary(names, absent="zero").miou, ref_miou(ref, "zero"))
    assert_close(s.fwiou, ref_fwiou(ref))
    assert_close(s.pixel_accuracy, ref_pixacc(ref))
    assert math.isnan(s.per_class_iou["void"])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16])
def test_vc_windows_match_reference(seed, n):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(max(1, n - 2), n + 12))
    gts = random_video(rng, t, change=0.03)
    preds = random_video(rng, t, change=0.05, with_ignore=False)
    # Tie predictions to GT at some pixels so the intersection is non-trivial.
    tie = rng.random((H, W)) < 0.5
    preds = [np.where(tie, g, p) for g, p in zip(gts, preds)]
    for drop_last in (True, False):
        for ignore in (None, IGNORE_INDEX):
            got = video_consistency_windows(
                preds, gts, n, drop_last_window=drop_last, ignore_index=ignore
            )
            want = ref_vc_windows(preds, gts, n, drop_last=drop_last, ignore=ignore)
            assert_close_seq(got, want)
    # Stacked arrays and torch tensors are the same input.
    got = video_consistency_windows(torch.from_numpy(np.stack(preds)), np.stack(gts), n)
    assert_close_seq(got, ref_vc_windows(preds, gts, n))


def test_vc_pixel_chunking_matches_reference(monkeypatch):
    import dcfm.metrics as metrics

    rng = np.random.default_rng(123)
    gts = random_video(rng, 12, change=0.03)
    preds = random_video(rng, 12, change=0.05)
    want = ref_vc_windows(preds, gts, 3)
    # 12 frames * 2 pixels per chunk -> many chunks, one of them ragged.
    monkeypatch.setattr(metrics, "_VC_CHUNK_ELEMENTS", 24)
    assert_close_seq(video_consistency_windows(preds, gts, 3), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_vc_accumulator_matches_reference(seed):
    rng = np.random.default_rng(seed)
    lengths = [3, 8, 9, 16, 17, 20, 25]  # includes videos without windows
    vc = VideoConsistency()
    other = VideoConsistency()
    ref: dict[int, list[list[float]]] = {8: [], 16: []}
    for k, t in enumerate(lengths):
        gts = random_video(rng, t, change=0.03)
        preds = random_video(rng, t, change=0.02 + 0.02 * (k % 3), with_ignore=False)
        (vc if k % 2 else other).add_video(preds, gts)
        for n in (8, 16):
            ref[n].append(ref_vc_windows(preds, gts, n))
    vc.merge(other)
    # Merge changes video order, which neither convention depends on.
    for n in (8, 16):
        pooled = ref_nanmean([s for video in ref[n] for s in video])
        per_video = ref_nanmean([ref_nanmean(v) for v in ref[n] if v])
        assert vc.num_windows(n) == sum(len(v) for v in ref[n])
        assert_close(vc.pooled(n), pooled)
        assert_close(vc.per_video(n), per_video)
    with pytest.raises(KeyError):
        vc.pooled(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_label_free_consistency_matches_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, size=(H, W))
    b = rng.integers(0, 3, size=(H, W))
    a[0, :2] = IGNORE_INDEX
    b[1, 3] = IGNORE_INDEX
    pairs = list(zip(a.ravel().tolist(), b.ravel().tolist()))
    assert_close(label_change_rate(a, b), sum(x != y for x, y in pairs) / len(pairs))
    assert_close(agreement(a, b), sum(x == y for x, y in pairs) / len(pairs))
    kept = [(x, y) for x, y in pairs if IGNORE_INDEX not in (x, y)]
    assert_close(
        label_change_rate(a, b, ignore=IGNORE_INDEX), sum(x != y for x, y in kept) / len(kept)
    )
    assert_close(agreement(a, b, ignore=IGNORE_INDEX), sum(x == y for x, y in kept) / len(kept))
    assert label_change_rate(a, a) == 0.0 and agreement(torch.from_numpy(a), a) == 1.0
    assert math.isnan(label_change_rate(np.full((2, 2), 7), np.zeros((2, 2)), ignore=7))


@pytest.mark.parametrize("seed", SEEDS)
def test_class_pixel_counts_matches_reference(seed):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 4, size=(3, H, W))
    lab[rng.random(lab.shape) < 0.2] = IGNORE_INDEX
    want = [sum(1 for v in lab.ravel().tolist() if v == k) for k in range(6)]
    got = class_pixel_counts(lab, 6)
    assert got.dtype == np.int64 and got.shape == (6,)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_prediction_out_of_range_names_the_value(bad):
    gt = np.zeros((2, 2), dtype=np.int64)
    pred = np.zeros((2, 2), dtype=np.int64)
    pred[1, 0] = bad
    with pytest.raises(ValueError, match=rf"prediction label {bad}\b"):
        confusion_matrix(pred, gt, 3)
    with pytest.raises(ValueError, match=str(bad)):
        ConfusionMatrix(3).update(pred, gt)


def test_other_input_errors():
    with pytest.raises(ValueError, match="ground-truth label 9"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 9), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(TypeError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 3)
    with pytest.raises(ValueError):
        ConfusionMatrix(3).miou(absent="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConfusionMatrix(3).summary(["a", "b"])
    with pytest.raises(ValueError):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(ValueError):
        video_consistency_windows([np.zeros((2, 2), int)] * 3, [np.zeros((2, 3), int)] * 3, 1)
    with pytest.raises(ValueError):
        video_consistency_windows([np.zeros((2, 2), int)] * 3, [np.zeros((2, 2), int)] * 3, 0)
    with pytest.raises(ValueError):
        class_pixel_counts(np.array([0, 5]), 3)


def test_empty_accumulator_is_nan_without_warnings():
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((2, 2), int), np.full((2, 2), IGNORE_INDEX))
    assert cm.total == 0
    assert math.isnan(cm.miou()) and cm.miou(absent="zero") == 0.0
    assert math.isnan(cm.fwiou()) and math.isnan(cm.pixel_accuracy())
