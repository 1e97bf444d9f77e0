"""cluster/: the AWS launcher config, the KubeRay RayJobs, the shared runtime environment, and a rehearsal of
both jobs on a local two-node Ray cluster through the Jobs API.

The static tests hold the configs to Ray's own schema and to each other: the RayJobs' entrypoints are the
README's `ray job submit` commands (parsed by the jobs' real argument parsers), their runtimeEnvYAML is
cluster/runtime_env.yaml, and the resources the commands ask for fit the GPU nodes both clusters offer.

The rehearsal starts `ray start --head` plus a second node with `ray start --address` (separate processes,
ports, temp dirs and auth token; nothing in this pytest process connects to them) and submits the segment job
with the README's `ray job submit` command line and the train job with `JobSubmissionClient`. S3 is the test
SeaweedFS; its credentials are in the environment the nodes were started with, as an instance role or IRSA
would provide them on a real cluster, never in the runtime environment.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
README = REPO / "README.md"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
AWS = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
JOBS = {"segment": "cluster-segment-submit", "train": "cluster-train-submit"}  # job -> README marker
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
CREDENTIAL = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|aws_(access_key_id|secret_access_key)"
                        r"|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def readme_section() -> str:
    text = README.read_text()
    start = text.index("\n## Running on a cluster\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def readme_submit(job: str) -> tuple[list[str], list[str]]:
    """The README's `ray job submit` command for ``job``: (submit options, entrypoint), both as argv lists."""
    section = readme_section()
    marker = f"<!-- {JOBS[job]} -->"
    assert section.count(marker) == 1, f"README 'Running on a cluster' needs exactly one {marker}"
    after = section[section.index(marker) + len(marker):]
    block = re.match(r"\s*```bash\n(.*?)```", after, re.S)
    assert block, f"a ```bash block must follow {marker}"
    lines = re.sub(r"\\\n", " ", block.group(1)).splitlines()
    commands = [line for line in lines if line.strip().startswith("ray job submit")]
    assert len(commands) == 1, f"the block after {marker} must hold one `ray job submit`"
    argv = shlex.split(commands[0])
    assert argv[:3] == ["ray", "job", "submit"] and "--" in argv, argv
    split = argv.index("--")
    return argv[3:split], argv[split + 1:]


def job_parser(job: str):
    import argparse

    if job == "segment":
        from dcfm.segment.cli import add_arguments
    else:
        from dcfm.train.cli import add_arguments
    parser = argparse.ArgumentParser(prog=job, allow_abbrev=False)  # exact option names only
    add_arguments(parser)
    return parser


def parse_entrypoint(job: str, entrypoint: list[str]):
    assert entrypoint[:2] == ["python", f"jobs/{job}.py"], entrypoint
    assert (REPO / entrypoint[1]).is_file()
    return job_parser(job).parse_args(entrypoint[2:])


def rayjob(job: str) -> dict:
    return load_yaml(KUBERAY / f"{job}-job.yaml")


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1, "one GPU worker group"
    return groups[0]


def cpu_count(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dockerfile_ray_version() -> str:
    match = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert match, "cluster/Dockerfile must build FROM rayproject/ray:<version>-..."
    return match.group(1)


# ----------------------------------------------------------------------------------------- launcher (AWS)


def test_launcher_config_validates_against_rays_schema() -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(AWS)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before it talks to AWS: merge the provider's defaults, then validate again (schema,
    # head type among the node types, global max_workers >= the sum of min_workers).
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_has_a_cpu_head_and_gpu_workers_from_zero() -> None:
    config = load_yaml(AWS)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] > 0 and head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values()), "every worker type has GPUs"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
        assert node_type["max_workers"] <= config["max_workers"], name
    for name, node_type in types.items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::<ACCOUNT_ID>:instance-profile/[\w+=,.@-]+", profile), (name, profile)


