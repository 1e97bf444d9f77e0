"""Transient vs permanent failures (dcfm.faults) over the real exception types of botocore, s3fs, aiohttp,
PyAV, the OS and Ray, and the reads of a real (in-process) fsspec filesystem that fails mid-stream."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import ray.exceptions
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from s3fs.errors import translate_boto_error

from dcfm.decode import VideoError, decode_range, probe_video
from dcfm.errors import JobFailure
from dcfm.faults import Fault, OutputError, RetryPolicy, Side, TransientFailure, classify, on_output, preflight
from tests.videos import write_test_video

NO_WAIT = RetryPolicy(attempts=3, first_delay_s=0.0, max_delay_s=0.0)


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)


def wrapped(err: BaseException) -> VideoError:
    """A VideoError raised from ``err``, as dcfm.decode raises them."""
    try:
        try:
            raise err
        except BaseException as inner:
            raise VideoError("s3://b/clip.mp4", "open", f"cannot open: {inner}") from inner
    except VideoError as outer:
        return outer


@pytest.mark.parametrize("err", [
    client_error("SlowDown", 503),
    client_error("ServiceUnavailable", 503),
    client_error("InternalError", 500),
    client_error("TooManyRequests", 429),
    client_error("SomethingNew", 502),
    translate_boto_error(client_error("SlowDown", 503)),  # what s3fs raises: an OSError caused by it
    translate_boto_error(client_error("InternalError", 500)),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientPayloadError("payload"),
    TimeoutError("timed out"),
    ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    OSError(errno.ETIMEDOUT, "timed out"),
    av.error.HTTPServerError(errno.EIO, "503"),
    ray.exceptions.ActorDiedError(),
    ray.exceptions.WorkerCrashedError(),
    ray.exceptions.NodeDiedError("node gone"),
])
def test_storage_network_and_cluster_failures_are_transient_on_either_side(err) -> None:
    assert classify(err, Side.INPUT) is Fault.TRANSIENT
    assert classify(err, Side.OUTPUT) is Fault.TRANSIENT
    # Wrapped as the decoder wraps what made a video unreadable, they still are.
    assert classify(wrapped(err)) is Fault.TRANSIENT


@pytest.mark.parametrize("err", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EROFS, "Read-only file system"),
    PermissionError(errno.EACCES, "Permission denied"),
    translate_boto_error(client_error("AccessDenied", 403, "PutObject")),
    translate_boto_error(client_error("NoSuchBucket", 404, "PutObject")),
])
def test_a_refusing_output_stops_the_job_and_is_never_the_inputs_fault(err) -> None:
    assert classify(err, Side.OUTPUT) is Fault.OUTPUT
    assert Fault.OUTPUT.stops_job and not Fault.INPUT.stops_job
    # Marked by on_output, even code that does not know its side gets it right.
    with pytest.raises(OutputError) as raised:
        with on_output("/out/_staging/x/part-00000.parquet"):
            raise err
    assert classify(raised.value) is Fault.OUTPUT
    assert "/out/_staging/x/part-00000.parquet" in str(raised.value)


@pytest.mark.parametrize("err", [
    av.error.InvalidDataError(errno.EINVAL, "Invalid data found when processing input"),
    FileNotFoundError(errno.ENOENT, "No such file"),
    PermissionError(errno.EACCES, "Permission denied"),
    translate_boto_error(client_error("NoSuchKey", 404)),
    translate_boto_error(client_error("AccessDenied", 403)),
    ValueError("a bug or a bad file, not the storage"),
])
def test_a_bad_input_is_the_inputs_fault(err) -> None:
    assert classify(err, Side.INPUT) is Fault.INPUT
    assert classify(wrapped(err)) is Fault.INPUT


def test_real_bad_files_are_permanent(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("not a video\n")
    good = write_test_video(tmp_path / "good.mp4", 24, (32, 64)).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])
    for name in ("notes.mp4", "cut.mp4", "missing.mp4"):
        with pytest.raises(VideoError) as raised:
            probe_video(str(tmp_path / name))
        assert classify(raised.value) is Fault.INPUT, name


def test_ray_task_errors_are_judged_by_their_cause() -> None:
    bug = ray.exceptions.RayTaskError("ChunkSegmenter", "Traceback ...", ValueError("boom"))
    assert classify(bug) is Fault.INPUT
    stopped = TransientFailure("loading the checkpoint", Fault.TRANSIENT, 6, 61.0, "ReadTimeoutError: ...")
    assert classify(ray.exceptions.RayTaskError("ChunkSegmenter", "Traceback ...", stopped)) is Fault.TRANSIENT
    assert classify(ray.exceptions.ActorUnavailableError("actor restarting", b"\0" * 16)) is Fault.TRANSIENT


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose reads past ``fail_after`` bytes raise what s3fs raises when the
    endpoint stops answering, so PyAV reads a real video through a real fsspec file object."""

    protocol = "flaky"
    fail_after = 0
    error: type[Exception] = ReadTimeoutError

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        fail_after, error = self.fail_after, self.error

        class Flaky(MemoryFile):
            def read(self, size=-1):
                if self.tell() >= fail_after:
                    raise error(endpoint_url="http://127.0.0.1:1")
                return super().read(size)

        return Flaky(self, path, handle.getvalue())


