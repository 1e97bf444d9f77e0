"""Autoscaling rehearsal: both jobs on a cluster whose autoscaler adds GPU nodes from zero and removes them.

The head has no GPU; the one worker node type is cluster/aws.yaml's GPU worker type (its GPUs and min_workers,
checked against the KubeRay RayJobs' GPU groups), scaled down to this machine: 1 CPU per node, at most 2 nodes,
a 6-second idle timeout. Ray's fake multi-node provider launches each node as a real raylet with a GPU resource
and no GPU (tests/autoscalingcluster.py), so the model runs on CPU (the jobs pick the device at run time).
Both jobs go through the Jobs API with GPU requests, as on the real cluster; the test follows the GPU nodes
through Ray's state API: none before, two while the work waits for them, none after the idle timeout.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.model import DCFM, DCFMConfig
from dcfm.synth import SynthConfig, generate_corpus
from tests.autoscalingcluster import FakeAutoscalingCluster
from tests.raycluster import RAY_BIN
from tests.test_cluster import AWS, JOBS, RUNTIME_ENV, gpu_group, load_yaml, rayjob
from tests.test_segment_job import frame_rows

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="teardown finds the cluster's processes in /proc")]

REPO = Path(__file__).resolve().parents[1]
MAX_NODES = 2  # this machine's share of aws.yaml's max_workers
IDLE_TIMEOUT_MIN = 0.1


def rehearsal_node_type() -> tuple[str, dict]:
    """cluster/aws.yaml's GPU worker type, scaled to this machine; it must agree with the RayJobs' GPU groups."""
    config = load_yaml(AWS)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0, "aws.yaml: the head has no GPU"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(workers) == 1, "the rehearsal mirrors aws.yaml's one GPU worker type"
    (name, node_type), = workers.items()
    gpus = node_type["resources"]["GPU"]
    for job in JOBS:
        group = gpu_group(rayjob(job)["spec"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == gpus, f"{job}-job.yaml's GPU pods and aws.yaml's {name} differ"
        assert group["minReplicas"] == node_type["min_workers"], f"{job}-job.yaml scales from another minimum"
        assert group["maxReplicas"] >= MAX_NODES and node_type["max_workers"] >= MAX_NODES
    return name, {"resources": {"CPU": 1, "GPU": gpus, "object_store_memory": 100_000_000},
                  "min_workers": node_type["min_workers"], "max_workers": MAX_NODES}


def test_rehearsal_node_type_is_aws_yamls() -> None:
    name, node_type = rehearsal_node_type()
    assert node_type["resources"]["GPU"] == 1 and node_type["min_workers"] == 0, (name, node_type)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("autoscale-corpus")
    generate_corpus(root, SynthConfig(videos=3, frames=8, height=48, width=96, seed=5))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    import torch

    torch.manual_seed(1)
    config = DCFMConfig("pvt_v2_b0", num_classes=6)
    card = ModelCard(config, [f"c{i}" for i in range(6)], [(i * 40, i * 40, i * 40) for i in range(6)], (32, 64))
    path = tmp_path_factory.mktemp("autoscale-ckpt") / "model"
    save_checkpoint(path, DCFM(config).eval(), card)
    return str(path)


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeAutoscalingCluster]:
    if not RAY_BIN.is_file():
        pytest.fail(f"no `ray` next to {sys.executable}: install the project (ray[default]) into this interpreter")
    name, node_type = rehearsal_node_type()
    cluster = FakeAutoscalingCluster({}, {name: node_type}, idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    try:
        cluster.start()
        yield cluster
    finally:
        remaining = cluster.stop()
        assert not remaining, f"processes of the autoscaling cluster survived teardown: {sorted(remaining)}"


def runtime_env() -> dict:
    """cluster/runtime_env.yaml's environment, with the repository on PYTHONPATH in place of working_dir: the
    fake provider's nodes share the head's temp dir, where each node's runtime-env agent would unpack (and
    garbage-collect) the same working_dir copy. The static two-node rehearsal covers working_dir."""
    env = load_yaml(RUNTIME_ENV)
    return {"env_vars": {**env["env_vars"], "PYTHONPATH": str(REPO)}}


class NodeWatch:
    """Samples the GPU nodes (state API) and the jobs' statuses twice a second, in a thread."""

    def __init__(self, cluster: FakeAutoscalingCluster, jobs: list[str]) -> None:
        self.cluster, self.jobs = cluster, jobs
        self.samples: list[tuple[float, set[str], tuple[str, ...]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        client = self.cluster.client()
        while not self.stop.is_set():
            try:
                nodes = {n["node_id"] for n in self.cluster.gpu_nodes()}
            except OSError:  # the dashboard busy for a moment: the next sample counts
                time.sleep(0.5)
                continue
            statuses = []
            for job in self.jobs:
                try:
                    statuses.append(client.get_job_status(job).value)
                except RuntimeError:  # not submitted yet
                    statuses.append("")
            self.samples.append((time.monotonic(), nodes, tuple(statuses)))
            time.sleep(0.5)

    def __enter__(self) -> NodeWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def counts(self) -> list[int]:
        return [len(nodes) for _, nodes, _ in self.samples]

    def all_nodes(self) -> set[str]:
        return set().union(*(nodes for _, nodes, _ in self.samples))


def test_gpu_nodes_come_from_zero_for_both_jobs_and_go_after_the_idle_timeout(cluster, corpus, checkpoint,
                                                                              tmp_path) -> None:
    assert cluster.gpu_nodes() == [], "the cluster starts without GPU nodes"
    client = cluster.client()
    out = tmp_path / "segment"
    segment = ["python", str(REPO / "jobs/segment.py"), str(corpus / "videos"), "--output", str(out),
               "--checkpoint", checkpoint, "--keyframe-interval", "2", "--chunk-frames", "2",
               "--gpus-per-actor", "1", "--actors", "1,2"]
    train = ["python", str(REPO / "jobs/train.py"), "--data", str(corpus), "--output", str(tmp_path / "train" / "run1"),
             "--backbone", "pvt_v2_b0", "--workers", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "1",
             "--steps", "2", "--batch-size", "1", "--crop", "32x64", "--checkpoint-every", "2", "--log-every", "1"]
    ids = [f"dcfm-{job}-{uuid.uuid4().hex[:8]}" for job in ("segment", "train")]
    with NodeWatch(cluster, ids) as watch:
        for submission_id, entrypoint in zip(ids, (segment, train)):
            client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(), submission_id=submission_id)
        # The local reference run (a Ray of its own), while the cluster's nodes start and the jobs wait.
        local_out = tmp_path / "local"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PYTHONPATH"] = str(REPO)
        local = subprocess.Popen(
            [sys.executable, "-m", "dcfm", "segment", str(corpus / "videos"), "--output", str(local_out),
             "--checkpoint", checkpoint, "--keyframe-interval", "2", "--chunk-frames", "4", "--actors", "1",
             "--cpus-per-actor", "1", "--address", "local"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        logs = {sid: cluster.wait_job(sid, timeout=300) for sid in ids}
        local_log = local.communicate(timeout=240)[0]
        assert local.returncode == 0, local_log[-3000:]
        deadline = time.monotonic() + 120
        while cluster.gpu_nodes() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(1)

    counts = watch.counts()
    assert counts and counts[0] == 0, f"GPU nodes before the jobs: {counts[:5]}"
    assert max(counts) == MAX_NODES, f"the autoscaler should add {MAX_NODES} GPU nodes: {counts}"
    assert any(len(nodes) == MAX_NODES and "RUNNING" in statuses for _, nodes, statuses in watch.samples)
    assert cluster.gpu_nodes() == [], "idle GPU nodes should be removed after the idle timeout"
    assert counts[-1] == 0

    # Segment: the actors ran on the added GPU nodes and wrote what a local run writes.
    assert "[segment] 3 ok" in logs[ids[0]], logs[ids[0]][-3000:]
    manifest = json.loads(next((out / "runs").glob("*/*.json")).read_text())
    assert manifest["resources"]["gpus_per_actor"] == 1 and manifest["resources"]["max_actors"] == 2
    actor_nodes = {key.split(":")[0] for key in manifest["actors"]}
    assert actor_nodes and actor_nodes <= watch.all_nodes(), (actor_nodes, watch.all_nodes())
    assert frame_rows(str(out)) == frame_rows(str(local_out))

    # Train: two DDP workers, one per added GPU node.
    assert "finished step 2/2" in logs[ids[1]], logs[ids[1]][-3000:]
    job_id = client.get_job_info(ids[1]).job_id
    workers = [a for a in cluster.state("actors") if a["job_id"] == job_id and a["class_name"] == "RayTrainWorker"]
    assert len({a["node_id"] for a in workers}) == 2 and {a["node_id"] for a in workers} <= watch.all_nodes()
    assert (tmp_path / "train" / "run1" / "final" / "dcfm.json").is_file()


def test_an_actor_no_node_type_holds_fails_with_a_message_instead_of_waiting(cluster, corpus, checkpoint,
                                                                            tmp_path) -> None:
    client = cluster.client()
    entrypoint = ["python", str(REPO / "jobs/segment.py"), str(corpus / "videos"), "--output", str(tmp_path / "out"),
                  "--checkpoint", checkpoint, "--gpus-per-actor", "2", "--actors", "1,2", "--actor-start-timeout", "15"]
    submission_id = f"dcfm-segment-{uuid.uuid4().hex[:8]}"
    client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(), submission_id=submission_id)
    deadline = time.monotonic() + 180
    while not client.get_job_status(submission_id).is_terminal():
        assert time.monotonic() < deadline, "the job should fail, not wait for a node no type can be"
        assert cluster.gpu_nodes() == [], "no node type fits: the autoscaler must not add one"
        time.sleep(1)
    logs = client.get_job_logs(submission_id)
    assert client.get_job_status(submission_id).value == "FAILED"
    assert "1 CPUs and 2 GPUs" in logs and "--gpus-per-actor" in logs, logs[-3000:]
    assert not (tmp_path / "out" / "frames").exists()
