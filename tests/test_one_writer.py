"""One writer per output and verified resume, end to end: real local Ray, jobs in real subprocesses that are
SIGKILLed or race each other on one output, and the README's DuckDB and Polars queries run on what they
leave behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from dcfm.segment.job import run_segment_job
from dcfm.sources import expand_inputs
from dcfm.synth import SynthConfig, generate_corpus
from tests.test_segment_job import checkpoint, frame_rows, job, readme_block  # noqa: F401  (checkpoint: fixture)
from tests.videos import write_test_video

pytestmark = pytest.mark.slow

# The driver, with its storage writes wrapped: on the marker of TARGET it SIGKILLs itself, after the video's
# frame files were moved into frames/ and its videos/ row written, before the marker exists.
KILL_AT_MARKER = textwrap.dedent("""
    import os, signal, sys
    from dcfm import storage
    target, argv = sys.argv[1], sys.argv[2:]
    write = storage.write_bytes_atomic
    def write_or_die(uri, data):
        if str(uri).endswith(f"/_commits/{target}.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        write(uri, data)
    storage.write_bytes_atomic = write_or_die
    from dcfm.cli import main
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("videos")
    generate_corpus(root / "synth", SynthConfig(videos=2, frames=13, height=48, width=96, seed=5))
    return [*sorted((root / "synth" / "videos").glob("*.mp4")), write_test_video(root / "gop2.mp4", 18, (32, 64), gop=2)]


@pytest.fixture(scope="module")
def clean(ray_local, videos, checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run_segment_job(job(videos, out, checkpoint, chunk_frames=4))
    assert summary.ok == len(videos)
    return out


def video_ids(videos) -> list[str]:
    return [item.video_id for item in expand_inputs([str(v) for v in videos])]


def segment_command(videos, out: Path, checkpoint: str, chunk_frames: int) -> list[str]:  # noqa: F811
    import ray

    return ["segment", *map(str, videos), "--output", str(out), "--checkpoint", checkpoint, "-k", "2",
            "--chunk-frames", str(chunk_frames), "--address", ray.get_runtime_context().gcs_address]


def assert_consistent(out: Path) -> dict[str, dict]:
    """Every committed video has each frame exactly once, as many as its frame_count, and every file its marker
    lists exists; returns the markers."""
    markers = {}
    for path in (out / "_commits").glob("*.json"):
        marker = json.loads(path.read_text())
        markers[marker["video_id"]] = marker
    assert markers
    for video_id, marker in markers.items():
        frames_dir = out / "frames" / f"video_id={video_id}"
        (video,) = pq.read_table(out / "videos" / f"video_id={video_id}" / "part-0.parquet").to_pylist()
        files = [frames_dir / name for name in marker["frame_files"]]
        assert all(f.is_file() for f in files), video_id
        assert sorted(p.name for p in frames_dir.glob("*.parquet")) == sorted(marker["frame_files"]), video_id
        indices = [i for f in files for i in pq.read_table(f, columns=["frame_index"])["frame_index"].to_pylist()]
        assert sorted(indices) == list(range(video["frame_count"])), video_id
    return markers


def readme_queries(out: Path) -> tuple[set[str], set[str], int]:
    """Video ids the README's DuckDB query returns, the videos the Polars query counts pixels of (via their
    frames), and the Polars query's pixel total."""
    sql = readme_block("readme-sql", "sql").replace("OUTPUT", str(out))
    duck = {row[0] for row in duckdb.connect().execute(sql).fetchall()}
    scope: dict = {}
    exec(readme_block("readme-polars", "python").replace("OUTPUT", str(out)), scope)
    polars_videos = set(scope["frames"].select("video_id").unique().collect()["video_id"].to_list())
    return duck, polars_videos, int(scope["class_share"]["pixels"].sum())


def test_driver_killed_between_frame_moves_and_marker(clean, videos, checkpoint, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "killed"
    target = video_ids(videos[-1:])[0]  # the gop2 video
    command = [sys.executable, "-c", KILL_AT_MARKER, target, *segment_command(videos, out, checkpoint, 4)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    # The kill landed in the window: the video's frames and videos/ row are in place, its marker is not.
    assert list((out / "frames" / f"video_id={target}").glob("*.parquet"))
    assert (out / "videos" / f"video_id={target}" / "part-0.parquet").is_file()
    assert not (out / "_commits" / f"{target}.json").exists()
    # A join on videos/ alone (the README's DuckDB query before) would have counted its frames.
    naive = duckdb.connect().execute(
        f"SELECT DISTINCT f.video_id FROM read_parquet('{out}/frames/*/*.parquet', hive_partitioning = true) f "
        f"JOIN read_parquet('{out}/videos/*/*.parquet', hive_partitioning = true) v USING (video_id) "
        "WHERE v.status = 'ok'").fetchall()
    assert (target,) in naive
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    duck, polars_videos, _ = readme_queries(out)
    assert target not in duck and target not in polars_videos
    assert duck == polars_videos == committed
    # The rerun takes the dead driver's lease at once, redoes the video and ends with the clean rows.
    logged: list[str] = []
    summary = run_segment_job(job(videos, out, checkpoint, chunk_frames=4), log=logged.append)
    assert summary.ok == len(videos) - len(committed) and summary.skipped == len(committed)
    assert any("its process is gone" in line for line in logged)
    assert frame_rows(str(out)) == frame_rows(str(clean))
    assert readme_queries(out) == readme_queries(clean)
    assert_consistent(out)
    assert not (out / "_lease.json").exists()


@pytest.mark.parametrize("chunks", [(4, 4), (4, 8)], ids=["same-command", "other-chunk-frames"])
def test_two_runs_started_together_on_one_output(clean, videos, checkpoint, tmp_path, chunks) -> None:  # noqa: F811
    out = tmp_path / "shared"
    env = {**os.environ}
    runs = [subprocess.Popen([sys.executable, "-m", "dcfm", *segment_command(videos, out, checkpoint, c)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in chunks]
    results = [(run.pid, *run.communicate(timeout=300), run.returncode) for run in runs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    # The loser was told who writes to the output and until when, and wrote nothing.
    assert "is being written by run " in loser[2] and f"(pid {winner[0]} on " in loser[2] and "expires" in loser[2]
    assert "--wait-for-lease" in loser[2]
    markers = assert_consistent(out)
    assert set(markers) == set(video_ids(videos))
    assert frame_rows(str(out)) == frame_rows(str(clean))
    # A plain rerun with the loser's settings skips everything and leaves the output as it was.
    summary = run_segment_job(job(videos, out, checkpoint, chunk_frames=chunks[1]))
    assert summary.skipped == len(videos) and summary.chunks == 0
    assert assert_consistent(out) == markers and not (out / "_lease.json").exists()


def test_marker_whose_file_was_deleted_is_redone(clean, videos, checkpoint, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "damaged"
    shutil.copytree(clean, out)
    victim = video_ids(videos[-1:])[0]  # gop2: several chunks
    marker = json.loads((out / "_commits" / f"{victim}.json").read_text())
    assert len(marker["frame_files"]) > 1
    (out / "frames" / f"video_id={victim}" / marker["frame_files"][1]).unlink()
    logged: list[str] = []
    summary = run_segment_job(job(videos, out, checkpoint, chunk_frames=4), log=logged.append)
    assert summary.ok == 1 and summary.skipped == len(videos) - 1
    assert any(f"{victim}: its commit marker lists 1 missing file(s)" in line for line in logged)
    assert frame_rows(str(out)) == frame_rows(str(clean))
    assert_consistent(out)
