"""Frame-accurate chunked decoding by URI: probe a video once, then decode any [start, stop) range of it.

A Ray job probes each video (cheap: packets only), splits ``range(probe.frame_count)`` into chunks and
hands each actor ``decode_range(uri, probe, start, stop)``. Frame identity is the presentation timestamp:
frame i of a video is the i-th frame a full sequential decode yields, and ``probe.pts[i]`` is its pts, so
every chunk decodes exactly its frames, with the same pixels as a sequential decode, whatever the GOP
structure (B-frames, open GOPs) or frame rate (VFR).

Timestamps are ``pts * time_base`` as the container reports them (``stream.start_time`` is NOT
subtracted), i.e. what ``frame.time`` says in a sequential decode: 0.0 for frame 0 of a typical MP4, but
e.g. 1.4 s for an MPEG-TS whose clock starts there.

Every failure on bad input (missing, empty, truncated, not a video, undecodable) is a ``VideoError``
carrying the URI and the stage, so a caller can record it and go on with the next video. A cut-short
file fails at "open" if it is an MP4 whose index (moov) sits at the end (FFmpeg's default), and at
"probe" ("truncated: ...") if the index is up front (faststart), since the packets fall short of it.
Formats without a frame index (MKV/WebM, MXF, MPEG-TS) cannot tell a cut file from a short one: probe and
decode_range then agree on the frames that are there, and the probe's ``warning`` says when the file looks
cut short — Matroska and MXF declare their duration up front, and an MPEG-TS file cut mid-packet ends in a
partial transport packet.

The probe reads packets only, so it costs about a read of the file (the whole object, for s3://) but no
decoding. It falls back to decoding every frame where packets do not map one-to-one to displayed frames:
codecs outside ``_ONE_FRAME_PER_PACKET``, packets without or with repeated pts, or a decoder whose first
frame is not the first packet's (a stream cut mid-GOP).
"""

from __future__ import annotations

import bisect

import bisect
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np

Stage = Literal["open", "probe", "decode"]

# Codecs for which one demuxed packet is exactly one displayed frame, so packet pts == decoded frame pts.
# Others (VP8 alt-ref frames, MPEG-4 part 2 "packed B-frames" in AVI, ...) can hide or pack frames;
# for those the probe decodes everything instead.
_ONE_FRAME_PER_PACKET = frozenset(
    {"h264", "hevc", "av1", "vp9", "mpeg2video", "mjpeg", "prores", "dnxhd", "ffv1", "png", "rawvideo"}
)
# Seeks tried (at successively earlier keyframes) before decoding the chunk from the start of the file.
_MAX_SEEKS = 2
# Area averaging is the antialiased choice for the downscaling this is used for; upscaling is bilinear.
_INTERPOLATION = "AREA"
_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError)


class VideoError(Exception):
    """A video that cannot be opened, probed or decoded; ``str()`` names the input and the fix."""

    def __init__(self, uri: str, stage: Stage, reason: str) -> None:
        super().__init__(uri, stage, reason)  # all three in args, so it pickles across Ray workers
        self.uri = uri
        self.stage: Stage = stage
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"


@dataclass(frozen=True)
class VideoProbe:
    """What ``decode_range`` needs to know about a video, in display order.

    ``pts[i]`` is the presentation timestamp (in ``time_base`` units) of frame i, exactly as a full
    sequential decode reports it; ``keyframes`` are the display indices of the frames the demuxer marks
    as seek points.
    """

    uri: str
    frame_count: int
    pts: tuple[int, ...]
    time_base: Fraction
    fps: float
    duration_s: float
    codec: str
    width: int
    height: int
    keyframes: tuple[int, ...] = field(default=(), repr=False)
    # pts[0] is frame first_index's: a window of the whole probe (see `window`), so a chunk of a long
    # video carries what its decode reads, not every frame's pts.
    first_index: int = 0
    # Set when the frames fall short of what the container declares (a file cut short); they are still
    # all decodable, so the video is segmented, and the note travels to its videos/ row.
    warning: str | None = None

    def pts_of(self, index: int) -> int:
        """The pts of frame ``index`` (a display index of the whole video)."""
        return self.pts[index - self.first_index]

    def timestamp_s(self, index: int) -> float:
        """Presentation time of frame ``index`` in seconds (``pts * time_base``, no start-time shift)."""
        return float(self.pts_of(index) * self.time_base)

    def index_of(self, pts: int | None) -> int | None:
        """Display index of the frame with this pts, or None if the probe has no such frame.

        In a window, a pts before the window's first frame maps to ``first_index - 1``: a frame decoded
        on the way to the window (pre-roll), never emitted.
        """
        if pts is None:
            return None
        i = bisect.bisect_left(self.pts, pts)
        if i < len(self.pts) and self.pts[i] == pts:
            return i + self.first_index
        return self.first_index - 1 if i == 0 and self.first_index > 0 else None

    def window(self, start: int, stop: int) -> VideoProbe:
        """The part of this probe that ``decode_range(uri, ..., start, stop)`` reads: frames from the
        earliest seek point it may try up to ``stop``."""
        if not 0 <= start <= stop <= self.frame_count:
            raise ValueError(f"bad range [{start}, {stop}) for {self.frame_count} frames of {self.uri}")
        seeks = _seek_points(self, start)
        lo = min(seeks) if seeks else self.first_index
        return replace(
            self, pts=self.pts[lo - self.first_index:stop - self.first_index], first_index=lo,
            keyframes=tuple(k for k in self.keyframes if lo <= k < stop),
        )


