"""dcfm.decode: probe by packets, frame-accurate chunked decode, and VideoError for bad inputs."""

from __future__ import annotations

import dataclasses
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from dcfm.decode import VideoError, VideoProbe, decode_range, frame_to_rgb, probe_video
from tests.videos import frame_level, vfr_pts_ms, write_audio_only, write_test_video

H, W = 64, 96
N = 40
SMALL = (32, 48)  # (height, width) for the resize path


def _write(path: Path, n: int, **kwargs) -> Path:
    return write_test_video(path, n, (H, W), **kwargs)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    ms = Fraction(1, 1000)
    return {
        "bframes": _write(d / "bframes.mp4", N),
        "open_gop": _write(d / "open_gop.mp4", N, gop=8, open_gop=True),
        "vfr": _write(d / "vfr.mp4", N, pts=vfr_pts_ms(N), time_base=ms),
        "vfr_mkv": _write(d / "vfr.mkv", N, fmt="matroska", pts=vfr_pts_ms(N), time_base=ms),
        "short": _write(d / "short.mp4", 3),
        # MPEG-4 part 2 is not on the one-frame-per-packet list, so this exercises the decode-pass probe.
        "mpeg4_avi": _write(d / "mpeg4.avi", 30, fmt="avi", codec="mpeg4", gop=10),
    }


ALL = ["bframes", "open_gop", "vfr", "vfr_mkv", "short", "mpeg4_avi"]


def _sequential(path: Path, size: tuple[int, int] | None = None) -> list[tuple[int, float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(f.pts, f.time, frame_to_rgb(f, size)) for f in container.decode(video=0)]


def test_test_video_really_has_b_frames(videos: dict[str, Path]) -> None:
    with av.open(str(videos["bframes"])) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    with av.open(str(videos["bframes"])) as container:
        kinds = [PictureType(f.pict_type) for f in container.decode(video=0)]  # an int in PyAV >= 16
    assert PictureType.B in kinds and kinds[0] == PictureType.I
    pts_in_file_order = [p.pts for p in packets]
    assert pts_in_file_order != sorted(pts_in_file_order)  # decode order differs from display order


@pytest.mark.parametrize("name", ALL)
def test_probe_equals_sequential_decode(videos: dict[str, Path], name: str) -> None:
    path = videos[name]
    probe = probe_video(str(path))
    seq = _sequential(path)
    assert probe.uri == str(path) and probe.frame_count == len(seq) == len(probe.pts)
    assert list(probe.pts) == [pts for pts, _, _ in seq]
    assert [probe.timestamp_s(i) for i in range(probe.frame_count)] == pytest.approx([t for _, t, _ in seq])
    assert (probe.width, probe.height) == (W, H) and probe.keyframes[0] == 0
    assert probe.codec == ("mpeg4" if name == "mpeg4_avi" else "h264")
    assert probe.duration_s > 0 and probe.fps > 0
    # the content says which frame it is: frame i is the i-th one written
    for i, (_, _, rgb) in enumerate(seq):
        assert abs(float(np.median(rgb[..., 1])) - frame_level(i)) <= 3, (name, i)


def test_cfr_and_vfr_timing(videos: dict[str, Path]) -> None:
    cfr = probe_video(str(videos["bframes"]))
    assert cfr.fps == pytest.approx(25.0) and cfr.duration_s == pytest.approx(N / 25)
    assert cfr.timestamp_s(0) == 0.0 and cfr.timestamp_s(N - 1) == pytest.approx((N - 1) / 25)
    expected = [t / 1000 for t in vfr_pts_ms(N)]
    for name in ("vfr", "vfr_mkv"):
        vfr = probe_video(str(videos[name]))
        assert [vfr.timestamp_s(i) for i in range(N)] == pytest.approx(expected, abs=1e-9), name
        assert vfr.fps == pytest.approx((N - 1) / expected[-1])


def _assert_chunks_match(path: Path, size: tuple[int, int] | None) -> None:
    """Chunks decoded one by one, with the whole probe or with the chunk's window of it (what a segment
    job's chunk task carries), concatenate to the sequential decode."""
    probe = probe_video(str(path))
    seq = _sequential(path, size)
    for chunk, windowed in ((1, False), (7, False), (7, True), (16, True), (64, False)):
        bounds = [(start, min(start + chunk, probe.frame_count)) for start in range(0, probe.frame_count, chunk)]
        got = [f for start, stop in bounds
               for f in decode_range(str(path), probe.window(start, stop) if windowed else probe, start, stop, size)]
        assert [f.index for f in got] == list(range(probe.frame_count)), (path.name, chunk)
        assert [f.pts for f in got] == [pts for pts, _, _ in seq]
        assert [f.timestamp_s for f in got] == pytest.approx([t for _, t, _ in seq])
        for f, (_, _, rgb) in zip(got, seq):
            assert f.rgb.dtype == np.uint8 and f.rgb.shape == ((H, W) if size is None else size) + (3,)
            assert np.array_equal(f.rgb, rgb), (path.name, chunk, f.index)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [None, SMALL], ids=["full", "resized"])
