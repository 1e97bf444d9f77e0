"""dcfm.storage and checkpoints against local disk and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from dcfm import storage
from dcfm.checkpoint import ModelCard, is_checkpoint, load_checkpoint, save_checkpoint
from dcfm.model import DCFM, DCFMConfig

from tests.s3server import aws_env_vars


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env")


def _bucket_objects(s3_server, bucket_uri: str) -> dict[str, bytes]:
    client = s3_server.client()
    bucket = bucket_uri.removeprefix("s3://")
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            objects[entry["Key"]] = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
    return objects


def test_join_uses_slashes() -> None:
    assert storage.join("s3://bucket/", "/a/", "b.bin") == "s3://bucket/a/b.bin"
    assert storage.join("/tmp/x", "y", "z") == "/tmp/x/y/z"


def test_round_trip(base: str) -> None:
    uri = storage.join(base, "nested", "dir", "blob.bin")
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="blob.bin"):
        storage.read_bytes(uri)
    storage.write_bytes_atomic(uri, b"first")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"first"
    storage.write_bytes_atomic(uri, b"second, longer")  # overwrite replaces the whole object
    assert storage.read_bytes(uri) == b"second, longer"
    if base.startswith("/"):
        leftovers = [p for p in os.listdir(os.path.dirname(uri)) if p.endswith(".tmp")]
        assert leftovers == []


def test_s3_writes_land_on_the_test_server(s3_server, s3_env: str) -> None:
    # s3fs must take the endpoint from AWS_ENDPOINT_URL alone: nothing else points it at SeaweedFS.
    storage.write_bytes_atomic(storage.join(s3_env, "probe.txt"), b"hello")
    assert _bucket_objects(s3_server, s3_env) == {"probe.txt": b"hello"}


def test_multipart_upload(s3_server, s3_env: str) -> None:
    uri = storage.join(s3_env, "big", "blob.bin")
    block = 5 * 2**20  # S3's minimum part size
    data = os.urandom(2 * block + 12345)
    fs, path = storage.filesystem(uri)
    with fs.open(path, "wb", block_size=block) as handle:
        for start in range(0, len(data), 2**20):
            handle.write(data[start:start + 2**20])
    head = s3_server.client().head_object(Bucket=s3_env.removeprefix("s3://"), Key="big/blob.bin")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"], f"expected a multipart ETag, got {head['ETag']}"
    assert hashlib.sha256(storage.read_bytes(uri)).digest() == hashlib.sha256(data).digest()


def test_checkpoint_round_trip_on_s3(s3_server, s3_env: str) -> None:
    config = DCFMConfig("pvt_v2_b0", num_classes=3)
    model = DCFM(config).eval()
    card = ModelCard(config, ["a", "b", "c"], [(0, 0, 0), (1, 1, 1), (2, 2, 2)], train_size=(64, 64))
    uri = storage.join(s3_env, "ckpt")
    digest = save_checkpoint(uri, model, card)
    assert is_checkpoint(uri)
    loaded = load_checkpoint(uri)
    assert loaded.digest == digest and loaded.card == card
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))

    objects = _bucket_objects(s3_server, s3_env)
    assert set(objects) == {"ckpt/model.safetensors", "ckpt/dcfm.json"}
    for key, body in objects.items():
        assert s3_server.secret_key.encode() not in body, f"{key} contains the S3 secret key"
        assert s3_server.access_key.encode() not in body, f"{key} contains the S3 access key"


def test_child_processes_inherit_the_s3_environment(s3_server, s3_env: str) -> None:
    # What Ray workers started inside a test rely on: s3_env sets os.environ, children inherit it.
    uri = storage.join(s3_env, "from-parent.bin")
    storage.write_bytes_atomic(uri, b"parent")
    code = f"from dcfm import storage; import sys; sys.stdout.write(storage.read_bytes({uri!r}).decode())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "parent"
    assert aws_env_vars() == s3_server.env_vars()


def test_credentials_never_reach_logs() -> None:
    """Every job logs and records URIs through storage.redact."""
    assert storage.redact("s3://AKIA:secret@bucket/key.mp4") == "s3://bucket/key.mp4"
    assert storage.redact("https://user:pw@host:9000/b/k") == "https://host:9000/b/k"
    assert storage.redact("/data/x.mp4") == "/data/x.mp4"


def test_atomic_writes_publish_files_with_the_usual_mode(tmp_path) -> None:
    """Outputs on a shared disk must be readable by the team, not left at mkstemp's private 0600."""
    import os
    import stat

    from dcfm.storage import write_bytes_atomic

    mask = os.umask(0o022)
    try:
        write_bytes_atomic(str(tmp_path / "a" / "marker.json"), b"{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a" / "marker.json").stat().st_mode) == 0o644