def _seek_points(probe: VideoProbe, start: int) -> list[int]:
    """Display indices of the keyframes decoding of frame ``start`` may start from, latest first."""
    return [k for k in reversed(probe.keyframes) if 0 < k <= start][:_MAX_SEEKS]


def seek_start(probe: VideoProbe, start: int) -> int:
    """The frame ``decode_range(..., start, ...)`` starts decoding from: the latest seek point at or before
    ``start``, or 0 (the top of the file) if there is none."""
    # A bisection, not _seek_points: planners ask this for every candidate chunk start of long videos.
    i = bisect.bisect_right(probe.keyframes, start)
    return probe.keyframes[i - 1] if i else 0


@dataclass
class DecodedFrame:
    """One decoded frame: display index in the whole video, pts, time in seconds, RGB (H, W, 3) uint8."""

    index: int
    pts: int
    timestamp_s: float
    rgb: np.ndarray


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


def _size_or_none(uri: str) -> int | None:
    try:
        path = _local_path(uri)
        if path is not None:
            return os.path.getsize(path)
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(uri)
        return int(fs.size(fs_path))
    except Exception:
        return None


@contextmanager
def open_input(uri: str) -> Iterator[av.container.InputContainer]:
    """Open a local path or any fsspec URI (``s3://`` uses the standard AWS chain) as a PyAV container.

    Raises ``VideoError(stage="open")`` for a missing, empty or unreadable input.
    """
    path = _local_path(uri)
    with ExitStack() as stack:  # closes the container before the file object it reads from
        try:
            if path is not None:
                container = av.open(path)
            else:
                import fsspec  # only remote inputs need it

                fobj = stack.enter_context(fsspec.open(uri, "rb"))
                container = av.open(fobj)  # PyAV reads and seeks through the file object
        except Exception as exc:
            if _size_or_none(uri) == 0:
                raise VideoError(uri, "open", "zero-byte file; re-export or remove it from the input list") from exc
            hint = "check the path and credentials" if isinstance(exc, (OSError, ImportError)) else (
                "truncated upload or not a video file (an MP4 whose index is at the end fails here when "
                "cut short); re-export or remove it from the input list")
            raise VideoError(uri, "open", f"cannot open: {_describe(exc)}; {hint}") from exc
        stack.enter_context(container)
        yield container


def _video_stream(container: av.container.InputContainer, uri: str) -> av.VideoStream:
    # Cover art in an audio file is a one-frame "video" stream flagged attached_pic; it is not a video.
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["no streams"]
    raise VideoError(uri, "probe", f"not a video: no video stream (audio only?); found {', '.join(kinds)}; "
                                   "remove it from the input list")


def frame_to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a decoded frame, resized by swscale to ``size = (height, width)`` if given."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    height, width = size
    small = frame.reformat(width=width, height=height, format="rgb24", interpolation=_INTERPOLATION)
    return small.to_ndarray()


