"""The segment job under faults, with real processes: SeaweedFS paused mid-job (SIGSTOP), a segment actor
SIGKILLed mid-chunk, and an output that takes no writes. None of them may commit a `failed` video; the job
rides them out or stops with exit 3, and a plain rerun ends with the rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcfm import storage
from dcfm.errors import ExitCode, JobFailure
from dcfm.segment.job import JobSummary, run_segment_job
from tests.s3server import S3Server, s3_bucket
from tests.test_segment_job import checkpoint, frame_rows, job, read_table  # noqa: F401 - checkpoint: a fixture
from tests.videos import write_test_video

pytestmark = pytest.mark.slow

# One video long enough to be mid-job for a while (16 chunks of 8 frames), and two short ones.
VIDEOS = {"long.mp4": (128, 2), "a.mp4": (24, 4), "b.mp4": (17, 6)}
CHUNK = 8


@pytest.fixture(scope="module")
def s3_inputs(s3_server: S3Server, tmp_path_factory) -> Iterator[tuple[str, list[str]]]:
    """A bucket holding the videos (inputs are read from S3, so an outage hits probing and decoding too)."""
    local = tmp_path_factory.mktemp("fault-videos")
    with pytest.MonkeyPatch.context() as patch, s3_bucket(s3_server, patch, prefix="dcfm-faults") as bucket:
        uris = []
        for name, (frames, gop) in VIDEOS.items():
            path = write_test_video(local / name, frames, (32, 64), gop=gop)
            storage.write_bytes_atomic(f"{bucket}/in/{name}", path.read_bytes())
            uris.append(f"{bucket}/in/{name}")
        yield bucket, uris


@pytest.fixture(scope="module")
def clean(ray_local, s3_inputs, checkpoint) -> tuple[str, JobSummary]:  # noqa: F811
    bucket, uris = s3_inputs
    out = f"{bucket}/clean"
    summary = run_segment_job(job(uris, out, checkpoint, chunk_frames=CHUNK))
    assert summary.ok == len(VIDEOS)
    return out, summary


def markers(out: str) -> list[dict]:
    fs, path = storage.filesystem(storage.join(out, "_commits"))
    fs.invalidate_cache()
    try:
        return [json.loads(fs.cat_file(p)) for p in fs.ls(path, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []


def staged_summaries(out: str) -> int:
    fs, path = storage.filesystem(storage.join(out, "_staging"))
    fs.invalidate_cache()
    try:
        return sum(1 for p in fs.find(path) if p.endswith(".json"))
    except FileNotFoundError:
        return 0


def same_rows(out: str, clean_out: str) -> None:
    assert frame_rows(out) == frame_rows(clean_out)
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows), key=str)  # noqa: E731
    assert strip(read_table(out, "videos").to_pylist()) == strip(read_table(clean_out, "videos").to_pylist())


def run_in_thread(config) -> tuple[threading.Thread, dict]:
    """The job in a thread of this process (the driver), so the test can act on the processes around it."""
    result: dict = {}

    def target() -> None:
        started = time.monotonic()
        try:
            result["summary"] = run_segment_job(config)
        except Exception as err:  # noqa: BLE001 - the test inspects what the job raised
            result["error"] = err
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def s3_job(ray_local, s3_server, s3_inputs, clean, monkeypatch) -> tuple[str, list[str], str]:
    """The driver's AWS environment pointed at the session's SeaweedFS: (bucket, input URIs, clean output)."""
    for key, value in s3_server.env_vars().items():
        monkeypatch.setenv(key, value)
    return *s3_inputs, clean[0]


def test_storage_paused_mid_job_commits_no_failed_video(s3_job, s3_server, checkpoint) -> None:  # noqa: F811
    bucket, uris, clean_out = s3_job
    out = f"{bucket}/paused"
    thread, result = run_in_thread(job(uris, out, checkpoint, chunk_frames=CHUNK))
    weed = s3_server._proc.pid  # the `weed server` this session's fixture started
    try:
        wait_for(lambda: staged_summaries(out) >= 1 or not thread.is_alive(), 180, "the first staged chunk")
        assert thread.is_alive(), f"the job ended before the pause: {result}"
        os.kill(weed, signal.SIGSTOP)
        paused_at = time.monotonic()
        time.sleep(40)
    finally:
        os.kill(weed, signal.SIGCONT)
    thread.join(600)
    assert not thread.is_alive()
    print(f"paused 40 s; job {'rode it out' if 'summary' in result else 'stopped'} "
          f"{time.monotonic() - paused_at:.0f} s after the pause began: {result.get('error') or ''}")
    if "error" in result:
        # Retries ran out: exit 3 (JobFailure), naming what it was doing; nothing of that video committed.
        assert isinstance(result["error"], JobFailure), repr(result["error"])
    else:
        assert result["summary"].exit_code is ExitCode.OK
    assert all(m["status"] == "ok" for m in markers(out)), markers(out)
    fs, path = storage.filesystem(storage.join(out, "errors"))
    assert not fs.exists(path)
    rerun = run_segment_job(job(uris, out, checkpoint, chunk_frames=CHUNK))
    assert rerun.exit_code is ExitCode.OK and rerun.failed == 0
    same_rows(out, clean_out)


def segment_actors() -> dict[str, dict]:
    """The job's segment actors, from Ray's actor table (GCS): id -> state, pid, restarts. The session's Ray
    runs without a dashboard, so ``ray.util.state`` (served by it) is not there; this is the table it reads."""
    from ray._private import state

    return {aid: a for aid, a in state.actors().items() if "MapWorker" in a["ActorClassName"]}


def test_killed_actor_mid_chunk_redoes_the_chunk(s3_job, checkpoint) -> None:  # noqa: F811
    bucket, uris, clean_out = s3_job
    out = f"{bucket}/actor-killed"
    before = set(segment_actors())
    thread, result = run_in_thread(job(uris, out, checkpoint, chunk_frames=CHUNK, min_actors=2, max_actors=2,
                                       cpus_per_actor=1))

    def busy_actor() -> dict | None:
        # An alive actor of this job while chunks are still to do is in the middle of one: each takes the next
        # chunk as soon as it hands one back.
        if staged_summaries(out) < 2:
            return None
        alive = [a for aid, a in segment_actors().items() if aid not in before and a["State"] == "ALIVE" and a["Pid"]]
        return alive[0] if alive else None

    wait_for(lambda: busy_actor() is not None or not thread.is_alive(), 180, "a busy segment actor")
    victim = busy_actor()
    assert victim is not None and thread.is_alive(), f"the job ended before the kill: {result}"
    staged_at_kill = staged_summaries(out)
    os.kill(victim["Pid"], signal.SIGKILL)
    thread.join(600)
    assert "summary" in result, repr(result.get("error"))
    summary = result["summary"]
    assert staged_at_kill < summary.chunks, "the kill should land before the last chunk"
    assert summary.exit_code is ExitCode.OK and summary.ok == len(VIDEOS) and summary.failed == 0
    # Ray restarted the killed actor (same actor id, a new process) and redid its chunk.
    restarted = segment_actors()[victim["ActorID"]]
    assert restarted["NumRestarts"] >= 1 and restarted["Pid"] != victim["Pid"]
    print(f"killed actor pid {victim['Pid']} after {staged_at_kill} staged chunks; job done in "
          f"{result['seconds']:.0f} s, {restarted['NumRestarts']} restart(s)")
    same_rows(out, clean_out)


class ReadOnlyS3(S3Server):
    """A second SeaweedFS whose extra identity may read and list but not write: a bucket this job's
    credentials cannot write to."""

    reader_key = "dcfm-reader"
    reader_secret = "dcfm-reader-secret-not-real"

    def _write_identities(self) -> None:
        super()._write_identities()
        path = self.base_dir / "identities.json"
        config = json.loads(path.read_text())
        config["identities"].append({
            "name": "reader",
            "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
            "actions": ["Read", "List"],
        })
        path.write_text(json.dumps(config))


def test_output_without_write_permission_stops_before_any_model_work(checkpoint, tmp_path) -> None:  # noqa: F811
    video = write_test_video(tmp_path / "v.mp4", 12, (32, 64))
    with ReadOnlyS3() as server:
        admin = server.client()
        admin.create_bucket(Bucket="dcfm-readonly")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(server.env_vars(), AWS_ACCESS_KEY_ID=server.reader_key, AWS_SECRET_ACCESS_KEY=server.reader_secret,
                   PYTHONPATH=str(Path(__file__).parents[1]))
        started = time.monotonic()
        # --address points nowhere: reaching Ray (model work) would fail differently.
        done = subprocess.run(
            [sys.executable, "-m", "dcfm", "segment", str(video), "--output", "s3://dcfm-readonly/out",
             "--checkpoint", checkpoint, "--address", "127.0.0.1:9"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        seconds = time.monotonic() - started
        listed = admin.list_objects_v2(Bucket="dcfm-readonly").get("KeyCount", 0)
    print(f"read-only bucket: exit {done.returncode} after {seconds:.1f} s (process start included)")
    assert done.returncode == ExitCode.JOB_FAILED, done.stderr
    assert "the output s3://dcfm-readonly/out is not writable" in done.stderr, done.stderr
    assert "s3:PutObject" in done.stderr and "Traceback" not in done.stderr
    assert "running" not in done.stdout  # the actor pool never started
    assert server.reader_secret not in done.stderr + done.stdout
    assert listed == 0  # no rows, no marker, no probe left behind
