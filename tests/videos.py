"""Test videos written with PyAV: B-frame H.264, variable frame rate, audio only.

Frame i is a flat grey of level ``frame_level(i)`` with a white bar at ``2i``, so a test can tell which
frame it decoded even after compression.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VFR_GAPS_MS = (33, 50, 17, 66, 33, 100, 20, 41)


def frame_level(i: int) -> int:
    return 20 + 5 * i  # gray level of frame i: the index survives compression as the frame's median


def frame_image(i: int, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    img = np.full((height, width, 3), frame_level(i) % 256, np.uint8)
    x = (2 * i) % (width - 4)
    img[:, x:x + 4] = 255  # a moving bar, so consecutive frames differ in structure too
    return img


def write_test_video(path: Path, n: int, size: tuple[int, int] = (64, 96), *, fmt: str = "mp4",
                     codec: str = "libx264", gop: int = 12, pts: list[int] | None = None,
                     time_base: Fraction = Fraction(1, 25), open_gop: bool = False, faststart: bool = False) -> Path:
    """Encode ``n`` frames; libx264 always uses B-frames (b-adapt off, scenecut off)."""
    if codec == "libx264":
        params = "b-adapt=0:scenecut=0" + (":open-gop=1" if open_gop else "")
        options = {"bf": "3", "g": str(gop), "preset": "veryfast", "threads": "1", "x264-params": params}
    else:
        options = {"bf": "2", "g": str(gop)}
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, container_options=container_options) as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i, size), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def vfr_pts_ms(n: int) -> list[int]:
    """Irregular presentation times in milliseconds."""
    out = [0]
    for i in range(n - 1):
        out.append(out[-1] + VFR_GAPS_MS[i % len(VFR_GAPS_MS)])
    return out


def write_bframe_video(path: Path, frames: int, size: tuple[int, int]) -> Path:
    return write_test_video(path, frames, size)


def write_vfr_video(path: Path, frames: int, size: tuple[int, int]) -> Path:
    return write_test_video(path, frames, size, pts=vfr_pts_ms(frames), time_base=Fraction(1, 1000))


def write_audio_only(path: Path) -> Path:
    """An MP4 with one AAC stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