def probe_video(uri: str) -> VideoProbe:
    """Frame count and every frame's pts in display order, from the packets alone (no decoding)
    where the codec allows it, else from a full decode. Raises ``VideoError`` for bad inputs."""
    with open_input(uri) as container:
        stream = _video_stream(container, uri)
        codec = stream.codec_context.codec.canonical_name  # "av1", not the decoder ("libdav1d")
        entries: list[tuple[int | None, bool, int]] = []  # (pts, keyframe, duration) in file order
        first_out: list[int | None] = []  # pts of the first decoded frame: catches dropped leading frames
        decode_error: Exception | None = None
        last_corrupt = False
        demuxed = 0  # including pre-roll, which the container's frame count includes too
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packets PyAV appends at the end
                    continue
                demuxed += 1
                last_corrupt = packet.is_corrupt
                # An MP4 edit list that starts after the first keyframe (a stream-copy trim) marks the
                # frames before its start as discard: the decoder decodes them but never outputs them.
                if not packet.is_discard:
                    entries.append((packet.pts, packet.is_keyframe, packet.duration or 0))
                if not first_out and decode_error is None:
                    try:
                        first_out.extend(f.pts for f in packet.decode())
                    except av.error.FFmpegError as exc:
                        decode_error = exc
            if not first_out and decode_error is None and entries:
                try:
                    first_out.extend(f.pts for f in stream.codec_context.decode(None))  # drain reordering
                except av.error.FFmpegError as exc:
                    decode_error = exc
        except _AV_ERRORS as exc:
            raise VideoError(uri, "probe", f"cannot read packets: {_describe(exc)}; the file is corrupt, "
                                           "re-export it") from exc
        declared = _declared_extent(container, stream)
        expected = stream.frames  # from the container's index (MP4/MOV); 0 when the format has none
        if expected and (demuxed < expected or last_corrupt):
            got = demuxed - int(last_corrupt)
            raise VideoError(uri, "probe", f"truncated: container ended after {got} of {expected} expected "
                                           "frames; re-upload or re-export it")
        if decode_error is not None:
            raise VideoError(uri, "probe", f"cannot decode the first frame: {_describe(decode_error)}; "
                                           "re-export it") from decode_error
        time_base = stream.time_base or Fraction(1, 1)
        dims = (stream.codec_context.width, stream.codec_context.height)
        avg_rate = stream.average_rate
    pts = [p for p, _, _ in entries]
    if codec in _ONE_FRAME_PER_PACKET and None not in pts and len(set(pts)) == len(pts):
        known = cast("list[int]", pts)
        # The first frame out of the decoder must be the first one announced; if not, the decoder drops
        # frames (e.g. open-GOP leading B-frames of a stream cut mid-GOP) and only a full decode can tell.
        if not known or (first_out and first_out[0] == min(known)):
            order = sorted(range(len(known)), key=known.__getitem__)
            keyframes = tuple(rank for rank, i in enumerate(order) if entries[i][1])
            last_duration = entries[order[-1]][2] if order else 0
            probe = _make_probe(uri, [known[i] for i in order], keyframes, last_duration, time_base, avg_rate,
                                codec, *dims)
            return replace(probe, warning=declared.shortfall(probe))
    probe = _probe_by_decoding(uri)
    return replace(probe, warning=declared.shortfall(probe))


# Containers whose duration is a header field written by the muxer (Matroska/WebM segment info, MXF
# descriptors), so it survives a cut. Elsewhere FFmpeg estimates it from the last timestamps in the file (MPEG
# program and transport streams), which follow the cut and prove nothing.
_DECLARED_DURATION_FORMATS = ("matroska", "webm", "mxf")
# MPEG-TS packet sizes: plain, M2TS/AVCHD (4-byte timecode prefix), with Reed-Solomon parity.
_TS_PACKET_SIZES = (188, 192, 204)
# Shortfalls below this many seconds (or two frames) are rounding between the container's and the stream's
# clocks, not a cut.
_SHORTFALL_TOLERANCE_S = 0.5


@dataclass(frozen=True)
class _DeclaredExtent:
    """What a container says about its own length, besides the frames it holds."""

    format: str
    duration_s: float | None  # the video stream's declared duration, where the format declares one
    size: int  # bytes; 0 if unknown

    def shortfall(self, probe: VideoProbe) -> str | None:
        """A warning when the probed frames fall short of the declared length, else None."""
        if self.duration_s is not None and probe.frame_count:
            frame = 1 / probe.fps if probe.fps else 0.0
            missing = self.duration_s - probe.duration_s
            if missing > max(_SHORTFALL_TOLERANCE_S, 2 * frame):
                return (f"cut short: the {self.format} container declares {self.duration_s:.2f}s of video but its "
                        f"{probe.frame_count} frames cover {probe.duration_s:.2f}s; the frames present were "
                        "segmented; re-export or re-upload the file for the rest")
        if self.format == "mpegts" and self.size and all(self.size % n for n in _TS_PACKET_SIZES):
            return (f"cut short: {self.size} bytes is not a whole number of MPEG-TS packets (188, 192 or 204 "
                    f"bytes), so the file ends mid-packet; its {probe.frame_count} frames were segmented; "
                    "re-export or re-upload the file for the rest")
        return None