def test_launcher_installs_the_project_on_every_node() -> None:
    config = load_yaml(AWS)
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {setuptools.get("package-dir", {}).get(p, p) for p in setuptools["packages"]}
    assert needed <= set(mounts.values()), f"pip install needs {sorted(needed - set(mounts.values()))} on the nodes"
    project_dir = {str(Path(remote).parent) for remote in mounts}
    assert len(project_dir) == 1, "all mounts under one project directory"
    setup = " && ".join(config["setup_commands"])
    assert "pip install" in setup and project_dir.pop() in setup
    pin = re.search(r"ray\[[^\]]*\]==(\d+\.\d+\.\d+)", setup)
    assert pin and pin.group(1) == dockerfile_ray_version(), "aws.yaml and cluster/Dockerfile install the same Ray"


# ------------------------------------------------------------------------------------- runtime environment


def test_runtime_env_is_valid_and_carries_no_credentials() -> None:
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    for heavy in (".git/", ".venv/", "demo-data/", "demo-output/"):
        assert heavy in env["excludes"], heavy
    assert env["env_vars"].get("RAY_TRAIN_V2_ENABLED") == "1"
    for key in env["env_vars"]:
        assert not re.search(r"AWS|SECRET|TOKEN|PASSWORD|KEY", key, re.I), f"no credentials in the runtime env: {key}"


# ------------------------------------------------------------------------------------------------ KubeRay