@pytest.fixture
def flaky(tmp_path: Path):
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    path = tmp_path / "noise.mp4"  # noise compresses badly: a file many PyAV reads long
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "12"})
        stream.height, stream.width, stream.pix_fmt = 96, 160, "yuv420p"
        for _ in range(120):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    assert len(data) > 20 * 32768
    FlakyFileSystem().pipe_file("/bucket/v.mp4", data)
    yield data
    FlakyFileSystem().rm("/bucket/v.mp4")


@pytest.mark.parametrize("where", [0.0, 0.5])
def test_an_outage_while_reading_a_video_is_transient_not_a_truncated_file(flaky, monkeypatch, where) -> None:
    monkeypatch.setattr(FlakyFileSystem, "fail_after", int(len(flaky) * where))
    with pytest.raises(Exception) as raised:  # noqa: PT011 - which type depends on where PyAV was
        probe_video("flaky://bucket/v.mp4")
    assert classify(raised.value) is Fault.TRANSIENT, repr(raised.value)
    monkeypatch.setattr(FlakyFileSystem, "fail_after", len(flaky) + 1)
    probe = probe_video("flaky://bucket/v.mp4")
    assert probe.frame_count == 120
    # Decoding a chunk while the storage goes away: never "truncated" or "corrupt", which would fail the video.
    monkeypatch.setattr(FlakyFileSystem, "fail_after", int(len(flaky) * max(where, 0.3)))
    for start, stop in [(0, 120), (60, 120)]:
        with pytest.raises(Exception) as raised:  # noqa: PT011
            list(decode_range("flaky://bucket/v.mp4", probe, start, stop))
        assert classify(raised.value) is Fault.TRANSIENT, repr(raised.value)


def test_retry_rides_out_a_blip_and_gives_up_with_a_picklable_job_failure() -> None:
    calls = []

    def flaky_then_fine():
        calls.append(1)
        if len(calls) < 3:
            raise translate_boto_error(client_error("SlowDown", 503))
        return "done"

    assert NO_WAIT.call(flaky_then_fine, Side.INPUT, "probing s3://b/clip.mp4") == "done" and len(calls) == 3

    def always_down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    with pytest.raises(TransientFailure) as raised:
        NO_WAIT.call(always_down, Side.INPUT, "probing s3://b/clip.mp4")
    failure = raised.value
    assert isinstance(failure, JobFailure) and failure.fault is Fault.TRANSIENT and failure.attempts == 3
    assert "probing s3://b/clip.mp4" in str(failure) and "rerun" in str(failure)
    again = pickle.loads(pickle.dumps(failure))  # it crosses Ray's process boundary
    assert str(again) == str(failure) and again.fault is Fault.TRANSIENT


def test_retry_does_not_retry_a_bad_input() -> None:
    calls = []

    def bad():
        calls.append(1)
        raise VideoError("/v.mp4", "probe", "not a video")

    with pytest.raises(VideoError):
        NO_WAIT.call(bad, Side.INPUT, "probing /v.mp4")
    assert len(calls) == 1


def test_backoff_is_exponential_bounded_and_jittered() -> None:
    policy = RetryPolicy()
    for retry, base in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (9, 30.0)]:
        waits = [policy.delay(retry) for _ in range(50)]
        assert all(0.75 * base <= w <= base for w in waits), (retry, min(waits), max(waits))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_preflight_refuses_an_output_that_takes_no_writes_and_leaves_a_good_one_as_it_was(tmp_path: Path,
                                                                                          ) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "dcfm.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 32)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(JobFailure, match=f"the output {blocker}/out is not writable.*Nothing was written"):
        preflight(str(blocker / "out"), str(checkpoint), NO_WAIT)
    out = tmp_path / "out"
    preflight(str(out), str(checkpoint), NO_WAIT)
    assert out.is_dir() and not list(out.iterdir())
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(JobFailure, match=f"the checkpoint {checkpoint} is not readable"):
        preflight(str(out), str(checkpoint), NO_WAIT)