def _declared_extent(container: av.container.InputContainer, stream: av.VideoStream) -> _DeclaredExtent:
    names = container.format.name.split(",")
    kind = next((n for n in names if n in _DECLARED_DURATION_FORMATS or n == "mpegts"), names[0])
    duration = None
    if kind in _DECLARED_DURATION_FORMATS:
        if stream.duration and stream.time_base:  # MXF: the track's own duration
            duration = float(stream.duration * stream.time_base)
        elif "DURATION" in stream.metadata:  # Matroska: the track's DURATION tag (HH:MM:SS.nnnnnnnnn)
            duration = _clock_seconds(stream.metadata["DURATION"])
        elif container.duration and len(container.streams) == 1:  # the segment's, when it is the only track
            duration = container.duration / av.time_base
    try:
        size = int(container.size or 0)
    except Exception:  # a source that cannot tell its size
        size = 0
    return _DeclaredExtent(kind, duration, size)


def _clock_seconds(text: str) -> float | None:
    try:
        hours, minutes, seconds = text.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _probe_by_decoding(uri: str) -> VideoProbe:
    """The exact but slow probe: decode every frame and record its pts."""
    with open_input(uri) as container:
        stream = _video_stream(container, uri)
        stream.thread_type = "AUTO"
        pts: list[int] = []
        keyframes: list[int] = []
        last_duration = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise VideoError(uri, "probe", "frames without timestamps; remux it, e.g. "
                                                   "`ffmpeg -fflags +genpts -i IN -c copy OUT.mp4`")
                if frame.key_frame:
                    keyframes.append(len(pts))
                pts.append(frame.pts)
                last_duration = frame.duration or 0
        except _AV_ERRORS as exc:
            raise VideoError(uri, "probe", f"cannot decode: {_describe(exc)}; the file is corrupt or "
                                           "truncated, re-export it") from exc
        if any(b <= a for a, b in zip(pts, pts[1:])):
            raise VideoError(uri, "probe", "decoded timestamps are not strictly increasing; remux it, e.g. "
                                           "`ffmpeg -fflags +genpts -i IN -c copy OUT.mp4`")
        cc = stream.codec_context
        return _make_probe(uri, pts, tuple(keyframes), last_duration, stream.time_base or Fraction(1, 1),
                           stream.average_rate, cc.codec.canonical_name, cc.width, cc.height)


def _make_probe(uri: str, pts: list[int], keyframes: tuple[int, ...], last_duration: int,
                time_base: Fraction, avg_rate: Fraction | None, codec: str, width: int, height: int) -> VideoProbe:
    n = len(pts)
    span = (pts[-1] - pts[0]) * time_base if n else Fraction(0)
    if n >= 2 and span > 0:
        fps = float((n - 1) / span)  # frames per second over the displayed span: right for VFR too
    else:
        fps = float(avg_rate) if avg_rate else 0.0
    if not last_duration and n:
        last_duration = round(1 / (fps * time_base)) if fps else 0
    duration_s = float(span + last_duration * time_base) if n else 0.0
    return VideoProbe(uri=uri, frame_count=n, pts=tuple(pts), time_base=Fraction(time_base), fps=fps,
                      duration_s=duration_s, codec=codec, width=width, height=height, keyframes=keyframes)


def decode_range(uri: str, probe: VideoProbe, start: int, stop: int,
                 size: tuple[int, int] | None = None, threads: int = 0) -> Iterator[DecodedFrame]:
    """Yield frames ``start <= index < stop`` (display order) of ``uri``, frame-accurately, one at a time.

    Seeks to a keyframe at or before frame ``start`` and decodes forward; ``size = (height, width)``
    resizes with swscale (area averaging) before the frame leaves. ``threads``: the decoder's threads (0: FFmpeg
    picks, one per core; a Ray actor passes the CPUs it reserved so it does not use the node's). Raises
    ``VideoError(stage="decode")`` if the decoder's frames disagree with the probe (truncated or corrupt file).
    """
    if not 0 <= start <= stop <= probe.frame_count:  # checked now, not at the first next()
        raise ValueError(f"bad range [{start}, {stop}) for {probe.frame_count} frames of {uri}")
    return _decode_range(uri, probe, start, stop, size, threads)


