"""Logits at feature resolution -> label map at output resolution, without upsampling every class.

The reference is ``upsample_logits(logits, size).argmax(0)``: bilinear upsampling (align_corners=False)
of every class, then argmax. At 1920x1080 with 19 classes that is 39 M interpolated values, a softmax and
two reductions per frame: ~0.8 s on one CPU thread, far more than the model's non-keyframe path.

Bilinear upsampling gives each output pixel a convex combination of the logit vectors at the four
corners of the feature-map cell it falls in. If one class is the strict argmax at all four corners, it
is the argmax of every convex combination of them, so all output pixels of that cell get that label
without interpolating anything. Only cells whose corners disagree (class boundaries, a few percent of
cells on real footage) are interpolated, and only their own pixels, and only for the classes that can win
there (two in almost every border cell: one comparison per pixel). The labels equal the reference's
except where two classes tie to within float rounding (the reference's own result there depends on its
kernel's summation order); ``tests/test_postprocess.py`` checks this.

``confidence`` (mean over pixels of the max softmax probability) and ``agreement`` (fraction of pixels
where two logit maps have the same argmax) are frame statistics. They are computed exactly at the pixels
of a regular sub-grid of the output (every ``stride``-th row and column, ``stride`` chosen so that at most
~``STAT_PIXELS`` pixels are sampled): exact for outputs up to that size, an estimate above it
(BENCHMARKS.md measures the difference on 720p and 1080p footage).

On CUDA none of this pays off (data-dependent shapes force host syncs); ``frame_labels`` there upsamples
and reduces on the device and leaves the statistics as device tensors, so a block of frames syncs once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Pixels the frame statistics are computed on, at most (about): 128x128.
STAT_PIXELS = 1 << 14
# Corners closer than this (relative to the logits' magnitude) to a tie go the exact way: float rounding
# of the interpolation is ~1e-7 relative, so a margin above this cannot flip in the reference either.
_TIE_MARGIN = 1e-5
# Stands in for classes that cannot win in a cell (finite: a zero bilinear weight times it stays 0).
_NEVER = -1e30
# Above this share of mixed cells (logits that are noise rather than regions, e.g. an untrained model),
# everything is upsampled: the per-cell work would cost more.
_MAX_MIXED = 0.3
# Outputs up to this many times the logits' area are upsampled in full (the shortcut does not pay there).
_DIRECT_AREA = 4


@dataclass
class FrameLabels:
    labels: np.ndarray | torch.Tensor  # (H, W) label map (uint8/uint16 numpy on CPU; int64 tensor on CUDA)
    confidence: float | torch.Tensor
    agreement: float | torch.Tensor | None


def source_coordinates(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices bilinear interpolation reads and the weight of the
    second, as PyTorch computes them for align_corners=False (coordinates below 0 clamp to 0)."""
    # In float32, the way ATen's CPU kernel computes them, so the weights match its to the last bit.
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    weight = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, weight


def stat_stride(size: tuple[int, int], budget: int = STAT_PIXELS) -> int:
    """Row/column step of the sub-grid the frame statistics are computed on (1: every pixel)."""
    return max(1, math.ceil(math.sqrt(size[0] * size[1] / budget)))


