"""Segmentation and video-consistency metrics (METHOD.md section 5).

All functions take integer label maps as numpy arrays or torch tensors (moved
to CPU here); everything is vectorised with ``np.bincount`` / array ops.

mIoU / fwIoU / pixel accuracy
    One confusion matrix (rows = GT, columns = prediction) is accumulated over
    every evaluated frame, and the scores are computed once at the end, never
    averaged per frame. Pixels whose GT is ``IGNORE_INDEX`` (255) are excluded.

    Absent classes: a class that appears neither in the GT nor in the
    prediction over the *whole* evaluation has IoU 0/0. This module reports it
    as NaN and leaves it out of mIoU (``nanmean``), which is mmsegmentation's
    convention and what :meth:`ConfusionMatrix.miou` does by default
    (``absent="nan"``). The official DCFM code counts such classes as IoU 0,
    i.e. divides by the full class count; ``miou(absent="zero")`` reproduces
    that. (The VSPW/CFFM ``Evaluator`` is a third variant: it averages over the
    classes present in the GT only.) A class present only in the prediction
    has IoU 0 (not NaN) under both conventions.

    fwIoU = sum_c freq_c * IoU_c, freq_c = GT pixels of c / all valid GT pixels;
    classes with no GT pixels contribute 0.

VC_n (VSPW video consistency)
    Follows VSPW's official ``VC_perclip.py`` (VSPW-dataset/VSPW_code, also
    copied unchanged into CFFM/MRCFA). What that script does:

    * Window starts are ``range(len(frames) - n)``, i.e. 0 .. len-n-1: the last
      full window (start len-n) is *not* evaluated, and a video with
      ``len <= n`` frames contributes no windows (the script also skips such
      videos explicitly). ``drop_last_window=False`` evaluates all
      ``len - n + 1`` windows instead.
    * GT-consistent pixels: GT equal to the window's first frame's GT in all n
      frames; pred-consistent likewise; the prediction is *not* required to
      equal the GT. Window score = |pred-cons & GT-cons| / |GT-cons|.
    * No ignore handling: a pixel that is 255 (or "others") in all n GT frames
      counts as GT-consistent like any other label. ``ignore_index`` lets a
      caller drop such pixels, but the default (None) matches the official one.
    * A window with no GT-consistent pixel scores 0/0 = NaN.
    * The reported number pools the windows of all videos and takes
      ``np.nanmean`` (:meth:`VideoConsistency.pooled`). The script only prints
      per-video means; :meth:`VideoConsistency.per_video` is that other
      convention (nanmean per video, then mean over videos with a finite score).

    This project reports the pooled (official) VC_8 and VC_16.

Label-free consistency (this project's own, for unlabelled archives)
    :func:`label_change_rate` between consecutive predicted frames and
    :func:`agreement` between two predictions of the same frame (e.g. the ones
    propagated from the previous and from the next keyframe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dcfm.data import IGNORE_INDEX

# Pixels handled per chunk in VC: bounds the (frames x pixels) int32 cumsum.
_VC_CHUNK_ELEMENTS = 1 << 24

__all__ = [
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "SegmentationScores",
    "VideoConsistency",
    "agreement",
    "class_pixel_counts",
    "confusion_matrix",
    "label_change_rate",
    "video_consistency_windows",
]


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_integer(a: np.ndarray, what: str) -> None:
    if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise TypeError(f"{what} must be an integer label map, got dtype {a.dtype}")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with NaN where den == 0, without RuntimeWarnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(a: np.ndarray) -> float:
    """``np.nanmean`` that returns NaN for empty / all-NaN input without warning."""
    a = np.asarray(a, dtype=np.float64)
    finite = ~np.isnan(a)
    return float(a[finite].mean()) if finite.any() else float("nan")


# --------------------------------------------------------------------------- #
# Confusion matrix, IoU
# --------------------------------------------------------------------------- #


def confusion_matrix(
    pred: Any, gt: Any, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """C x C int64 confusion matrix (rows = GT, cols = prediction).

    Pixels whose GT equals ``ignore_index`` are excluded. Any other label
    outside ``[0, num_classes)`` at a counted pixel raises ValueError, since it
    means a label-mapping bug rather than something to skip silently.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = _to_numpy(pred)
    g = _to_numpy(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    _check_integer(p, "pred")
    _check_integer(g, "gt")
    p = p.reshape(-1)
    g = g.reshape(-1)
    if ignore_index is not None:
        valid = g != ignore_index
        p = p[valid]
        g = g[valid]
    p = p.astype(np.int64, copy=False)
    g = g.astype(np.int64, copy=False)
    for name, a in (("prediction", p), ("ground-truth", g)):
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} label {int(a[bad][0])} outside [0, {num_classes}) "
                f"({int(bad.sum())} pixel(s); ignore_index={ignore_index})"
            )
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


