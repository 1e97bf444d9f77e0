"""The output layout's bulk operations, on local disk and on a real S3 (SeaweedFS): markers read through the
commit index, files checked by one listing per directory or one recursive listing."""

import gzip
from pathlib import Path

import pytest

from dcfm import storage
from dcfm.segment.outputs import OutputLayout
from dcfm.segment.plan import staged_chunks


def video_row(video_id: str, run_id: str, chunks: int = 1) -> dict:
    """A videos/ row of an ok video of ``chunks`` one-frame chunks."""
    return {
        "video_id": video_id, "video_uri": f"/v/{video_id}.mp4", "status": "ok", "error": None,
        "frame_count": chunks, "fps": 1.0, "codec": "h264", "width": 2, "height": 2, "duration_s": float(chunks),
        "chunks": chunks, "keyframes": 1, "mean_confidence": 1.0, "mean_label_change_rate": None,
        "mean_keyframe_agreement": None, "seconds": 0.0, "run_id": run_id, "model_digest": "d", "warning": None,
    }


def commit(layout: OutputLayout, video_id: str, run_id: str) -> None:
    storage.write_bytes_atomic(layout.staging_file(run_id, video_id, 0), b"chunk")
    layout.commit_video(video_id, run_id, [0], video_row(video_id, run_id), [])


