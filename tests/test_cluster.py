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
import json
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.raycluster import RAY_BIN, LocalRayCluster

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
    packages = {pattern.split(".")[0] for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    # A link inside a package (dcfm/output_schemas -> schemas) installs what it points at: that goes too.
    linked = {str(p.resolve().relative_to(REPO)) for top in packages for p in (REPO / top).rglob("*") if p.is_symlink()}
    needed = {"pyproject.toml", pyproject["project"]["readme"]} | packages | linked
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

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="teardown finds the cluster's processes in /proc")


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
