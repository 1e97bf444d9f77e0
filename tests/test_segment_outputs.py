"""The output layout's bulk operations, on local disk (the job tests cover S3)."""

from pathlib import Path

from dcfm import storage
from dcfm.segment.outputs import OutputLayout


def commit(layout: OutputLayout, video_id: str, run_id: str) -> None:
    storage.write_bytes_atomic(layout.staging_file(run_id, video_id, 0), b"chunk")
    row = {
        "video_id": video_id, "video_uri": f"/v/{video_id}.mp4", "status": "ok", "error": None, "frame_count": 1,
        "fps": 1.0, "codec": "h264", "width": 2, "height": 2, "duration_s": 1.0, "chunks": 1, "keyframes": 1,
        "mean_confidence": 1.0, "mean_label_change_rate": None, "mean_keyframe_agreement": None, "seconds": 0.0,
        "run_id": run_id, "model_digest": "d", "warning": None,
    }
    layout.commit_video(video_id, run_id, [0], row, [])


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


def test_missing_files_names_what_a_marker_lists_but_is_gone(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    for i in range(20):
        commit(layout, f"v{i}", "run")
    markers = layout.committed()
    assert layout.missing_files(list(markers.values())) == {}
    Path(layout.frames_file("v3", 0)).unlink()
    Path(storage.join(layout.videos_dir("v5"), "part-0.parquet")).unlink()
    (tmp_path / "frames" / "video_id=v9" / "part-00000.parquet").rename(tmp_path / "frames" / "video_id=v9" / "x")
    missing = layout.missing_files(list(markers.values()))
    assert missing == {"v3": [layout.frames_file("v3", 0)],
                       "v5": [storage.join(layout.videos_dir("v5"), "part-0.parquet")],
                       "v9": [layout.frames_file("v9", 0)]}


def test_marker_is_one_json_line(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    commit(layout, "v1", "run")
    text = Path(layout.marker("v1")).read_text()
    assert text.endswith("\n") and text.count("\n") == 1
