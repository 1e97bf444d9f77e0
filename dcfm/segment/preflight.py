"""Before the actor pool starts: does an actor fit any node the cluster has, or any its autoscaler can add?

A request no node can hold (``--gpus-per-actor 2`` on one-GPU nodes, more CPUs than a node has) makes Ray wait
for a node that never comes: the job would hang. Where Ray knows the autoscaler's node types (the cluster
config in the GCS, as KubeRay's autoscaler reports it) or the cluster cannot grow (a Ray this job started),
the job refuses at once. Where the autoscaler's node types are not visible (the cluster launcher's autoscaler),
the pool gets ``actor_start_timeout_s`` to start its first actors, and a timeout names the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcfm.segment.config import ActorResources


class ResourceMismatch(ValueError):
    """No node of the cluster, present or addable, fits one actor."""


@dataclass(frozen=True)
class ClusterShapes:
    """Resource shapes of the nodes a cluster has (``alive``) and of the node types it can add (``addable``;
    None when they are not known)."""

    alive: list[dict[str, float]]
    addable: list[dict[str, float]] | None

    def fits(self, bundle: dict[str, float]) -> bool:
        shapes = self.alive + (self.addable or [])
        return any(all(shape.get(key, 0.0) >= need for key, need in bundle.items() if need) for shape in shapes)

    def describe(self) -> str:
        def fmt(shapes):
            return ", ".join(sorted({"{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(s.items())
                                                      if k in ("CPU", "GPU")) + "}" for s in shapes})) or "none"
        text = f"nodes now: {fmt(self.alive)}"
        return text + (f"; node types the autoscaler can add: {fmt(self.addable)}" if self.addable is not None else "")


def actor_bundle(resources: ActorResources) -> dict[str, float]:
    return {"CPU": resources.cpus_per_actor, "GPU": resources.gpus_per_actor}


def check_actor_fits(resources: ActorResources, shapes: ClusterShapes, can_grow: bool) -> bool:
    """Raise ResourceMismatch when no node can ever hold one actor. Returns whether one fits a node that is
    there or known to be addable (False: only an autoscaler of unknown node types can tell)."""
    bundle = actor_bundle(resources)
    if shapes.fits(bundle):
        return True
    if shapes.addable is not None or not can_grow:
        raise ResourceMismatch(
            f"an actor asks for {resources.cpus_per_actor:g} CPUs and {resources.gpus_per_actor:g} GPUs, but no node "
            f"of this cluster {'can add' if can_grow else 'has'} that much ({shapes.describe()}): lower "
            f"--gpus-per-actor / --cpus-per-actor, or add a node type that holds one actor")
    return False


def cluster_shapes() -> ClusterShapes:
    """The shapes Ray knows of, from a connected driver."""
    import ray

    alive = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    addable = None
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the key: same as not reported
        config = None
    if config is not None and config.node_group_configs:
        addable = [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    return ClusterShapes(alive, addable)