def test_committed_reads_every_marker(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    assert layout.committed() == {}
    for i in range(30):
        commit(layout, f"v{i}", "run")
    markers = layout.committed()
    assert sorted(markers) == sorted(f"v{i}" for i in range(30))
    assert markers["v7"]["frame_files"] == ["part-00000.parquet"] and markers["v7"]["run_id"] == "run"


def test_clear_videos_removes_only_those_videos_and_keeps_staged_chunks_when_asked(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    for video in ("a", "b", "c"):
        commit(layout, video, "run")
    for video in ("a", "d"):  # chunks an interrupted run staged
        storage.write_bytes_atomic(layout.staging_summary("run", video, 3), b"{}")
    layout.clear_videos(["a", "d"], "run", committed={"a", "b", "c"}, keep_staged=True)
    assert sorted(layout.committed()) == ["b", "c"]
    assert not (tmp_path / "frames" / "video_id=a").exists() and not (tmp_path / "videos" / "video_id=a").exists()
    assert (tmp_path / "frames" / "video_id=b").exists()
    assert Path(layout.staging_summary("run", "a", 3)).exists() and Path(layout.staging_summary("run", "d", 3)).exists()
    layout.clear_videos(["a"], "run", committed=set(), keep_staged=False)
    assert not Path(layout.staging_dir("run", "a")).exists() and Path(layout.staging_dir("run", "d")).exists()


def delete(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.rm(path)


@pytest.mark.parametrize("recursive", [True, False], ids=["recursive-listing", "listing-per-directory"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_missing_files_names_what_a_marker_lists_but_is_gone(tmp_path: Path, where: str, recursive: bool,
                                                               request: pytest.FixtureRequest) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_env") + "/out"
    layout = OutputLayout(root)
    for i in range(12):
        commit(layout, f"v{i}", "run")
    storage.write_bytes_atomic(layout.frames_file("v9", 0) + ".x", b"not the file")
    markers = layout.committed()
    kept = [m for v, m in markers.items() if v != "v11"]
    assert layout.missing_files(kept, recursive=recursive) == {}
    delete(layout.frames_file("v3", 0))
    delete(storage.join(layout.videos_dir("v5"), "part-0.parquet"))
    delete(layout.frames_file("v9", 0))
    delete(layout.frames_file("v11", 0))  # not asked about
    missing = layout.missing_files(kept, recursive=recursive)
    assert missing == {"v3": [layout.frames_file("v3", 0)],
                       "v5": [storage.join(layout.videos_dir("v5"), "part-0.parquet")],
                       "v9": [layout.frames_file("v9", 0)]}
    # A later listing sees files written since (no cached listing survives the recursive one).
    commit(layout, "v3", "run")
    assert "v3" not in layout.missing_files(kept, recursive=recursive)


def test_recursive_listing_only_where_it_saves_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = OutputLayout(str(tmp_path))
    for i in range(30):
        commit(layout, f"v{i}", "run")
    markers = layout.committed()
    used: list[str] = []
    for method in ("_files_under", "_files_in"):
        real = getattr(OutputLayout, method)
        monkeypatch.setattr(OutputLayout, method, lambda self, *a, m=method, f=real: (used.append(m), f(self, *a))[1])
    # All 30 videos asked about: one listing of each top directory instead of 60.
    assert layout.missing_files(list(markers.values())) == {} and used == ["_files_under"]
    # One video of 30: its 2 directories, not the 58 other files.
    assert layout.missing_files([markers["v4"]], committed=list(markers.values())) == {} and used[1:] == ["_files_in"]


def test_commit_index_saves_reads_and_never_outvotes_a_marker(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = OutputLayout(f"{s3_env}/out")
    for i in range(6):
        commit(layout, f"v{i}", "run")
    fs, _ = storage.filesystem(layout.root)
    read: list[str] = []
    cat = fs.cat
    monkeypatch.setattr(fs, "cat", lambda paths, **kw: (read.extend(paths), cat(paths, **kw))[1])
    # No index yet: every marker is read, and counted as such; reading writes nothing.
    markers = layout.committed()
    assert len(read) == 6 and markers.read_one_by_one == 6 and not storage.exists(layout.commit_index())
    layout.write_commit_index(markers)
    read.clear()
    markers = layout.committed()
    assert markers.read_one_by_one == 0 and read == []  # all from the index: one GET instead of six
    # A marker rewritten since (another run id), one removed, one added: read as they are now.
    commit(layout, "v1", "other-run")
    delete(layout.marker("v2"))
    commit(layout, "v6", "run")
    now = layout.committed()
    assert sorted(now) == ["v0", "v1", "v3", "v4", "v5", "v6"] and now["v1"]["run_id"] == "other-run"
    assert sorted(p.rsplit("/", 1)[-1] for p in read) == ["v1.json", "v6.json"] and now.read_one_by_one == 2
    layout.write_commit_index(now)
    read.clear()
    assert layout.committed() == now and read == []
    # A forged or stale line (v3 claiming another run) is not what the marker holds: the marker wins.
    lines = gzip.decompress(storage.read_bytes(layout.commit_index())).replace(b'"run_id": "run", "status": "ok", '
                                                                               b'"video_id": "v3"', b'"run_id": "forged", '
                                                                               b'"status": "ok", "video_id": "v3"')
    assert b"forged" in lines
    storage.write_bytes_atomic(layout.commit_index(), gzip.compress(lines))
    assert layout.committed() == now and [p.rsplit("/", 1)[-1] for p in read] == ["v3.json"]
    # A damaged index costs reads and nothing else.
    storage.write_bytes_atomic(layout.commit_index(), b"not gzip")
    read.clear()
    assert layout.committed() == now and len(read) == 6


def test_commit_index_is_not_written_where_listings_carry_no_content_hash(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    commit(layout, "v0", "run")
    markers = layout.committed()
    layout.write_commit_index(markers)
    # Nothing counts as read one by one where no index could have served it.
    assert sorted(markers) == ["v0"] and markers.read_one_by_one == 0 and not Path(layout.commit_index()).exists()


def test_marker_is_one_json_line(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    commit(layout, "v1", "run")
    text = Path(layout.marker("v1")).read_text()
    assert text.endswith("\n") and text.count("\n") == 1


def test_commit_finds_chunks_staged_after_this_process_listed_the_staging_directory(s3_env: str) -> None:
    """Actors stage chunks from other processes; a listing of the staging directory that the driver's S3 client
    cached before the last chunk arrived (s3fs keeps listings without expiry) must not make it look missing."""
    import fsspec

    layout = OutputLayout(f"{s3_env}/out")
    storage.write_bytes_atomic(layout.staging_file("run", "v", 1), b"chunk 1")
    fs, staging = storage.filesystem(layout.staging_dir("run", "v"))
    assert len(fs.ls(staging)) == 1  # this process's client now holds a listing without chunk 0
    # Chunk 0, the first the commit moves, staged by another process: a client of its own, whose writes this
    # one's cache never sees.
    other = fsspec.filesystem("s3", skip_instance_cache=True, **fs.storage_options)
    other.pipe_file(storage.filesystem(layout.staging_file("run", "v", 0))[1], b"chunk 0")
    layout.commit_video("v", "run", [0, 1], video_row("v", "run", chunks=2), [])
    assert storage.read_bytes(layout.frames_file("v", 0)) == b"chunk 0"
    assert layout.committed()["v"]["frame_files"] == ["part-00000.parquet", "part-00001.parquet"]


def test_a_rerun_sees_chunks_staged_after_this_process_last_listed_them(s3_env: str) -> None:
    """The planner runs in Ray workers that outlive a job: on a long-lived cluster, the worker that plans a
    rerun after a killed driver may have listed the video's staging directory before the killed run's actors
    staged their chunks. Its cached listing must not hide them (chunk-level resume would recompute them all)."""
    import fsspec

    layout = OutputLayout(f"{s3_env}/out")
    staging_dir = layout.staging_dir("run", "v")
    storage.write_bytes_atomic(layout.staging_file("run", "v", 0), b"rows")
    storage.write_bytes_atomic(layout.staging_summary("run", "v", 0), b"{}")
    assert staged_chunks(staging_dir) == {0}  # this process's client now holds a listing of chunk 0 alone
    fs, _ = storage.filesystem(staging_dir)
    other = fsspec.filesystem("s3", skip_instance_cache=True, **fs.storage_options)
    other.pipe_file(storage.filesystem(layout.staging_file("run", "v", 1))[1], b"rows")
    other.pipe_file(storage.filesystem(layout.staging_summary("run", "v", 1))[1], b"{}")
    assert staged_chunks(staging_dir) == {0, 1}
