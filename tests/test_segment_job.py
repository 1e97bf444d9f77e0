"""The segment job end to end on a real local Ray (and a real SeaweedFS for s3://)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import av
import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import ModelCard, read_card, save_checkpoint
from dcfm.inference import KeyframePolicy
from dcfm.errors import ExitCode, SettingsConflict
from dcfm.model import DCFM, DCFMConfig
from dcfm.schemas import output_schema
from dcfm.segment.config import SegmentJobConfig
from dcfm.segment.job import run_segment_job
from dcfm.segment.outputs import OutputLayout
from dcfm.synth import SynthConfig, generate_corpus
from dcfm.sources import expand_inputs
from tests.videos import write_audio_only, write_bframe_video, write_test_video, write_vfr_video

pytestmark = pytest.mark.slow

H, W = 32, 64  # model resolution


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Good videos: two synth clips, an H.264 file with B-frames, a VFR file, a 3-frame clip and one with a
    seek point every 2 frames (so small chunks are not merged)."""
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root / "synth", SynthConfig(videos=2, frames=13, height=48, width=96, seed=3))
    videos = {p.stem: p for p in sorted((root / "synth" / "videos").glob("*.mp4"))}
    videos["bframes"] = write_bframe_video(root / "bframes.mp4", frames=21, size=(40, 72))
    videos["vfr"] = write_vfr_video(root / "vfr.mp4", frames=11, size=(32, 48))
    videos["short"] = write_bframe_video(root / "short.mp4", frames=3, size=(32, 48))
    videos["gop2"] = write_test_video(root / "gop2.mp4", 26, (32, 64), gop=2)
    return videos


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = DCFMConfig("pvt_v2_b0", num_classes=8)
    model = DCFM(config).eval()
    card = ModelCard(config, [f"c{i}" for i in range(8)], [(i * 30, i * 30, i * 30) for i in range(8)], (H, W))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model, card)
    return str(path)


def job(inputs, output, checkpoint, **kwargs) -> SegmentJobConfig:
    kwargs.setdefault("keyframes", KeyframePolicy(interval=2))
    kwargs.setdefault("progress_interval_s", 3600)
    return SegmentJobConfig([str(i) for i in inputs], str(output), checkpoint, **kwargs)


def read_table(root: str, name: str):
    fs, path = storage.filesystem(storage.join(root, name))
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def frame_rows(root: str) -> dict[tuple[str, int], dict]:
    table = read_table(root, "frames")
    return {(r["video_id"], r["frame_index"]): r for r in table.to_pylist()}


