"""Archive containers, cut-short files, presigned URLs and a --pretrained checkpoint through the real segment job
(real local Ray, real SeaweedFS for the presigned URL)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dcfm import storage
from dcfm.checkpoint import ModelCard, read_card, save_checkpoint
from dcfm.errors import ExitCode
from dcfm.inference import KeyframePolicy
from dcfm.model import DCFM, DCFMConfig
from dcfm.schemas import output_schema
from dcfm.segment.config import SegmentJobConfig
from dcfm.segment.job import run_segment_job
from tests.test_inputs_security import cut, write_video

pytestmark = pytest.mark.slow

H, W = 32, 64


@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory) -> str:
    """A checkpoint whose card says its backbone started from ImageNet weights (`dcfm train --pretrained`): actors
    must load it from its own weights, without trying the timm hub (no network here: that would stall and fail)."""
    import torch

    torch.manual_seed(0)
    config = DCFMConfig("pvt_v2_b0", num_classes=4)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, DCFM(config).eval(), ModelCard(config, list("abcd"), [(i * 60,) * 3 for i in range(4)], (H, W)))
    card = json.loads((path / "dcfm.json").read_text())
    card["config"]["pretrained_backbone"] = True
    (path / "dcfm.json").write_text(json.dumps(card))
    assert read_card(path)[0].config.pretrained_backbone
    return str(path)


def job(inputs, output, checkpoint, **kwargs) -> SegmentJobConfig:
    return SegmentJobConfig([str(i) for i in inputs], str(output), checkpoint, keyframes=KeyframePolicy(interval=3),
                            chunk_frames=6, progress_interval_s=3600, **kwargs)


def read_table(root: Path | str, name: str):
    fs, path = storage.filesystem(storage.join(str(root), name))
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def test_an_archive_of_containers_is_segmented_and_the_rest_reported(ray_local, pretrained_checkpoint, tmp_path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    videos = {
        "a.mpg": write_video(archive / "a.mpg", "mpeg", "mpeg2video", 10),
        "b.m2ts": write_video(archive / "b.m2ts", "mpegts", "libx264", 10, {"mpegts_m2ts_mode": "1"}),
        "c.mxf": write_video(archive / "c.mxf", "mxf", "mpeg2video", 10),
        "D.MOV": write_video(archive / "D.MOV", "mov", "libx264", 10),  # an upper-case extension
    }
    whole = write_video(tmp_path / "e.mkv", "matroska", "libx264", 40)
    videos["cut_e.mkv"] = cut(whole, 0.5).rename(archive / "cut_e.mkv")  # a recording cut short
    (archive / "notes.txt").write_text("shot list\n")
    lines: list[str] = []
    summary = run_segment_job(job([archive], tmp_path / "out", pretrained_checkpoint), log=lines.append)

    assert summary.exit_code is ExitCode.OK and summary.ok == len(videos) and summary.failed == 0
    rows = {Path(r["video_uri"]).name: r for r in read_table(tmp_path / "out", "videos").to_pylist()}
    assert set(rows) == set(videos)
    frames = read_table(tmp_path / "out", "frames").to_pylist()
    for name, row in rows.items():
        mine = sorted(f["frame_index"] for f in frames if f["video_id"] == row["video_id"])
        assert mine == list(range(row["frame_count"])), name
        assert row["status"] == "ok"
    assert all(rows[n]["frame_count"] == 10 and rows[n]["warning"] is None for n in ("a.mpg", "b.m2ts", "c.mxf", "D.MOV"))
    assert 5 < rows["cut_e.mkv"]["frame_count"] < 40 and rows["cut_e.mkv"]["warning"].startswith("cut short")
    fs, path = storage.filesystem(storage.join(str(tmp_path / "out"), "videos"))
    written = pq.read_schema(next(iter(Path(path).rglob("*.parquet"))))
    assert written.metadata[b"dcfm.schema_version"] == str(output_schema("videos").version).encode() == b"2"

    # The .txt beside them is counted, named, and said in the log, the summary and the run manifest.
    assert summary.skipped_files == 1 and summary.skipped_file_examples == [str(archive / "notes.txt")]
    assert any("skipped 1 file(s)" in line and "notes.txt" in line for line in lines)
    assert any("1 file(s) in the inputs skipped" in line for line in lines)
    assert any("WARNING" in line and "cut_e.mkv" in line and "cut short" in line for line in lines)
    [manifest_path] = (tmp_path / "out" / "runs").rglob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"]["skipped_files"] == 1 and manifest["skipped_file_examples"] == [str(archive / "notes.txt")]
    assert list(manifest["warnings"].values())[0].startswith("cut short")


def all_text(root: Path) -> str:
    """Everything under ``root`` as text: Parquet files as their decoded rows, others as they are."""
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        else:
            parts.append(path.read_bytes().decode(errors="replace"))
    return "\n".join(parts)


def test_a_presigned_urls_query_string_appears_nowhere(ray_local, pretrained_checkpoint, tmp_path, s3_server,
                                                      s3_env) -> None:
    """A manifest of presigned HTTP URLs (real SigV4 signatures from the S3 server), allowed with
    --allow-protocols http: the video is segmented, the missing one fails with its row, and neither signature
    nor credential reaches the log, the rows, the markers, the run manifest or Ray's own logs."""
    import ray

    import boto3
    from botocore.config import Config

    bucket = s3_env.removeprefix("s3://")
    clip = write_video(tmp_path / "clip.mp4", "mp4", "libx264", 8)
    s3_server.client().put_object(Bucket=bucket, Key="raw/clip.mp4", Body=clip.read_bytes())
    # SigV4 (X-Amz-Signature, X-Amz-Credential) for the video, SigV2 (Signature, AWSAccessKeyId) for a missing one.
    urls = [
        boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                     aws_secret_access_key=s3_server.secret_key, region_name="us-east-1",
                     config=Config(signature_version=version)).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
        for version, key in (("s3v4", "raw/clip.mp4"), ("s3", "raw/gone.mp4"))
    ]
    queries = [url.split("?", 1)[1] for url in urls]
    secrets = [value for query in queries for name, value in (part.split("=", 1) for part in query.split("&"))
               if name in ("X-Amz-Signature", "X-Amz-Credential", "Signature")]
    assert len(secrets) == 3 and all(len(value) > 20 for value in secrets)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(urls) + "\n")

    lines: list[str] = []
    out = tmp_path / "out"
    summary = run_segment_job(job([manifest], out, pretrained_checkpoint, allow_protocols=("http",)), log=lines.append)
    assert summary.ok == 1 and summary.failed == 1 and summary.exit_code is ExitCode.INPUTS_FAILED
    videos = {r["video_uri"]: r for r in read_table(out, "videos").to_pylist()}
    assert set(videos) == {url.split("?", 1)[0] for url in urls}
    assert videos[urls[0].split("?")[0]]["frame_count"] == 8
    [error] = read_table(out, "errors").to_pylist()
    assert error["video_uri"] == urls[1].split("?")[0] and "gone.mp4" in error["message"]

    text = all_text(out)
    assert "clip.mp4" in text and "gone.mp4" in text
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())  # the workers' and actors' logs
    ray_logs = "\n".join(p.read_bytes().decode(errors="replace") for p in logs_dir.rglob("*") if p.is_file())
    for secret in secrets:
        assert not any(secret in line for line in lines), secret
        assert secret not in text, secret
        assert secret not in ray_logs, secret
    for query in queries:
        assert query not in text and not any(query in line for line in lines)