def _decode_range(uri: str, probe: VideoProbe, start: int, stop: int,
                  size: tuple[int, int] | None, threads: int) -> Iterator[DecodedFrame]:
    if start == stop:
        return
    target = probe.pts_of(start)
    # Seek to the keyframe's own pts rather than the target: demuxers (MP4 among them) pick the seek point
    # by decode timestamp, which can land on a later keyframe whose B-frames display before the target.
    seeks = [probe.pts_of(k) for k in _seek_points(probe, start)]
    if seeks:
        with open_input(uri) as container:
            stream = _video_stream(container, uri)
            _set_threads(stream, threads)
            for seek_pts in seeks:
                frames = _start_at(container, stream, seek_pts, target)
                if frames is not None:
                    yield from _emit(uri, probe, start, stop, size, frames)
                    return
    with open_input(uri) as container:  # no usable seek: decode from the top, as a sequential read does
        stream = _video_stream(container, uri)
        _set_threads(stream, threads)
        yield from _emit(uri, probe, start, stop, size, container.decode(stream))


def _set_threads(stream: av.VideoStream, threads: int) -> None:
    if threads == 1:
        stream.thread_type = "NONE"  # one frame at a time on the caller's thread: no FFmpeg worker threads
        stream.codec_context.thread_count = 1
    else:
        stream.thread_type = "AUTO"  # frame threads too: an actor decodes one stream at a time
        stream.codec_context.thread_count = threads


def _start_at(container: av.container.InputContainer, stream: av.VideoStream, seek_pts: int,
              target: int) -> Iterator[av.VideoFrame] | None:
    """Seek near ``seek_pts``; the decoded frames from there, or None if decoding cannot start there."""
    frames = None
    try:
        container.seek(seek_pts, stream=stream, backward=True)
        frames = container.decode(stream)
        first = next(frames, None)
    except _AV_ERRORS:
        first = None  # a failed seek is not a bad file: the caller falls back to decoding from the top
    # Usable only if decoding restarts at a keyframe at or before the target; otherwise (landed too late,
    # as MPEG-TS seeks by byte bisection do, or on a frame the decoder cannot start from) go earlier.
    if first is None or not first.key_frame or first.pts is None or first.pts > target:
        if frames is not None:
            frames.close()
        return None
    return _chain(first, frames)


def _emit(uri: str, probe: VideoProbe, start: int, stop: int, size: tuple[int, int] | None,
          frames: Iterable[av.VideoFrame]) -> Iterator[DecodedFrame]:
    """Check decoded frames against the probe and yield those in [start, stop)."""
    expected = start
    try:
        for frame in frames:
            index = probe.index_of(frame.pts)
            if index is None:
                raise VideoError(uri, "decode", f"decoder produced a frame at pts {frame.pts} that the probe "
                                                "did not list; the file is corrupt, re-export it")
            if index < expected:
                if index >= start:
                    raise VideoError(uri, "decode", f"frame {index} decoded twice; the file is corrupt, "
                                                    "re-export it")
                continue  # pre-roll from the keyframe up to the chunk
            if index > expected:
                raise VideoError(uri, "decode", f"frame {expected} (pts {probe.pts_of(expected)}) is missing "
                                                "from the decoded stream; the file is corrupt, re-export it")
            yield DecodedFrame(index, frame.pts, probe.timestamp_s(index), frame_to_rgb(frame, size))
            expected += 1
            if expected == stop:
                return
    except _AV_ERRORS as exc:
        raise VideoError(uri, "decode", f"cannot decode frame {expected}: {_describe(exc)}; the file is "
                                        "corrupt or truncated, re-export it") from exc
    raise VideoError(uri, "decode", f"truncated: decoding ended after {expected} of {probe.frame_count} "
                                    "expected frames; re-upload or re-export it")


def _chain(first: av.VideoFrame, rest: Iterable[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield every frame of the first video stream as RGB uint8 (H, W, 3), in the order the decoder
    returns them (presentation order); the n-th yielded frame is frame index n everywhere in dcfm."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # frame threading would only add latency to a sequential read
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def read_frames(path: str | Path, indices: Sequence[int]) -> list[np.ndarray]:
    """Return the frames at the given decode-order indices (in the order requested).

    Decodes sequentially up to the largest index, which is exact (no seeking to keyframes).
    Raises IndexError if an index is past the end of the video.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return []
    if wanted[0] < 0:
        raise IndexError(f"negative frame index {wanted[0]}")
    found: dict[int, np.ndarray] = {}
    last = wanted[-1]
    targets = set(wanted)
    with closing(iter_frames(path)) as frames:  # closes the container when we stop early
        for i, frame in enumerate(frames):
            if i in targets:
                found[i] = frame
            if i >= last:
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise IndexError(f"{path}: frame(s) {missing} past the end of the video")
    return [found[int(i)] for i in indices]
