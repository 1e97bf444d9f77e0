import uuid
from collections.abc import Iterator

import pytest
import torch

from tests.s3server import S3Server


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS (S3 gateway on 127.0.0.1) for the whole session.

    Yields an object with ``endpoint_url``, ``access_key``, ``secret_key`` (plus ``client()`` for a boto3
    client and ``env_vars()``). Startup takes a few seconds, paid once per session.
    """
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the AWS environment at the test S3 server and yield ``s3://<fresh bucket>``.

    The variables are set with ``monkeypatch.setenv``, i.e. in ``os.environ`` of the test process, so a
    ``ray.init`` started inside the test after this fixture hands them to its workers by inheritance. For
    a Ray cluster started elsewhere pass ``runtime_env={"env_vars": aws_env_vars()}`` (``tests/s3server.py``).
    """
    import s3fs

    for key, value in s3_server.env_vars().items():
        monkeypatch.setenv(key, value)
    # Anything else in the chain (a profile, a session token) must not mix into the test credentials.
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    # s3fs caches filesystem instances (and their endpoint/credentials) by constructor arguments, which
    # do not include the environment.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"dcfm-test-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
    # Each bucket holds several SeaweedFS volumes; drop it so long sessions do not run out.
    try:
        client.delete_bucket(Bucket=bucket)
    except Exception:
        pass


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[None]:
    """A real local Ray (2 CPUs) for the session.

    Its raylet, and so every worker it ever starts, inherits the environment of ``ray.init``: the test S3
    server's AWS variables are set just for that call, as an instance role or node environment would
    provide them on a real cluster.
    """
    import ray

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env_vars().items():
            patch.setenv(key, value)
        # address="local": always a new cluster, never one a `ray start` elsewhere on this machine left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
