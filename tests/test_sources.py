"""Input expansion: local trees, globs, manifests, S3 prefixes/globs/manifests (real SeaweedFS)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcfm.sources import InputItem, expand_inputs, video_id_for

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{8}")


def touch(path: Path, data: bytes = b"\x00") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    for rel in [
        "a/clip.mp4",
        "a/b/clip.mp4",  # same name in another folder: ids must differ
        "a/b/deep/z.MKV",  # extension match is case-insensitive
        "c/x.webm",
        "c/notes.txt",  # not a video, and inside a tree not a manifest
        "c/frame.png",
        "c/._x.webm",  # macOS resource fork
        ".hidden/y.mp4",
        "top.ts",
    ]:
        touch(root / rel)
    (root / "empty").mkdir()
    return root


def uris(items: list[InputItem]) -> list[str]:
    return [item.uri for item in items]


def test_directory_is_recursive_sorted_and_filtered(tree: Path) -> None:
    items = expand_inputs([str(tree)])
    assert uris(items) == sorted(
        str(tree / rel) for rel in ["a/clip.mp4", "a/b/clip.mp4", "a/b/deep/z.MKV", "c/x.webm", "top.ts"]
    )
    assert all(ID_RE.fullmatch(item.video_id) for item in items)
    assert len({item.video_id for item in items}) == len(items)


def test_relative_paths_become_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    [item] = expand_inputs(["a/clip.mp4"])
    assert item.uri == str(tree / "a/clip.mp4") and os.path.isabs(item.uri)
    assert item.video_id == video_id_for(str(tree / "a/clip.mp4"))


def test_globs(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert uris(expand_inputs([str(tree / "a" / "*.mp4")])) == [str(tree / "a/clip.mp4")]
    recursive = expand_inputs([str(tree / "**" / "*")])
    assert uris(recursive) == uris(expand_inputs([str(tree)]))
    monkeypatch.chdir(tree)
    assert uris(expand_inputs(["a/**/*.mp4"])) == sorted([str(tree / "a/clip.mp4"), str(tree / "a/b/clip.mp4")])


def test_glob_and_empty_directory_errors_name_the_input(tree: Path) -> None:
    with pytest.raises(ValueError, match=r"empty.*no video files.*manifest"):
        expand_inputs([str(tree / "empty")])
    with pytest.raises(ValueError, match=r"\*\.avi.*glob matches nothing"):
        expand_inputs([str(tree / "*.avi")])
    with pytest.raises(ValueError, match=r"none a video file"):
        expand_inputs([str(tree / "c" / "*.png")])
    with pytest.raises(ValueError, match="missing_dir.*no such file, directory or prefix"):
        expand_inputs([str(tree / "missing_dir")])
    with pytest.raises(ValueError, match="no inputs"):
        expand_inputs([])


def test_explicit_files_are_kept(tree: Path) -> None:
    # Named explicitly: unusual extensions and files that do not exist (the job records the failure).
    items = expand_inputs([str(tree / "c/frame.png"), str(tree / "gone.mp4"), str(tree / ".hidden/y.mp4")])
    assert uris(items) == [str(tree / "c/frame.png"), str(tree / "gone.mp4"), str(tree / ".hidden/y.mp4")]


def test_duplicates_keep_first_occurrence(tree: Path) -> None:
    items = expand_inputs([str(tree / "top.ts"), str(tree), str(tree / "a/clip.mp4"), f"file://{tree}/top.ts"])
    assert items[0].uri == str(tree / "top.ts")
    assert len(uris(items)) == len(set(uris(items))) == 5
    assert uris(items)[1:] == [u for u in uris(expand_inputs([str(tree)])) if u != str(tree / "top.ts")]


def test_txt_manifest(tree: Path, tmp_path: Path) -> None:
    manifest = tree / "lists" / "batch.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "# videos for tonight\n"
        "\n"
        "../a/clip.mp4\n"
        "   ../c/x.webm   \n"
        f"{tree / 'top.ts'}\n"
        "# ../a/b/clip.mp4\n"
        "s3://somewhere/else.mp4\n"
        "../not-there.mkv\n"
    )
    items = expand_inputs([str(manifest)])
    assert uris(items) == [
        str(tree / "a/clip.mp4"),
        str(tree / "c/x.webm"),
        str(tree / "top.ts"),
        "s3://somewhere/else.mp4",
        str(tree / "not-there.mkv"),
    ]
    (tree / "lists" / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="empty.txt: manifest lists no inputs"):
        expand_inputs([str(tree / "lists" / "empty.txt")])
    with pytest.raises(ValueError, match="manifest not found"):
        expand_inputs([str(tree / "lists" / "nope.txt")])


def test_parquet_manifest(tree: Path) -> None:
    manifest = tree / "batch.parquet"
    pq.write_table(
        pa.table({"uri": ["a/clip.mp4", str(tree / "c/x.webm")], "video_id": ["first", None]}), manifest
    )
    items = expand_inputs([str(manifest)])
    assert items == [
        InputItem(str(tree / "a/clip.mp4"), "first"),
        InputItem(str(tree / "c/x.webm"), video_id_for(str(tree / "c/x.webm"))),
    ]
    pq.write_table(pa.table({"path": ["a/clip.mp4"]}), manifest)
    with pytest.raises(ValueError, match="needs a 'uri' column"):
        expand_inputs([str(manifest)])
    pq.write_table(pa.table({"uri": ["a/clip.mp4"], "video_id": ["x/../y"]}), manifest)
    with pytest.raises(ValueError, match="not partition-safe"):
        expand_inputs([str(manifest)])
    pq.write_table(pa.table({"uri": ["a/clip.mp4", "c/x.webm"], "video_id": ["same", "same"]}), manifest)
    with pytest.raises(ValueError, match="'same' is used for both"):
        expand_inputs([str(manifest)])


def test_video_id_is_stable_safe_and_collision_free() -> None:
    a = video_id_for("/data/one/clip.mp4")
    assert a == video_id_for("/data/one/clip.mp4")
    assert a.startswith("clip-") and ID_RE.fullmatch(a)
    assert a != video_id_for("/data/two/clip.mp4")
    assert video_id_for("s3://b/k/clip.mp4") != video_id_for("s3://c/k/clip.mp4")
    for weird in ["/d/my video (1)=final.mp4", "/d/.hidden.mp4", "/d/ümlaut.mov", "s3://b/=/x=y.ts", "/d/.mp4"]:
        vid = video_id_for(weird)
        assert ID_RE.fullmatch(vid), (weird, vid)
    assert video_id_for("/d/my video (1)=final.mp4").startswith("my_video_1_final-")
    assert len(video_id_for("/d/" + "x" * 300 + ".mp4")) <= 64 + 9
    many = {video_id_for(f"/data/{i}/clip.mp4") for i in range(5000)}
    assert len(many) == 5000


# --- the same against a real S3 server -----------------------------------------------------------------


@pytest.fixture
def s3_tree(s3_server, s3_env: str) -> str:
    client = s3_server.client()
    bucket = s3_env.removeprefix("s3://")
    for key in ["raw/a/clip.mp4", "raw/b/clip.mp4", "raw/b/deep/z.mkv", "raw/notes.txt", "raw/.cache/y.mp4", "other/q.mov"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"\x00")
    return s3_env


def test_s3_prefix(s3_tree: str) -> None:
    expected = [f"{s3_tree}/raw/a/clip.mp4", f"{s3_tree}/raw/b/clip.mp4", f"{s3_tree}/raw/b/deep/z.mkv"]
    assert uris(expand_inputs([f"{s3_tree}/raw/"])) == expected
    assert uris(expand_inputs([f"{s3_tree}/raw"])) == expected  # a prefix without the trailing slash
    assert uris(expand_inputs([s3_tree])) == sorted([*expected, f"{s3_tree}/other/q.mov"])
    with pytest.raises(ValueError, match="nothing/.*prefix holds no video files"):
        expand_inputs([f"{s3_tree}/nothing/"])
    with pytest.raises(ValueError, match="prefix holds no video files"):
        expand_inputs([f"{s3_tree}/raw/"], extensions=(".avi",))


def test_s3_explicit_objects_are_kept(s3_tree: str) -> None:
    items = expand_inputs([f"{s3_tree}/raw/notes.txt.bak", f"{s3_tree}/raw/a/clip.mp4", f"{s3_tree}/missing.mp4"])
    assert uris(items) == [f"{s3_tree}/raw/notes.txt.bak", f"{s3_tree}/raw/a/clip.mp4", f"{s3_tree}/missing.mp4"]


def test_s3_glob(s3_tree: str) -> None:
    assert uris(expand_inputs([f"{s3_tree}/raw/*/clip.mp4"])) == [
        f"{s3_tree}/raw/a/clip.mp4",
        f"{s3_tree}/raw/b/clip.mp4",
    ]
    assert uris(expand_inputs([f"{s3_tree}/raw/**/*.mkv"])) == [f"{s3_tree}/raw/b/deep/z.mkv"]
    with pytest.raises(ValueError, match="glob matches nothing"):
        expand_inputs([f"{s3_tree}/raw/*.avi"])


def test_s3_parquet_and_txt_manifests(s3_server, s3_tree: str) -> None:
    client = s3_server.client()
    bucket = s3_tree.removeprefix("s3://")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"uri": ["a/clip.mp4", "../other/q.mov", "s3://elsewhere/v.mp4"]}), buffer)
    client.put_object(Bucket=bucket, Key="raw/manifest.parquet", Body=buffer.getvalue())
    client.put_object(Bucket=bucket, Key="raw/list.txt", Body=b"# one\nb/clip.mp4\n\n")
    items = expand_inputs([f"{s3_tree}/raw/manifest.parquet", f"{s3_tree}/raw/list.txt"])
    assert uris(items) == [
        f"{s3_tree}/raw/a/clip.mp4",
        f"{s3_tree}/other/q.mov",
        "s3://elsewhere/v.mp4",
        f"{s3_tree}/raw/b/clip.mp4",
    ]
    assert items[0].video_id != items[3].video_id  # both clip.mp4
    with pytest.raises(ValueError, match="manifest not found"):
        expand_inputs([f"{s3_tree}/raw/missing.parquet"])