@pytest.mark.parametrize("job", sorted(JOBS))
def test_kuberay_rayjob_has_the_required_fields(job: str) -> None:
    manifest = rayjob(job)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert isinstance(manifest["metadata"]["name"], str) and manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert isinstance(spec["entrypoint"], str)
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # working_dir "." is the submitter's cwd
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["workingDir"] == "/home/ray/dcfm" and "WORKDIR /home/ray/dcfm" in (CLUSTER / "Dockerfile").read_text()

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == dockerfile_ray_version()
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    assert isinstance(head_container["image"], str) and head_container["image"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert cpu_count(head_container["resources"]["limits"]["cpu"]) >= 1

    group = gpu_group(spec)
    assert isinstance(group["groupName"], str) and isinstance(group["rayStartParams"], dict)
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert isinstance(group["maxReplicas"], int) and group["maxReplicas"] >= 1
    container = group["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    images = {head_container["image"], container["image"], submitter["image"]}
    assert len(images) == 1, f"one image for head, workers and submitter: {images}"

    account = load_yaml(KUBERAY / "service-account.yaml")["metadata"]["name"]
    assert head_pod["serviceAccountName"] == account, "the head (job driver) reads and writes S3 too"
    assert group["template"]["spec"]["serviceAccountName"] == account


@pytest.mark.parametrize("job", sorted(JOBS))
def test_kuberay_entrypoint_and_runtime_env_are_the_readmes(job: str) -> None:
    options, entrypoint = readme_submit(job)
    spec = rayjob(job)["spec"]
    assert shlex.split(spec["entrypoint"]) == entrypoint
    assert options[options.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == load_yaml(RUNTIME_ENV)


def test_image_holds_what_the_jobs_need() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copied = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        sources = [t for t in line.split() if not t.startswith("--")][:-1]
        copied |= set(sources)
    for source in copied:
        assert (REPO / source).exists(), f"cluster/Dockerfile copies {source}, which is not in the repository"
    # pip install needs the packages and the readme; the entrypoints need jobs/ (working_dir "." uploads it)
    needed = {"pyproject.toml", "README.md", "dcfm", "schemas", "jobs"}
    assert needed <= copied, f"the image lacks {sorted(needed - copied)}"


def test_service_account_maps_to_an_iam_role_through_irsa() -> None:
    account = load_yaml(KUBERAY / "service-account.yaml")
    assert account["apiVersion"] == "v1" and account["kind"] == "ServiceAccount"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::<ACCOUNT_ID>:role/[\w+=,.@-]+", role), role


# --------------------------------------------------------------------------------- README commands, sizing


@pytest.mark.parametrize("job", sorted(JOBS))
def test_readme_commands_parse_and_fit_both_clusters(job: str) -> None:
    _, entrypoint = readme_submit(job)
    args = parse_entrypoint(job, entrypoint)  # the jobs' own parsers: the README cannot drift from the CLI
    if job == "segment":
        gpus, cpus, count = args.gpus_per_actor, args.cpus_per_actor, args.actors[1]
        spare_cpu = 1  # Ray Data's probe/plan tasks need a CPU beside the actors
    else:
        gpus, cpus, count = args.gpus_per_worker, args.cpus_per_worker, args.workers
        spare_cpu = 0
    assert gpus > 0, "the cluster commands run on GPUs"

    group = gpu_group(rayjob(job)["spec"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod_gpus, pod_cpus = int(limits["nvidia.com/gpu"]), cpu_count(limits["cpu"])
    assert cpus + spare_cpu <= pod_cpus, f"{job}: {cpus} CPUs per GPU process + {spare_cpu} do not fit a {pod_cpus}-CPU pod"
    assert gpus <= pod_gpus
    assert count * gpus <= group["maxReplicas"] * pod_gpus, f"{job}: more GPUs than the KubeRay group can scale to"

    config = load_yaml(AWS)
    worker_types = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    fits = [t for t in worker_types if cpus + spare_cpu <= t["resources"]["CPU"] and gpus <= t["resources"]["GPU"]]
    assert fits, f"{job}: no aws.yaml worker type fits one GPU process"
    most = min(config["max_workers"], sum(t["max_workers"] * t["resources"]["GPU"] for t in fits))
    assert count * gpus <= most, f"{job}: more GPUs than aws.yaml can scale to"


def test_placeholders_are_documented_and_no_secrets_in_cluster_files() -> None:
    documented = set(PLACEHOLDER.findall(readme_section()))
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        missing = set(PLACEHOLDER.findall(text)) - documented
        assert not missing, f"{path.relative_to(REPO)}: placeholders {sorted(missing)} not documented in the README"
        assert not CREDENTIAL.search(text), f"{path.relative_to(REPO)} mentions a credential"


# ------------------------------------------------------------------------- local two-node rehearsal (slow)

RAY_BIN = Path(sys.executable).with_name("ray")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="teardown finds the cluster's processes in /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM `ray start` if pytest dies, so even a killed session leaves no cluster behind."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _proc_parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process, reuse or not.
    None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


class LocalRayCluster:
    """A Ray head and one more node on this machine, each a `ray start --block` process of ours.

    Everything is private to the instance: free ports (GCS, dashboard, client server, agents), random worker
    ports, a token (RAY_AUTH_MODE=token, so nothing else on the machine can submit to it), and one temp dir
    per node under ``root``. Separate temp dirs matter: with a shared one, the node that finishes with a job's
    working_dir deletes the copy the other node's driver still runs in. ``stop`` ends exactly these processes:
    SIGTERM to each `ray start --block`, which shuts its node down, then SIGKILL for anything of ours left —
    the descendants recorded before, and any process whose command line or working directory is under
    ``root`` (every Ray process of these nodes starts with its cwd there). Never `ray stop`: it kills every
    Ray on the machine, including the test session's own.
    """

    def __init__(self, node_env: dict[str, str], cpus_per_node: int = 1) -> None:
        # Short, under /tmp: Unix socket paths (root/h/session_<date>_<pid>/sockets/plasma_store) max 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dcfm-rc-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.cpus_per_node = cpus_per_node
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv's
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # no drain wait on SIGTERM: nothing to drain here
                   RAY_USAGE_STATS_ENABLED="0")
        env.update(node_env)
        self.env = env
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def submit_env(self) -> dict[str, str]:
        """Environment for a `ray job submit` subprocess aimed at this cluster."""
        env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
        env["RAY_ADDRESS"] = self.address
        return env

    def _start_node(self, name: str, options: list[str]) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        common = [
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
            f"--temp-dir={temp_dir}", "--object-store-memory=100000000", "--min-worker-port=0",
            "--max-worker-port=0", f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats",
            "--block",
        ]
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(
            [str(RAY_BIN), "start", *options, *common], cwd=temp_dir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        ))
        log.close()

    def start(self, timeout: float = 120) -> LocalRayCluster:
        self._start_node("h", [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
        ])
        self._wait_nodes(1, timeout)
        self._start_node("w", [f"--address=127.0.0.1:{self.gcs_port}"])
        self._wait_nodes(2, timeout)
        return self

    def _wait_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{self.logs()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, ValueError, KeyError):
                pass  # dashboard not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray node(s) not alive after {timeout:.0f}s:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def state(self, resource: str) -> list[dict]:
        """Ray's state API over HTTP (no ray.init in this process): /api/v0/nodes, /api/v0/actors, ..."""
        request = urllib.request.Request(f"{self.address}/api/v0/{resource}?limit=10000", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def wait_job(self, submission_id: str, timeout: float) -> str:
        """Wait for a job to end; fail with its log unless it SUCCEEDED. Returns the log."""
        from ray.job_submission import JobStatus

        client = self.client()
        deadline = time.monotonic() + timeout
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                break
            time.sleep(1)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, f"job {submission_id}: {status}\n{logs[-6000:]}"
        return logs

    # -- teardown -----------------------------------------------------------------------------------

    def _descendants(self, pids: list[int]) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid in _all_pids():
            parent = _proc_parent(pid)
            if parent is not None:
                children.setdefault(parent, []).append(pid)
        found, todo = set(), list(pids)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        return found

    def _marked(self) -> set[int]:
        """Processes whose command line or working directory is under ``root``: ours even if orphaned."""
        root, found = str(self.root), set()
        for pid in _all_pids():
            if pid == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if root in cmdline or cwd == root or cwd.startswith(root + "/"):
                found.add(pid)
        return found

    def processes(self) -> dict[int, str]:
        """Every live process of this cluster: pid -> start time."""
        pids = self._descendants([p.pid for p in self.procs]) | self._marked()
        return {pid: started for pid in pids if (started := _started(pid)) is not None}

    def stop(self, timeout: float = 30) -> set[int]:
        """Stop both nodes; returns the pids still alive afterwards (empty when clean)."""
        known = self.processes()

        def alive() -> set[int]:  # what we knew before, unless its pid now names another process, and new ones
            current = self.processes()
            return {pid for pid, started in known.items() if _started(pid) == started} | set(current)
        for proc in reversed(self.procs):  # the worker node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # did not stop with their node: ours all the same
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        remaining = alive()
        if not remaining:
            shutil.rmtree(self.root, ignore_errors=True)
        return remaining


@pytest.fixture(scope="module")
def s3_bucket(s3_server) -> Iterator[str]:
    client = s3_server.client()
    bucket = f"dcfm-cluster-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield bucket
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
    except Exception:
        pass


@pytest.fixture(scope="module")
def ray_cluster(s3_server) -> Iterator[LocalRayCluster]:
    if not RAY_BIN.is_file():
        pytest.fail(f"no `ray` next to {sys.executable}: install the project (ray[default]) into this interpreter")
    # The S3 endpoint and keys go into the nodes' environment: what an instance role / IRSA is on AWS.
    cluster = LocalRayCluster(node_env=s3_server.env_vars())
    try:
        cluster.start()
        assert len(cluster.alive_nodes()) == 2
        yield cluster
    finally:
        remaining = cluster.stop()
        assert not remaining, f"processes of the local Ray cluster survived teardown: {sorted(remaining)}"


def upload_dir(client, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def download_prefix(client, bucket: str, prefix: str, target: Path) -> Path:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):  # a "directory" marker object, as some writers leave
                continue
            path = target / item["Key"][len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(path))
    return target


@pytest.mark.slow
@linux_only
def test_segment_job_submitted_with_the_readme_command(ray_cluster, s3_server, s3_bucket, tmp_path) -> None:
    import torch

    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.model import DCFM, DCFMConfig
    from dcfm.segment.outputs import MARKER_FORMAT
    from dcfm.synth import SynthConfig, generate_corpus

    frames = 12
    generate_corpus(tmp_path / "corpus", SynthConfig(videos=2, frames=frames, height=48, width=96, seed=5))
    torch.manual_seed(0)
    config = DCFMConfig("pvt_v2_b0", num_classes=8)
    card = ModelCard(config, [f"c{i}" for i in range(8)], [(i * 30,) * 3 for i in range(8)], (32, 64))
    save_checkpoint(tmp_path / "model", DCFM(config).eval(), card)
    s3 = s3_server.client()
    upload_dir(s3, tmp_path / "corpus" / "videos", s3_bucket, "videos")
    upload_dir(s3, tmp_path / "model", s3_bucket, "models/m0")

    # The README's command, scaled down: same runtime env file, same entrypoint script, run from the repo root.
    options, readme_entrypoint = readme_submit("segment")
    entrypoint = ["python", "jobs/segment.py", f"s3://{s3_bucket}/videos/", "--output", f"s3://{s3_bucket}/seg/run1",
                  "--checkpoint", f"s3://{s3_bucket}/models/m0", "--actors", "1,2", "--chunk-frames", "4"]
    assert entrypoint[:2] == readme_entrypoint[:2]
    submission_id = f"dcfm-segment-{uuid.uuid4().hex[:8]}"
    submit = [str(RAY_BIN), "job", "submit", *options, "--submission-id", submission_id, "--no-wait", "--", *entrypoint]
    done = subprocess.run(submit, cwd=REPO, env=ray_cluster.submit_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"
    logs = ray_cluster.wait_job(submission_id, timeout=240)
    assert "2 ok, 0 empty, 0 failed" in logs, logs[-3000:]

    out = download_prefix(s3, s3_bucket, "seg/run1", tmp_path / "out")
    videos = pq.read_table(out / "videos").to_pylist()
    assert len(videos) == 2 and {v["status"] for v in videos} == {"ok"}
    for video in videos:
        video_id = video["video_id"]
        marker = json.loads((out / "_commits" / f"{video_id}.json").read_text())  # written last
        assert marker["format"] == MARKER_FORMAT and marker["status"] == "ok", marker
        rows = pq.read_table(out / "frames" / f"video_id={video_id}").to_pylist()
        assert sorted(r["frame_index"] for r in rows) == list(range(frames)), video_id
    staging = out / "_staging"
    assert not staging.exists() or not list(staging.rglob("*.parquet")), "staging is emptied as videos commit"
    job = ray_cluster.client().get_job_info(submission_id)
    actors = [a for a in ray_cluster.state("actors") if a["job_id"] == job.job_id and "ChunkSegmenter" in a["class_name"]]
    assert actors, "the segment actors ran on the cluster"


@pytest.mark.slow
@linux_only
def test_train_job_submitted_through_the_jobs_api(ray_cluster, s3_server, s3_bucket, tmp_path) -> None:
    from dcfm.checkpoint import load_checkpoint
    from dcfm.synth import SynthConfig, generate_corpus

    generate_corpus(tmp_path / "corpus", SynthConfig(videos=2, frames=8, height=48, width=96, seed=7))
    s3 = s3_server.client()
    upload_dir(s3, tmp_path / "corpus", s3_bucket, "data/synth")

    runtime_env = load_yaml(RUNTIME_ENV)
    runtime_env["working_dir"] = str(REPO)  # "." of `ray job submit` run from the repository root
    _, readme_entrypoint = readme_submit("train")
    steps = 4
    entrypoint = ["python", "jobs/train.py", "--data", f"s3://{s3_bucket}/data/synth", "--output",
                  f"s3://{s3_bucket}/train/run1", "--backbone", "pvt_v2_b0", "--workers", "2", "--cpus-per-worker", "1",
                  "--steps", str(steps), "--batch-size", "1", "--crop", "32x64", "--checkpoint-every", "2",
                  "--log-every", "2"]
    assert entrypoint[:2] == readme_entrypoint[:2]
    client = ray_cluster.client()
    submission_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                                      submission_id=f"dcfm-train-{uuid.uuid4().hex[:8]}")
    logs = ray_cluster.wait_job(submission_id, timeout=300)
    assert f"finished step {steps}/{steps}" in logs, logs[-3000:]

    out = download_prefix(s3, s3_bucket, "train/run1", tmp_path / "run")
    record = json.loads((out / "dcfm-train.json").read_text())
    assert record["status"] == "finished" and record["step"] == steps
    assert (out / f"checkpoint_{steps:06d}" / "train_state.json").is_file()
    loaded = load_checkpoint(out / "final")
    assert loaded.card.config.backbone == "pvt_v2_b0"
    # Two workers of one CPU on two one-CPU nodes: DDP across both nodes.
    job = client.get_job_info(submission_id)
    workers = [a for a in ray_cluster.state("actors") if a["job_id"] == job.job_id and a["class_name"] == "RayTrainWorker"]
    assert len({a["node_id"] for a in workers}) == 2, workers