def _interpolate_at(logits: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Bilinear values (C, len(rows), len(cols)) of the output pixels ``rows x cols``."""
    c, h, w = logits.shape
    y0, y1, wy = (torch.from_numpy(a) for a in rows)
    x0, x1, wx = (torch.from_numpy(a) for a in cols)
    wy = wy.view(1, -1, 1)
    vertical = logits.index_select(1, y0) * (1 - wy) + logits.index_select(1, y1) * wy  # (C, R, w)
    wx = wx.view(1, 1, -1)
    return vertical.index_select(2, x0) * (1 - wx) + vertical.index_select(2, x1) * wx


def _subsample(coords: tuple[np.ndarray, np.ndarray, np.ndarray], stride: int) -> tuple[np.ndarray, ...]:
    # Centred sub-grid: the sample of each stride x stride block is its middle pixel.
    n = len(coords[0])
    picks = np.arange(min(stride // 2, n - 1), n, stride)
    return tuple(a[picks] for a in coords)


def frame_labels(
    logits: torch.Tensor, size: tuple[int, int], dtype: np.dtype,
    pair: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> FrameLabels:
    """Labels, confidence and (with ``pair``) agreement of one frame.

    ``logits``: (C, h, w) at feature resolution (a sum over keyframes in bidirectional mode: upsampling
    is linear, so upsampling the sum equals summing the upsampled maps). ``size``: output (H, W).
    ``pair``: the two per-keyframe logit maps whose upsampled argmaxes ``agreement`` compares.
    """
    if logits.device.type != "cpu":
        return _frame_labels_device(logits, size, pair)
    logits = logits.float().contiguous()
    rows = source_coordinates(size[0], logits.shape[1])
    cols = source_coordinates(size[1], logits.shape[2])
    if size[0] * size[1] <= _DIRECT_AREA * logits.shape[1] * logits.shape[2]:
        # Little or no upsampling: interpolating everything costs less than finding the uniform cells.
        labels = _direct_argmax(logits, size, dtype)
    else:
        labels = fast_argmax(logits, rows, cols, dtype)
    stride = stat_stride(size)
    grid_rows, grid_cols = _subsample(rows, stride), _subsample(cols, stride)
    agreement = None
    if pair is None:
        sampled = _interpolate_at(logits, grid_rows, grid_cols)
    else:
        first = _interpolate_at(pair[0].float(), grid_rows, grid_cols)
        other = _interpolate_at(pair[1].float(), grid_rows, grid_cols)
        sampled = first + other  # interpolation is linear: the sum's, up to float rounding
        agreement = float((_first_argmax(first[None]) == _first_argmax(other[None])).float().mean())
    confidence = float(torch.softmax(sampled, dim=0).amax(dim=0).mean())
    return FrameLabels(labels, confidence, agreement)


def _frame_labels_device(
    logits: torch.Tensor, size: tuple[int, int], pair: tuple[torch.Tensor, torch.Tensor] | None
) -> FrameLabels:
    # On a GPU the plain computation is fast; the statistics stay tensors so nothing syncs per frame.
    from dcfm.model import upsample_logits

    up = upsample_logits(logits[None], size)[0]
    top, labels = up.max(dim=0)
    # max softmax = exp(max - logsumexp): no (C, H, W) softmax tensor
    confidence = torch.exp(top - torch.logsumexp(up, dim=0)).mean()
    agreement = None
    if pair is not None:
        first = upsample_logits(pair[0][None], size)[0].argmax(0)
        other = upsample_logits(pair[1][None], size)[0].argmax(0)
        agreement = (first == other).float().mean()
    return FrameLabels(labels, confidence, agreement)


def fast_argmax(
    logits: torch.Tensor,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray, np.ndarray],
    dtype: np.dtype = np.dtype(np.int64),
    cells_per_batch: int = 4096,
) -> np.ndarray:
    """argmax over classes of the bilinearly upsampled ``logits`` (C, h, w), as ``dtype`` (H, W)."""
    c, h, w = logits.shape
    y0, _, wy_all = rows
    x0, _, wx_all = cols
    if c == 1:
        return np.zeros((len(y0), len(x0)), dtype=dtype)
    values = logits.numpy()
    best, top, runner_up = _top_two(values)
    tolerance = _TIE_MARGIN * max(1.0, float(np.abs(top).max()))
    sure = (top - runner_up) > tolerance
    # Cell (i, j) has corners (i, min(i+1, h-1)) x (j, min(j+1, w-1)), the same clamping as the kernel.
    down = np.minimum(np.arange(h) + 1, h - 1)
    right = np.minimum(np.arange(w) + 1, w - 1)
    uniform = (
        sure & sure[down] & sure[:, right] & sure[down][:, right]
        & (best == best[down]) & (best == best[:, right]) & (best == best[down][:, right])
    )
    if (~uniform).mean() > _MAX_MIXED:  # noise, not regions: the shortcut would cost more than it saves
        return _direct_argmax(logits, (len(y0), len(x0)), dtype)
    labels = best.astype(dtype).take(y0, axis=0).take(x0, axis=1)
    # The output rows of feature row i are contiguous (y0 is monotone), and so are the columns of
    # feature column j: a mixed cell is a small rectangle of output pixels, interpolated from its four
    # corners alone. Rectangles are padded to the largest one by repeating their last row/column (which
    # then writes the same label twice), and done in batches of cells.
    row_count = np.bincount(y0, minlength=h)
    col_count = np.bincount(x0, minlength=w)
    mixed_i, mixed_j = np.nonzero(~uniform & (row_count[:, None] > 0) & (col_count[None, :] > 0))
    if not len(mixed_i):
        return labels
    # Corner logits of every mixed cell, (4, K, C): rows of the channels-last table, one gather each.
    table = np.ascontiguousarray(values.transpose(1, 2, 0))
    down_i, right_j = down[mixed_i], right[mixed_j]
    corners = np.stack([table[mixed_i, mixed_j], table[mixed_i, right_j], table[down_i, mixed_j],
                        table[down_i, right_j]])
    # Only classes that can win somewhere in a cell: a class below another's lowest corner value at all
    # four corners stays below it at every convex combination (strictly: never even ties).
    candidate = corners.max(axis=0) >= corners.min(axis=0).max(axis=1, keepdims=True)  # (K, C)
    count = candidate.sum(axis=1)
    sy, sx = int(row_count.max()), int(col_count.max())
    # When so many classes can win that interpolating them costs more than upsampling everything (logits
    # with many near-equal classes), upsample everything.
    if int(count.sum()) * sy * sx > _MAX_MIXED * c * len(y0) * len(x0):
        return _direct_argmax(logits, (len(y0), len(x0)), dtype)
    cells = _CellGrid(np.searchsorted(y0, np.arange(h)), row_count, wy_all, sy,
                      np.searchsorted(x0, np.arange(w)), col_count, wx_all, sx)
    flat = labels.reshape(-1)
    width = labels.shape[1]
    # Most mixed cells lie on the border of two regions: one or two candidates, one comparison per pixel.
    pairs = np.flatnonzero(count <= 2)
    for part in np.array_split(pairs, max(1, -(-len(pairs) // cells_per_batch))):
        if not len(part):
            continue
        ys, xs, wy, wx = cells.pixels(mixed_i[part], mixed_j[part])
        low = candidate[part].argmax(axis=1)  # the two classes in class order (the same one twice if alone)
        high = c - 1 - candidate[part, ::-1].argmax(axis=1)
        wins = _bilinear(corners[:, part, high], wy, wx) > _bilinear(corners[:, part, low], wy, wx)
        exact = np.where(wins, high[:, None, None], low[:, None, None]).astype(dtype, copy=False)
        np.put(flat, (ys * width)[:, :, None] + xs[:, None, :], exact)
    many = np.flatnonzero(count > 2)
    for part in np.array_split(many, max(1, -(-len(many) // cells_per_batch))):
        if not len(part):
            continue
        ys, xs, wy, wx = cells.pixels(mixed_i[part], mixed_j[part])
        m = int(count[part].max())
        # Candidates first, in class order (a stable sort), so the first maximum is torch.argmax's.
        classes = np.argsort(~candidate[part], axis=1, kind="stable")[:, :m]  # (K, M)
        chosen = np.take_along_axis(corners[:, part], classes[None], axis=2)  # (4, K, M)
        chosen = np.where(np.take_along_axis(candidate[part], classes, axis=1)[None], chosen, np.float32(_NEVER))
        block = _bilinear(chosen, wy[:, None], wx[:, None])  # (K, M, sy, sx)
        winner = _first_argmax(torch.from_numpy(block)).numpy().astype(np.int64)  # (K, sy, sx)
        exact = np.take_along_axis(classes, winner.reshape(len(part), -1), axis=1).reshape(winner.shape)
        np.put(flat, (ys * width)[:, :, None] + xs[:, None, :], exact.astype(dtype, copy=False))
    return labels


@dataclass(frozen=True)
class _CellGrid:
    """Where each feature-map cell's output pixels are: first output row/column, how many, and their
    bilinear weights; rectangles padded to ``sy`` x ``sx`` by repeating the last row/column."""

    row_start: np.ndarray
    row_count: np.ndarray
    wy: np.ndarray
    sy: int
    col_start: np.ndarray
    col_count: np.ndarray
    wx: np.ndarray
    sx: int

    def pixels(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Output rows (K, sy), columns (K, sx) and weights (K, sy, 1), (K, 1, sx) of cells (i, j)."""
        ys = self.row_start[i, None] + np.minimum(np.arange(self.sy), self.row_count[i, None] - 1)
        xs = self.col_start[j, None] + np.minimum(np.arange(self.sx), self.col_count[j, None] - 1)
        return ys, xs, self.wy[ys][:, :, None], self.wx[xs][:, None, :]


def _bilinear(corners: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Interpolate (4, ...) corner values (top-left, top-right, bottom-left, bottom-right) at weights
    ``wy``/``wx`` broadcast against them, in float32 and in the order of ATen's CPU kernel (columns
    first, then rows), so that a value equals the reference's to the last bit."""
    a, b, c, d = (v[..., None, None] for v in corners)
    top = a * (1 - wx) + b * wx
    bottom = c * (1 - wx) + d * wx
    return top * (1 - wy) + bottom * wy


def _top_two(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (C, h, w): the first index of the maximum over C (as argmax), the maximum and the second
    largest value, in one pass over the classes (numpy's reductions over a leading axis are slower)."""
    top = values[0].copy()
    second = np.full_like(top, -np.inf)
    best = np.zeros(top.shape, np.uint8 if len(values) <= 256 else np.int32)
    for c in range(1, len(values)):
        v = values[c]
        np.maximum(second, np.minimum(v, top), out=second)
        np.putmask(best, v > top, c)
        np.maximum(top, v, out=top)
    return best, top, second


def _direct_argmax(logits: torch.Tensor, size: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    from dcfm.model import upsample_logits

    up = upsample_logits(logits[None], size)[0]
    return _first_argmax(up[None])[0].numpy().astype(dtype, copy=False)


def _first_argmax(block: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 (first index wins ties, as torch.argmax): a running max over the classes is
    several times faster than torch's reduction over a non-innermost dimension."""
    best = block[:, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.uint8 if block.shape[1] <= 256 else torch.int32)
    for c in range(1, block.shape[1]):
        better = block[:, c] > best
        best = torch.maximum(best, block[:, c])
        index.masked_fill_(better, c)
    return index
