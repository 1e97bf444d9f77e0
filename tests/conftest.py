from collections.abc import Iterator

import pytest
import torch

from tests.s3server import S3Server, s3_bucket


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
    """The AWS environment pointed at the test S3 server, and ``s3://<fresh bucket>`` (see ``s3_bucket``)."""
    with s3_bucket(s3_server, monkeypatch) as uri:
        yield uri


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
