"""An autoscaling Ray cluster on this machine for tests: a head whose autoscaler adds and removes worker nodes
through Ray's fake multi-node provider (``provider: {type: fake_multinode}``, the provider behind
``ray.cluster_utils.AutoscalingCluster`` and Ray's own autoscaler tests). Each "node" it launches is a real
raylet with the node type's resources (a GPU node has GPU resources but no GPU), started by the autoscaler
process on the head.

Why not ``AutoscalingCluster`` itself: in Ray 2.60's wheel it reads ``fake_multi_node/example.yaml``, which the
wheel does not ship, and its ``start``/``shutdown`` run ``ray stop --force``, which kills every Ray on the
machine. This class writes the same config (the keys of Ray's example) and starts the head the way
``AutoscalingCluster.start`` does (``RAY_FAKE_CLUSTER=1``, ``AUTOSCALER_UPDATE_INTERVAL_S=1``), but on its own
ports, temp dir and auth token, and stops exactly its own processes (``LocalRayCluster.stop``).
"""

from __future__ import annotations

import json

from tests.raycluster import LocalRayCluster, _free_port

HEAD_TYPE = "ray.head.default"


def fake_config(gcs_port: int, worker_types: dict[str, dict], idle_timeout_minutes: float, head_cpus: int) -> dict:
    """An autoscaler config for the fake provider with ``worker_types`` (name -> resources, min/max_workers)."""
    types = {HEAD_TYPE: {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in worker_types.items():
        types[name] = {"node_config": {}, **spec}
    return {
        "cluster_name": "dcfm-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class FakeAutoscalingCluster(LocalRayCluster):
    """A head of ``head_cpus`` CPUs and no GPU, and an autoscaler that adds ``worker_types`` nodes on demand.

    The worker nodes share the head's temp dir (the fake provider starts them without one of their own), and
    their processes start with the head's working directory, under ``root``: ``stop`` finds them there."""

    def __init__(self, node_env: dict[str, str], worker_types: dict[str, dict], idle_timeout_minutes: float,
                 head_cpus: int = 1) -> None:
        super().__init__(node_env, cpus_per_node=head_cpus)
        self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.config = fake_config(self.gcs_port, worker_types, idle_timeout_minutes, head_cpus)

    def start(self, timeout: float = 120) -> FakeAutoscalingCluster:
        config_path = self.root / "autoscaler.json"
        config_path.write_text(json.dumps(self.config))
        self._start_node("h", [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
            f"--autoscaling-config={config_path}",
        ])
        self._wait_nodes(1, timeout)
        return self

    def gpu_nodes(self) -> list[dict]:
        """Alive nodes with GPUs (the state API's ``resources_total``): the ones the autoscaler added."""
        return [n for n in self.alive_nodes() if n["resources_total"].get("GPU", 0) > 0]