def test_chunks_concatenate_to_the_sequential_decode(videos: dict[str, Path], name: str,
                                                     size: tuple[int, int] | None) -> None:
    _assert_chunks_match(videos[name], size)


def test_mp4_trimmed_by_edit_list(tmp_path: Path) -> None:
    """Frames before the edit list's start (pts < 0 here) are demuxed but never displayed: not frames."""
    path = _write(tmp_path / "trimmed.mp4", N, pts=[i - 5 for i in range(N)])
    probe = probe_video(str(path))
    seq = _sequential(path)
    assert probe.frame_count == len(seq) == N - 5 and list(probe.pts) == [pts for pts, _, _ in seq]
    assert 0 not in probe.keyframes  # the GOP's keyframe is in the pre-roll: chunk 0 decodes from the top
    assert abs(float(np.median(seq[0][2][..., 1])) - frame_level(5)) <= 3
    _assert_chunks_match(path, SMALL)


def test_one_decoder_thread_starts_no_threads(videos: dict[str, Path]) -> None:
    """A Ray actor that reserved one CPU decodes on its own thread: FFmpeg starts no workers beside it."""
    import os

    uri = str(videos["bframes"])
    probe = probe_video(uri)

    def ffmpeg_threads(threads: int) -> int:  # FFmpeg names its decoder threads av:<codec>:...
        def now() -> int:
            tasks = Path("/proc/self/task")
            return sum((tasks / t / "comm").read_text().startswith("av:") for t in os.listdir(tasks))

        return max(now() for _ in decode_range(uri, probe, 0, N, threads=threads))

    assert ffmpeg_threads(1) == 0
    assert ffmpeg_threads(2) > 0  # the count is not blind to them
    assert [f.index for f in decode_range(uri, probe, 7, 19, threads=1)] == list(range(7, 19))


def test_range_edges(videos: dict[str, Path]) -> None:
    uri = str(videos["bframes"])
    probe = probe_video(uri)
    assert list(decode_range(uri, probe, 5, 5)) == []
    assert [f.index for f in decode_range(uri, probe, 13, 14)] == [13]  # the B-frame after a keyframe
    assert [f.index for f in decode_range(uri, probe, N - 1, N)] == [N - 1]
    frames = decode_range(uri, probe, 20, N)
    assert next(frames).index == 20
    frames.close()  # stopping early closes the container; nothing else to see
    for start, stop in [(-1, 3), (3, 2), (0, N + 1)]:
        with pytest.raises(ValueError):
            decode_range(uri, probe, start, stop)


def test_a_window_holds_only_what_its_chunk_decodes(videos: dict[str, Path]) -> None:
    probe = probe_video(str(videos["bframes"]))
    assert len(probe.keyframes) >= 3
    start = probe.keyframes[-1] + 1
    window = probe.window(start, N)
    assert window.first_index == probe.keyframes[-2]  # the earliest of the two seek points tried
    assert window.pts == probe.pts[window.first_index:] and window.keyframes == probe.keyframes[-2:]
    assert [window.timestamp_s(i) for i in range(start, N)] == [probe.timestamp_s(i) for i in range(start, N)]
    assert window.index_of(probe.pts[0]) == window.first_index - 1  # before the window: pre-roll
    with pytest.raises(ValueError):
        probe.window(3, N + 1)


def test_decoder_disagreeing_with_probe_is_a_decode_error(videos: dict[str, Path]) -> None:
    uri = str(videos["bframes"])
    probe = probe_video(uri)
    longer = dataclasses.replace(probe, frame_count=N + 1, pts=probe.pts + (probe.pts[-1] + 512,))
    with pytest.raises(VideoError, match=r"truncated: decoding ended after 40 of 41") as err:
        list(decode_range(uri, longer, 36, N + 1))
    assert err.value.stage == "decode" and err.value.uri == uri
    gap = dataclasses.replace(probe, pts=probe.pts[:10] + tuple(p + 1 for p in probe.pts[10:]))
    with pytest.raises(VideoError, match="did not list") as err:
        list(decode_range(uri, gap, 0, 20))
    assert err.value.stage == "decode"
    extra = dataclasses.replace(probe, frame_count=N + 1, pts=tuple(sorted(probe.pts + (probe.pts[5] + 1,))))
    with pytest.raises(VideoError, match="frame 6 .* is missing"):
        list(decode_range(uri, extra, 0, 10))


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_bad_inputs_raise_video_error(tmp_path: Path, videos: dict[str, Path]) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
    cases = {
        # (path, stage, words in the message)
        "empty": (tmp_path / "empty.mp4", "open", "zero-byte file; re-export or remove"),
        "missing": (tmp_path / "missing.mp4", "open", "cannot open: FileNotFoundError"),
        "text": (tmp_path / "notes.mp4", "open", "cannot open: InvalidDataError"),
        "audio": (write_audio_only(tmp_path / "audio.mp4"), "probe", "not a video: no video stream (audio only?)"),
        # the MP4 muxer writes the index (moov) last, so a cut-short plain MP4 cannot even be opened ...
        "truncated": (_cut(videos["bframes"], tmp_path / "cut.mp4", 0.6), "open", "truncated upload"),
        # ... while with the index up front the probe sees frames missing against it
        "truncated_faststart": (_cut(_write(tmp_path / "fs.mp4", N, faststart=True), tmp_path / "cut_fs.mp4", 0.6),
                                "probe", "truncated: container ended after"),
    }
    for name, (path, stage, words) in cases.items():
        with pytest.raises(VideoError) as err:
            probe_video(str(path))
        e = err.value
        assert (e.stage, e.uri) == (stage, str(path)), name
        assert str(e).startswith(f"{path}: ") and words in str(e), (name, str(e))
        assert not isinstance(e.__cause__, VideoError)
    with pytest.raises(VideoError, match=r"of 40 expected frames"):
        probe_video(str(tmp_path / "cut_fs.mp4"))
    probe = probe_video(str(videos["bframes"]))  # a good probe, a file that has gone bad since
    for path in (tmp_path / "missing.mp4", tmp_path / "cut.mp4"):
        with pytest.raises(VideoError) as err:
            list(decode_range(str(path), probe, 8, 16))
        assert err.value.stage == "open"


