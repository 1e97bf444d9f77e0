"""Byte-deterministic H.264 encoding of RGB frames (what ``dcfm synth`` writes; decoding is dcfm.decode)."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# x264 is deterministic for a fixed build when it runs single-threaded (sliced/frame threads
# reorder rate-control decisions), and the muxer stops writing version strings and wall-clock
# times under the bitexact flags, so two runs with the same frames give the same bytes.
# Except at widths that are not a multiple of 32: there the x264 build PyAV ships reads
# uninitialised padding in its lookahead (valgrind shows it at widths 48, 80, 112, 144; never at
# 64, 96, 128), so decisions, and bytes, can change from run to run. The video stays valid.
_X264_OPTIONS = {
    "preset": "veryfast",  # at these sizes files are barely bigger than with "medium", and 2x faster
    "threads": "1",
    "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:non-deterministic=0",
}


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar yuv420p laid out as PyAV wants it, shape (H * 3 // 2, W).

    Integer arithmetic, so the encoder's input (and hence the file) doesn't depend on which SIMD path
    swscale picks on a given CPU. Chroma is the 2x2 block mean.
    """
    h, w = rgb.shape[:2]
    x = rgb.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    blocks = x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]  # 4x the block mean
    r4, g4, b4 = blocks[..., 0], blocks[..., 1], blocks[..., 2]
    u = ((-38 * r4 - 74 * g4 + 112 * b4 + 512) >> 10) + 128
    v = ((112 * r4 - 94 * g4 - 18 * b4 + 512) >> 10) + 128
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = y
    # PyAV's yuv420p layout: the U plane then the V plane, each (H/2 x W/2), packed row-major below Y.
    out[h:].reshape(-1)[: (h // 2) * (w // 2)] = u.reshape(-1)
    out[h:].reshape(-1)[(h // 2) * (w // 2):] = v.reshape(-1)
    return out


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int, crf: int = 18,
                force_keyframes: Iterable[int] = (), keyint: int | None = None) -> int:
    """Encode RGB uint8 frames (H, W, 3; H and W even) as H.264 yuv420p MP4; return the frame count.

    ``force_keyframes``: frame indices encoded as I-frames (seek points), e.g. scene cuts, as footage edited
    from separately recorded clips has them. ``keyint``: at most this many frames from one seek point to the
    next (x264's default is 250).

    Output is byte-identical for identical input (single-threaded x264, bitexact muxing) when
    the width is a multiple of 32; see _X264_OPTIONS for why other widths may not be.
    """
    options = dict(_X264_OPTIONS, crf=str(int(crf)))
    if keyint is not None:
        options["g"] = str(int(keyint))
    forced = set(force_keyframes)
    count = 0
    with av.open(
        str(path),
        mode="w",
        format="mp4",
        container_options={"fflags": "+bitexact"},
    ) as container:
        stream: av.VideoStream | None = None
        for rgb in frames:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) uint8 frame, got shape {rgb.shape}")
            if stream is None:
                h, w = rgb.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
                stream = container.add_stream("libx264", rate=Fraction(int(fps), 1), options=options)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv420p"
                cc = stream.codec_context
                cc.thread_count = 1
                cc.flags |= av.codec.context.Flags.bitexact
                # Say what rgb_to_yuv420p produced, so players and decoders pick the same matrix.
                cc.colorspace = cc.color_primaries = cc.color_trc = 6  # AVCOL_*_SMPTE170M (BT.601)
                cc.color_range = 1  # AVCOL_RANGE_MPEG (limited, 16-235)
            elif rgb.shape[:2] != (stream.height, stream.width):
                raise ValueError(f"frame {count} has shape {rgb.shape}, expected {(stream.height, stream.width, 3)}")
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
            frame.pts = count
            if count in forced:
                frame.pict_type = av.video.frame.PictureType.I
            container.mux(stream.encode(frame))
            count += 1
        if stream is None:
            raise ValueError("write_video needs at least one frame")
        container.mux(stream.encode(None))
    return count