def sequential_timestamps(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(f.pts * f.time_base) for f in container.decode(video=0)]


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def clean_run(ray_local, corpus, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "clean"
    summary = run_segment_job(job(corpus.values(), out, checkpoint, chunk_frames=4))
    return out, summary


def test_every_frame_exactly_once_with_sequential_timestamps(clean_run, corpus) -> None:
    out, summary = clean_run
    assert summary.exit_code is ExitCode.OK and summary.ok == len(corpus)
    rows = frame_rows(str(out))
    ids = {item.uri: item.video_id for item in expand_inputs([str(p) for p in corpus.values()])}
    for name, path in corpus.items():
        video_id = ids[str(path.resolve())]
        expected = sequential_timestamps(path)
        got = sorted((i, r["timestamp_s"]) for (v, i), r in rows.items() if v == video_id)
        assert [i for i, _ in got] == list(range(len(expected))), name
        assert [t for _, t in got] == pytest.approx(expected, abs=1e-9), name


def test_outputs_conform_to_schemas_and_masks_decode(clean_run) -> None:
    out, _ = clean_run
    for name in ("frames", "videos"):
        table = read_table(str(out), name)
        expected = output_schema(name).schema
        for field in expected:
            assert table.schema.field(field.name).type == field.type, (name, field.name)
    for row in read_table(str(out), "frames").to_pylist():
        mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        assert mask.shape == (row["height"], row["width"]) == (row["mask_height"], row["mask_width"])
        assert sum(c["pixels"] for c in row["class_pixels"]) == row["height"] * row["width"]
        counts = np.bincount(mask.ravel(), minlength=8)
        assert {c["class_id"]: c["pixels"] for c in row["class_pixels"]} == {
            c: int(n) for c, n in enumerate(counts) if n
        }
        assert (row["keyframe_agreement"] is None) == (row["is_keyframe"] or len(row["keyframes"]) == 1)


def test_duckdb_reads_hive_partitioned_frames(clean_run) -> None:
    out, summary = clean_run
    con = duckdb.connect()
    n = con.execute(
        f"select count(*) from read_parquet('{out}/frames/*/*.parquet', hive_partitioning = true)"
    ).fetchone()[0]
    assert n == summary.frames
    per_video = con.execute(
        f"select video_id, count(*) from read_parquet('{out}/frames/*/*.parquet', hive_partitioning = true) "
        "group by video_id"
    ).fetchall()
    assert len(per_video) == summary.ok


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_chunking_does_not_change_any_row(ray_local, corpus, checkpoint, tmp_path, mode) -> None:
    small = run_segment_job(job(corpus.values(), tmp_path / "small", checkpoint, chunk_frames=2, mode=mode))
    large = run_segment_job(job(corpus.values(), tmp_path / "large", checkpoint, chunk_frames=64, mode=mode))
    assert small.chunks > large.chunks
    rows_small, rows_large = frame_rows(str(tmp_path / "small")), frame_rows(str(tmp_path / "large"))
    assert rows_small.keys() == rows_large.keys()
    floats = {"confidence", "label_change_rate", "keyframe_agreement"}
    for key, row in rows_small.items():
        other = rows_large[key]
        # Masks, keyframes and every exact field are identical; float summaries come out of differently
        # composed batches and may differ in the last bits.
        assert {k: v for k, v in row.items() if k not in floats} == {k: v for k, v in other.items() if k not in floats}
        for name in floats:
            if other[name] is None:
                assert row[name] is None, (key, name)
            else:
                assert row[name] == pytest.approx(other[name], rel=1e-5, abs=1e-6), (key, name)


def test_run_manifest_records_settings_counts_and_where_the_time_went(clean_run, corpus, checkpoint) -> None:
    out, summary = clean_run
    manifests = sorted((out / "runs" / summary.run_id).glob("*.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["run_id"] == summary.run_id
    assert manifest["checkpoint_digest"] == read_card(checkpoint)[1]
    assert manifest["config"]["chunk_frames"] == 4 and manifest["packages"]["torch"] == metadata.version("torch")
    assert manifest["counts"] == {"inputs": len(corpus), "ok": len(corpus), "empty": 0, "failed": 0, "skipped": 0,
                                  "skipped_files": 0,
                                  "chunks": summary.chunks, "reused_chunks": 0, "frames": summary.frames}
    # The defaults filled the 2-CPU cluster: two actors of one CPU each.
    assert manifest["resources"]["min_actors"] == manifest["resources"]["max_actors"] == 2
    assert sum(a["chunks"] for a in manifest["actors"].values()) == summary.chunks
    # Each actor's CPU time is counted, so a reader can hold the cores it used against --cpus-per-actor: some
    # CPU while busy, and no more than the machine's cores allow in that time.
    for actor in manifest["actors"].values():
        assert 0 < actor["cpu_s"] <= (os.cpu_count() or 1) * actor["seconds"] + 0.05
    timings = manifest["timings"]
    stages = timings["actor_s"]
    # The actors' time splits into its stages (set-up outside them is small), all within the job's wall time.
    assert stages["model_s"] > 0 and stages["write_s"] > 0 and stages["rows_s"] > 0
    parts = stages["model_s"] + stages["decode_wait_s"] + stages["rows_s"] + stages["write_s"]
    assert 0.8 * stages["seconds"] <= parts <= stages["seconds"]
    # Start-up ends before the actors' work does: it is at most the wall time less the busy time.
    assert 0 < timings["startup_s"] <= timings["seconds"] - stages["seconds"] / 2


def test_rerun_writes_nothing(clean_run, corpus, checkpoint) -> None:
    out, _ = clean_run
    before = listing(out)
    summary = run_segment_job(job(corpus.values(), out, checkpoint, chunk_frames=4))
    assert summary.skipped == len(corpus) and summary.chunks == 0
    assert listing(out) == before


def test_overwrite_replaces(clean_run, corpus, checkpoint) -> None:
    out, _ = clean_run
    one = next(iter(corpus.values()))
    rows_before = frame_rows(str(out))
    summary = run_segment_job(job([one], out, checkpoint, chunk_frames=8, overwrite=True))
    assert summary.ok == 1
    assert frame_rows(str(out)) == rows_before


def test_resuming_with_other_settings_is_refused(clean_run, corpus, checkpoint) -> None:
    out, _ = clean_run
    before = listing(out)
    with pytest.raises(SettingsConflict, match="another model or settings"):
        run_segment_job(job(corpus.values(), out, checkpoint, keyframes=KeyframePolicy(interval=3)))
    assert listing(out) == before


def test_bad_inputs_fail_alone(ray_local, corpus, checkpoint, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    good_bytes = corpus["bframes"].read_bytes()
    (bad / "truncated.mp4").write_bytes(good_bytes[: len(good_bytes) * 6 // 10])
    (bad / "notes.mp4").write_text("this is not a video\n")
    write_audio_only(bad / "audio.mp4")
    missing = bad / "missing.mp4"
    good = corpus["short"]
    out = tmp_path / "out"
    summary = run_segment_job(job([good, *sorted(bad.glob("*.mp4")), missing], out, checkpoint))
    assert summary.exit_code is ExitCode.INPUTS_FAILED
    videos = {r["video_uri"]: r for r in read_table(str(out), "videos").to_pylist()}
    errors = read_table(str(out), "errors").to_pylist()
    assert videos[str(good.resolve())]["status"] == "ok"
    for name in ("empty.mp4", "truncated.mp4", "notes.mp4", "audio.mp4", "missing.mp4"):
        uri = str((bad / name).resolve())
        assert videos[uri]["status"] == "failed", name
        mine = [e for e in errors if e["video_uri"] == uri]
        assert mine and name in mine[0]["message"], (name, mine)
    # Failed videos have no frame rows; the good one has all of its frames.
    rows = frame_rows(str(out))
    assert {v for v, _ in rows} == {videos[str(good.resolve())]["video_id"]}
    # A rerun skips the committed failures, writes nothing, and still reports them.
    before = listing(out)
    again = run_segment_job(job([good, *sorted(bad.glob("*.mp4")), missing], out, checkpoint))
    assert again.exit_code is ExitCode.INPUTS_FAILED and listing(out) == before


def test_local_and_s3_outputs_are_identical(ray_local, corpus, checkpoint, tmp_path, s3_env, monkeypatch) -> None:
    videos = [corpus["bframes"], corpus["vfr"]]
    local = run_segment_job(job(videos, tmp_path / "local", checkpoint, chunk_frames=4))
    remote_root = f"{s3_env}/segment-out"
    remote = run_segment_job(job(videos, remote_root, checkpoint, chunk_frames=4))
    assert local.ok == remote.ok == 2
    assert frame_rows(str(tmp_path / "local")) == frame_rows(remote_root)
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rows), key=str)  # noqa: E731
    assert strip(read_table(str(tmp_path / "local"), "videos").to_pylist()) == strip(
        read_table(remote_root, "videos").to_pylist()
    )
    assert storage.exists(f"{remote_root}/_commits")
    # The S3 secret never lands in any output object.
    fs, path = storage.filesystem(remote_root)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for key in fs.find(path):
        assert secret not in fs.cat_file(key), key
    # The run left a commit index (so a rerun reads the markers from one object); a frame file lost since is
    # still noticed and its video redone, from the same rows.
    layout = OutputLayout(remote_root)
    assert storage.exists(layout.commit_index())
    victim, marker = sorted(layout.committed().items())[0]
    fs.rm(storage.filesystem(storage.join(layout.frames_dir(victim), marker["frame_files"][-1]))[1])
    logged: list[str] = []
    again = run_segment_job(job(videos, remote_root, checkpoint, chunk_frames=4), log=logged.append)
    assert again.ok == 1 and again.skipped == 1
    assert any(f"{victim}: its commit marker lists 1 missing file(s)" in line for line in logged)
    assert frame_rows(str(tmp_path / "local")) == frame_rows(remote_root)
    # A rerun with nothing to do still writes a missing index, at once (it never reaches the job's end); where
    # that write fails, it says so and the rerun succeeds all the same.
    fs.rm(storage.filesystem(layout.commit_index())[1])
    noop = run_segment_job(job(videos, remote_root, checkpoint, chunk_frames=4))
    assert noop.skipped == 2 and storage.exists(layout.commit_index())
    fs.rm(storage.filesystem(layout.commit_index())[1])

    def refuse(self, markers):
        raise PermissionError("AccessDenied: PutObject")

    monkeypatch.setattr(OutputLayout, "write_commit_index", refuse)
    logged.clear()
    noop = run_segment_job(job(videos, remote_root, checkpoint, chunk_frames=4), log=logged.append)
    assert noop.skipped == 2 and not storage.exists(layout.commit_index())
    assert any("WARNING: could not write the commit index" in line and "AccessDenied" in line for line in logged)


def test_killed_run_resumes_to_the_clean_rows(ray_local, clean_run, corpus, checkpoint, tmp_path) -> None:
    clean_out, _ = clean_run
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "dcfm", "segment", *[str(p) for p in corpus.values()], "--output", str(out),
        "--checkpoint", checkpoint, "-k", "2", "--chunk-frames", "4",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "_commits").glob("*.json")):
            if process.poll() is not None:
                break
            time.sleep(0.2)
        committed_at_kill = len(list((out / "_commits").glob("*.json")))
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        except ProcessLookupError:
            pass
        process.wait()
    assert 0 < committed_at_kill < len(corpus), "the kill should land midway through the run"
    summary = run_segment_job(job(corpus.values(), out, checkpoint, chunk_frames=4))
    assert summary.skipped == committed_at_kill
    assert frame_rows(str(out)) == frame_rows(str(clean_out))
    assert not list(out.glob("_staging/*/*/*.parquet"))


def test_dry_run_loads_nothing_and_writes_nothing(corpus, checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "dry"
    summary = run_segment_job(job(corpus.values(), out, checkpoint, chunk_frames=4, dry_run=True), log=print)
    assert summary.chunks == 0 and not out.exists()
    printed = capsys.readouterr().out
    assert "dry run" in printed and f"{len(corpus)} videos" in printed


def readme_block(marker: str, language: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readme_duckdb_query_runs_on_real_output(clean_run) -> None:
    out, summary = clean_run
    rows = duckdb.connect().execute(readme_block("readme-sql", "sql").replace("OUTPUT", str(out))).fetchall()
    assert len(rows) == summary.ok
    assert sum(r[1] for r in rows) == summary.frames
    assert all(0 < r[2] <= 1 and 0 < r[3] <= 1 for r in rows)


def test_readme_polars_query_runs_on_real_output(clean_run) -> None:
    out, _ = clean_run
    scope: dict = {}
    exec(readme_block("readme-polars", "python").replace("OUTPUT", str(out)), scope)
    share = scope["class_share"]
    totals: dict[int, int] = {}
    for row in read_table(str(out), "frames").to_pylist():
        for c in row["class_pixels"]:
            totals[c["class_id"]] = totals.get(c["class_id"], 0) + c["pixels"]
    assert dict(zip(share["class_id"].to_list(), share["pixels"].to_list())) == totals
    assert sum(share["share"].to_list()) == pytest.approx(1.0)


def test_chunks_of_one_video_run_on_several_actors(ray_local, checkpoint, tmp_path) -> None:
    # Enough chunks that the second actor, which may finish loading its model a moment after the first,
    # still finds chunks waiting.
    video = write_test_video(tmp_path / "long.mp4", 128, (32, 64), gop=2)
    out = tmp_path / "out"
    summary = run_segment_job(job([video], out, checkpoint, chunk_frames=8, min_actors=2, max_actors=2,
                                  cpus_per_actor=1))
    # 16 chunks of 8 frames, the last two halved: it is the last video of a job with two actors (finish_split).
    assert summary.ok == 1 and summary.chunks == 18
    # Two actor processes computed chunks of the one video, and the run manifest names them.
    assert len(summary.actors) == 2 and all(a["chunks"] >= 1 for a in summary.actors.values())
    (manifest,) = (out / "runs" / summary.run_id).glob("*.json")
    assert json.loads(manifest.read_text())["actors"].keys() == summary.actors.keys()
    assert all(key.split(":")[1].isdigit() for key in summary.actors)
    clean = run_segment_job(job([video], tmp_path / "one", checkpoint, chunk_frames=128, min_actors=1,
                                max_actors=1, cpus_per_actor=1))
    assert clean.chunks == 1 and frame_rows(str(out)) == frame_rows(str(tmp_path / "one"))


def test_killed_driver_reuses_staged_chunks(ray_local, checkpoint, tmp_path) -> None:
    video = write_test_video(tmp_path / "long.mp4", 160, (32, 64), gop=2)
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "dcfm", "segment", str(video), "--output", str(out), "--checkpoint", checkpoint,
        "-k", "2", "--chunk-frames", "8", "--actors", "1", "--cpus-per-actor", "1",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    staged = lambda: list(out.glob("_staging/*/*/part-*.json"))  # noqa: E731
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(staged()) < 10 and process.poll() is None:
            time.sleep(0.1)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    # The killed driver's actor runs in a process group of its own and may stage the chunk it was on before it
    # notices: count once the staging area has been still for 3 s.
    at_kill, still_since = len(staged()), time.time()
    while time.time() - still_since < 3 and time.time() < deadline + 30:
        time.sleep(0.2)
        if len(staged()) != at_kill:
            at_kill, still_since = len(staged()), time.time()
    assert 10 <= at_kill < 20, "the kill should land midway through the video's 20 chunks"
    assert not list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else True
    # The rerun has two actors, so the video's last two chunks are halved (22 chunks, finish_split): the killed
    # run's staged chunks are reused where they hold the same frames (the first 18), and the video commits whole.
    summary = run_segment_job(job([video], out, checkpoint, chunk_frames=8, min_actors=2, max_actors=2,
                                  cpus_per_actor=1))
    reusable = min(at_kill, 18)
    assert summary.ok == 1 and summary.chunks == 22 and summary.reused_chunks == reusable
    (manifest,) = (out / "runs" / summary.run_id).glob("*.json")
    assert json.loads(manifest.read_text())["counts"]["reused_chunks"] == reusable
    assert sum(a["chunks"] for a in summary.actors.values()) == 22 - reusable
    clean = tmp_path / "clean"
    run_segment_job(job([video], clean, checkpoint, chunk_frames=8))
    assert frame_rows(str(out)) == frame_rows(str(clean))
    assert not list(out.glob("_staging/*/*/*"))