@dataclass(frozen=True)
class SegmentationScores:
    """Final scores of one evaluation; IoUs in [0, 1], NaN for absent classes."""

    miou: float
    fwiou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float]


@dataclass
class ConfusionMatrix:
    """Accumulates a confusion matrix over many frames/batches."""

    num_classes: int
    ignore_index: int | None = IGNORE_INDEX
    matrix: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        c = self.num_classes
        if self.matrix is None:
            self.matrix = np.zeros((c, c), dtype=np.int64)
        else:
            self.matrix = np.asarray(self.matrix, dtype=np.int64)
            if self.matrix.shape != (c, c):
                raise ValueError(f"matrix shape {self.matrix.shape} != {(c, c)}")

    def update(self, pred: Any, gt: Any) -> None:
        """Add label maps of any (matching) shape, e.g. (H, W) or (N, H, W)."""
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one (in place); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge confusion matrices with different settings")
        self.matrix += other.matrix
        return self

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN where the class never occurs."""
        tp = np.diag(self.matrix)
        union = self.matrix.sum(axis=1) + self.matrix.sum(axis=0) - tp
        return _safe_div(tp, union)

    def miou(self, absent: Literal["nan", "zero"] = "nan") -> float:
        """Mean IoU. ``absent="nan"``: skip absent classes (mmseg);
        ``"zero"``: count them as 0 (official DCFM code)."""
        iou = self.iou()
        if absent == "nan":
            return _nanmean(iou)
        if absent == "zero":
            return float(np.nan_to_num(iou, nan=0.0).mean())
        raise ValueError(f"absent must be 'nan' or 'zero', got {absent!r}")

    def fwiou(self) -> float:
        """Frequency-weighted IoU, frequencies over valid GT pixels."""
        gt_pixels = self.matrix.sum(axis=1)
        total = gt_pixels.sum()
        if total == 0:
            return float("nan")
        freq = gt_pixels / total
        # A class with GT pixels has a positive union, so its IoU is finite;
        # the where only silences the 0 * NaN of classes with no GT.
        return float(np.where(freq > 0, freq * np.nan_to_num(self.iou()), 0.0).sum())

    def pixel_accuracy(self) -> float:
        """Correct pixels / valid pixels."""
        return float(_safe_div(np.trace(self.matrix), self.matrix.sum()))

    def summary(
        self,
        class_names: Sequence[str] | None = None,
        absent: Literal["nan", "zero"] = "nan",
    ) -> SegmentationScores:
        """All scores at once; ``class_names`` defaults to the class indices."""
        if class_names is None:
            class_names = [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        iou = self.iou()
        return SegmentationScores(
            miou=self.miou(absent),
            fwiou=self.fwiou(),
            pixel_accuracy=self.pixel_accuracy(),
            per_class_iou={str(n): float(v) for n, v in zip(class_names, iou)},
        )


def class_pixel_counts(
    label_map: Any, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """Pixels per class (int64, length ``num_classes``), ``ignore_index`` skipped."""
    a = _to_numpy(label_map).reshape(-1)
    _check_integer(a, "label_map")
    if ignore_index is not None:
        a = a[a != ignore_index]
    a = a.astype(np.int64, copy=False)
    bad = (a < 0) | (a >= num_classes)
    if bad.any():
        raise ValueError(f"label {int(a[bad][0])} outside [0, {num_classes})")
    return np.bincount(a, minlength=num_classes).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- #
# VC_n
# --------------------------------------------------------------------------- #


def _stack_frames(frames: Any, what: str) -> np.ndarray:
    """(T, H, W) array from a (T, H, W) array/tensor or a sequence of (H, W) maps."""
    if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
        a = _to_numpy(frames)
    else:
        frames = list(frames)
        if not frames:
            return np.zeros((0, 0, 0), dtype=np.int64)
        a = np.stack([_to_numpy(f) for f in frames])
    if a.ndim != 3:
        raise ValueError(f"{what}: expected T x H x W frames, got shape {a.shape}")
    _check_integer(a, what)
    return a


def _consistent(changes_cum: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    # Equality is transitive, so "equal to the first frame in all n frames" is
    # "no change between consecutive frames inside the window": zero changes
    # between cumulative counts at the window's first and last frame.
    return changes_cum[starts + n - 1] == changes_cum[starts]


def _changes_cumsum(a: np.ndarray) -> np.ndarray:
    """(T, P) number of label changes between frame 0 and frame k, per pixel."""
    out = np.zeros(a.shape, dtype=np.int32)
    np.cumsum(a[1:] != a[:-1], axis=0, dtype=np.int32, out=out[1:])
    return out


def video_consistency_windows(
    preds: Any,
    gts: Any,
    n: int,
    *,
    ignore_index: int | None = None,
    drop_last_window: bool = True,
) -> np.ndarray:
    """Per-window VC_n scores of one video (float64, NaN: no GT-consistent pixel).

    ``preds``/``gts``: sequences of H x W label maps or T x H x W arrays.
    Defaults follow VSPW's ``VC_perclip.py``: window starts 0 .. T-n-1 (the
    last window is dropped, T <= n gives no window) and no ignore handling.
    """
    if n < 1:
        raise ValueError(f"window size n must be >= 1, got {n}")
    g = _stack_frames(gts, "gts")
    p = _stack_frames(preds, "preds")
    if g.shape != p.shape:
        raise ValueError(f"preds shape {p.shape} != gts shape {g.shape}")
    t = g.shape[0]
    num_windows = t - n if drop_last_window else t - n + 1
    if num_windows <= 0:
        return np.empty(0, dtype=np.float64)
    g = g.reshape(t, -1)
    p = p.reshape(t, -1)
    starts = np.arange(num_windows)
    inter = np.zeros(num_windows, dtype=np.int64)
    denom = np.zeros(num_windows, dtype=np.int64)
    chunk = max(1, _VC_CHUNK_ELEMENTS // t)
    for lo in range(0, g.shape[1], chunk):
        gc = g[:, lo : lo + chunk]
        gt_cons = _consistent(_changes_cumsum(gc), starts, n)
        if ignore_index is not None:
            gt_cons &= gc[starts] != ignore_index
        pred_cons = _consistent(_changes_cumsum(p[:, lo : lo + chunk]), starts, n)
        inter += np.count_nonzero(gt_cons & pred_cons, axis=1)
        denom += np.count_nonzero(gt_cons, axis=1)
    return _safe_div(inter, denom)


@dataclass
class VideoConsistency:
    """Accumulates VC_n window scores over videos (n = 8 and 16 by default).

    ``pooled(n)`` is the official number and the one this project reports.
    """

    window_sizes: tuple[int, ...] = (8, 16)
    ignore_index: int | None = None
    drop_last_window: bool = True
    windows: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.window_sizes = tuple(int(n) for n in self.window_sizes)
        for n in self.window_sizes:
            self.windows.setdefault(n, [])

    def add_video(self, preds: Any, gts: Any) -> None:
        """Score every window of one video (frames in temporal order)."""
        g = _stack_frames(gts, "gts")
        p = _stack_frames(preds, "preds")
        for n in self.window_sizes:
            self.windows[n].append(
                video_consistency_windows(
                    p,
                    g,
                    n,
                    ignore_index=self.ignore_index,
                    drop_last_window=self.drop_last_window,
                )
            )

    def merge(self, other: VideoConsistency) -> VideoConsistency:
        """Append another accumulator's videos (in place); returns self."""
        if (other.window_sizes, other.ignore_index, other.drop_last_window) != (
            self.window_sizes,
            self.ignore_index,
            self.drop_last_window,
        ):
            raise ValueError("cannot merge VideoConsistency with different settings")
        for n in self.window_sizes:
            self.windows[n].extend(other.windows[n])
        return self

    def _get(self, n: int) -> list[np.ndarray]:
        if n not in self.windows:
            raise KeyError(f"VC_{n} not accumulated; window_sizes={self.window_sizes}")
        return self.windows[n]

    @property
    def num_videos(self) -> int:
        """Videos added so far (with or without windows)."""
        return len(next(iter(self.windows.values()), []))

    def num_windows(self, n: int) -> int:
        """Windows scored for VC_n over all videos (NaN windows included)."""
        return sum(w.size for w in self._get(n))

    def pooled(self, n: int) -> float:
        """Official VC_n: nanmean over all windows of all videos."""
        per = self._get(n)
        return _nanmean(np.concatenate(per)) if per else float("nan")

    def per_video(self, n: int) -> float:
        """VC_n averaged per video first, then over videos with a finite mean."""
        return _nanmean(np.array([_nanmean(w) for w in self._get(n)], dtype=np.float64))


# --------------------------------------------------------------------------- #
# Label-free consistency
# --------------------------------------------------------------------------- #


def _pair(a: Any, b: Any, ignore: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = _to_numpy(a).reshape(-1)
    y = _to_numpy(b).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {np.shape(a)} vs {np.shape(b)}")
    if ignore is not None:
        keep = (x != ignore) & (y != ignore)
        x, y = x[keep], y[keep]
    return x, y


def label_change_rate(prev: Any, cur: Any, ignore: int | None = None) -> float:
    """Fraction of pixels whose predicted label differs between two frames.

    Pixels equal to ``ignore`` in either frame are left out; NaN if none remain.
    """
    x, y = _pair(prev, cur, ignore)
    return float(np.count_nonzero(x != y) / x.size) if x.size else float("nan")


def agreement(pred_a: Any, pred_b: Any, ignore: int | None = None) -> float:
    """Fraction of pixels where two predictions of the same frame agree."""
    x, y = _pair(pred_a, pred_b, ignore)
    return float(np.count_nonzero(x == y) / x.size) if x.size else float("nan")