def test_truncated_matroska_gives_fewer_frames_consistently(tmp_path: Path, videos: dict[str, Path]) -> None:
    """Without a frame index (MKV, TS) a cut file is a shorter video: probe and decode agree on it."""
    cut = str(_cut(videos["vfr_mkv"], tmp_path / "cut.mkv", 0.6))
    probe = probe_video(cut)
    assert 0 < probe.frame_count < N
    assert list(probe.pts) == [pts for pts, _, _ in _sequential(Path(cut))]
    got = [f.index for s in range(0, probe.frame_count, 7)
           for f in decode_range(cut, probe, s, min(s + 7, probe.frame_count))]
    assert got == list(range(probe.frame_count))


def test_stream_cut_mid_gop_is_probed_by_decoding(tmp_path: Path) -> None:
    """An MPEG-TS cut at the head starts with frames the decoder drops (no keyframe before them), so the
    packets over-count; the probe notices (first decoded frame != first packet) and decodes instead."""
    whole = _write(tmp_path / "whole.ts", N, fmt="mpegts")
    data = whole.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[int(len(data) * 0.45) // 188 * 188:])  # whole TS packets, from mid-GOP
    with av.open(str(cut)) as container:
        packets = sum(1 for p in container.demux(video=0) if p.size)
    probe = probe_video(str(cut))
    seq = _sequential(cut)
    assert 0 < probe.frame_count == len(seq) < packets
    assert list(probe.pts) == [pts for pts, _, _ in seq]
    _assert_chunks_match(cut, None)


def test_raw_h264_without_timestamps_is_a_probe_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "raw.h264", 5, fmt="h264")
    with pytest.raises(VideoError, match="without timestamps") as err:
        probe_video(str(path))
    assert err.value.stage == "probe"


def test_video_error_pickles_and_is_reexported() -> None:
    e = pickle.loads(pickle.dumps(VideoError("s3://b/x.mp4", "decode", "boom; re-export it")))
    assert (e.uri, e.stage, e.reason, str(e)) == ("s3://b/x.mp4", "decode", "boom; re-export it",
                                                  "s3://b/x.mp4: boom; re-export it")


def _same_as_local(uri: str, local: Path) -> None:
    probe, local_probe = probe_video(uri), probe_video(str(local))
    assert isinstance(probe, VideoProbe) and probe.uri == uri
    assert dataclasses.replace(probe, uri=str(local)) == local_probe
    remote = list(decode_range(uri, probe, 13, 30, SMALL))
    here = list(decode_range(str(local), local_probe, 13, 30, SMALL))
    assert [f.index for f in remote] == list(range(13, 30))
    assert all(np.array_equal(a.rgb, b.rgb) and a.pts == b.pts for a, b in zip(remote, here))


def test_fsspec_uri(videos: dict[str, Path]) -> None:
    import fsspec

    uri = "memory://dcfm-test-video/bframes.mp4"
    with fsspec.open(uri, "wb") as f:
        f.write(videos["bframes"].read_bytes())
    try:
        _same_as_local(uri, videos["bframes"])
        with pytest.raises(VideoError) as err:
            probe_video("memory://dcfm-test-video/missing.mp4")
        assert err.value.stage == "open" and "FileNotFoundError" in str(err.value)
    finally:
        fsspec.filesystem("memory").rm("/dcfm-test-video", recursive=True)


def test_s3_uri(s3_env: str, videos: dict[str, Path]) -> None:
    import fsspec

    uri = f"{s3_env}/clips/vfr.mp4"
    with fsspec.open(uri, "wb") as f:
        f.write(videos["vfr"].read_bytes())
    _same_as_local(uri, videos["vfr"])
