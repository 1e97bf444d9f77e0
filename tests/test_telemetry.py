"""Operational metrics (dcfm/telemetry.py), the Grafana dashboard that charts them, the dry run's cost
estimate and the actor-pool preflight. The slow test scrapes Ray's Prometheus endpoint around a real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from dcfm.errors import ConfigError
from dcfm.segment.config import ActorResources
from dcfm.segment.estimate import CostEstimate, check_gpu_pool
from dcfm.segment.preflight import ClusterShapes, ResourceMismatch, check_actor_fits
from dcfm.telemetry import SEGMENT_METRICS, TRAIN_METRICS, SegmentTelemetry, TrainTelemetry

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana-dashboard.json"
ALL_METRICS = {**SEGMENT_METRICS, **TRAIN_METRICS}
EXPORTED = {name: spec for spec in ALL_METRICS.values() for name in spec.exported()}


# ------------------------------------------------------------------------------------------ dashboard


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_grafana_dashboard_is_valid_and_charts_only_what_the_jobs_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in ("row", "timeseries", "stat"), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["type"] == "prometheus", panel["title"]
            assert all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "run_id" in variables

    referenced = set()
    for expr in dashboard_exprs(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = set(re.findall(r"\b(ray_[a-z0-9_]+)\b", expr))
        unknown = names - set(EXPORTED)
        assert not unknown, f"the dashboard charts metrics the jobs do not export: {sorted(unknown)}"
        for name in names:  # every label it groups or filters by is one the metric has
            labels = set(EXPORTED[name].tags) | ({"le"} if name.endswith("_bucket") else set())
            for selector in re.findall(rf"{name}\{{([^}}]*)\}}", expr):
                used = set(re.findall(r"([a-z_]+)\s*=~?", selector))
                assert used <= labels, (name, used)
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            group = {g.strip() for g in grouping.split(",")}
            allowed = set().union(*(set(EXPORTED[n].tags) | {"le"} for n in names))
            assert group <= allowed, (expr, group)
        referenced |= {EXPORTED[n].name for n in names}
    assert referenced == set(ALL_METRICS), f"metrics no panel charts: {sorted(set(ALL_METRICS) - referenced)}"


# ------------------------------------------------------------------------------------------ telemetry


def test_telemetry_is_a_no_op_outside_ray() -> None:
    # A fresh interpreter: this pytest process may already hold the suite's session Ray.
    code = textwrap.dedent("""
        import ray
        from dcfm.segment.actor import ChunkSummary
        from dcfm.telemetry import SegmentTelemetry, TrainTelemetry

        segment, train = SegmentTelemetry("run"), TrainTelemetry("run")
        assert not segment.recorder.enabled and not train.recorder.enabled
        segment.chunk(ChunkSummary("v", "u", 0, 1, "ok", frames=3, keyframes=2, seconds=1.0, model_s=0.5))
        segment.videos("ok")
        segment.finished()
        train.logged({"step": 1, "loss": 1.0, "pairs_per_s": 2.0}, 1)
        assert not ray.is_initialized(), "recording must not start Ray"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------ estimate


def pool(min_actors=1, max_actors=4, cpus=4.0, gpus=1.0) -> ActorResources:
    return ActorResources(min_actors, max_actors, cpus, gpus, "test")


def test_estimate_gpu_hours_and_wall_time_at_the_pools_max_size() -> None:
    # 720,000 frames at 50 frames/s per GPU: 14,400 GPU-seconds = 4 GPU-hours; 4 GPUs: 1 hour of work.
    est = CostEstimate(frames=720_000, chunks=3000, largest_chunk=256, fps_per_gpu=50.0, resources=pool())
    assert est.gpu_hours == pytest.approx(4.0)
    assert est.gpus_at_max == 4 and est.wall_s == pytest.approx(3600.0)
    assert "4.00 GPU-hours" in est.describe() and "1h 00m" in est.describe()
    # Fewer chunks than actors: only as many GPUs work; the longest chunk bounds the wall time.
    few = CostEstimate(frames=600, chunks=2, largest_chunk=500, fps_per_gpu=10.0, resources=pool())
    assert few.gpus_at_max == 2 and few.wall_s == pytest.approx(50.0)
    # Half a GPU per actor: two actors share one GPU's rate.
    half = CostEstimate(frames=1000, chunks=100, largest_chunk=10, fps_per_gpu=10.0, resources=pool(1, 4, 2, 0.5))
    assert half.gpus_at_max == 2 and half.wall_s == pytest.approx(50.0) and half.gpu_hours == pytest.approx(100 / 3600)
    with pytest.raises(ConfigError, match="--gpus-per-actor"):
        check_gpu_pool(pool(gpus=0.0))


def test_segment_cli_takes_fps_per_gpu() -> None:
    import argparse

    from dcfm.segment.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["v.mp4", "--output", "o", "--checkpoint", "c", "--dry-run",
                                                 "--fps-per-gpu", "42.5", "--actor-start-timeout", "60"]))
    assert config.fps_per_gpu == 42.5 and config.actor_start_timeout_s == 60
    with pytest.raises(ConfigError, match="fps_per_gpu"):
        config_from_args(parser.parse_args(["v.mp4", "--output", "o", "--checkpoint", "c", "--fps-per-gpu", "0"]))


def test_dry_run_prints_frames_gpu_hours_and_wall_time(tmp_path, monkeypatch) -> None:
    import torch

    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.inference import KeyframePolicy
    from dcfm.model import DCFM, DCFMConfig
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.job import run_segment_job
    from dcfm.synth import SynthConfig, generate_corpus

    generate_corpus(tmp_path / "corpus", SynthConfig(videos=2, frames=12, height=48, width=96, seed=2))
    config = DCFMConfig("pvt_v2_b0", num_classes=4)
    save_checkpoint(tmp_path / "model", DCFM(config).eval(),
                    ModelCard(config, ["a", "b", "c", "d"], [(0, 0, 0)] * 4, (32, 64)))
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run starts no Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    lines: list[str] = []
    job = SegmentJobConfig([str(tmp_path / "corpus" / "videos")], str(tmp_path / "out"), str(tmp_path / "model"),
                           keyframes=KeyframePolicy(interval=2), chunk_frames=4, dry_run=True, fps_per_gpu=0.01,
                           gpus_per_actor=1.0, min_actors=1, max_actors=2)
    summary = run_segment_job(job, log=lines.append)
    # 24 frames at 0.01 frames/s per GPU: 2400 GPU-seconds; 2 GPUs at the pool's max size: 1200 s.
    assert summary.chunks == 0 and not (tmp_path / "out").exists()
    assert lines[-1] == ("[segment] estimate: 24 frames at 0.01 frames/s per GPU = 0.67 GPU-hours; wall time at the "
                         "pool's max size (2 actors x 1 GPUs = 2 GPUs busy): 20m 00s plus start-up"), lines[-3:]
    with pytest.raises(ConfigError, match="--gpus-per-actor"):
        run_segment_job(SegmentJobConfig(job.inputs, job.output, job.checkpoint, dry_run=True, fps_per_gpu=10.0,
                                         gpus_per_actor=0.0), log=lines.append)


# ------------------------------------------------------------------------------------------ preflight


def test_preflight_refuses_what_no_node_holds_and_waits_only_where_it_cannot_know() -> None:
    head, gpu_node = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}
    two_gpus = pool(cpus=4, gpus=2)
    # The autoscaler's node types are known: refused at once, naming what the nodes have.
    with pytest.raises(ResourceMismatch, match=r"2 GPUs.*\{CPU: 8, GPU: 1\}.*--gpus-per-actor"):
        check_actor_fits(two_gpus, ClusterShapes([head], [gpu_node]), can_grow=True)
    # A cluster that cannot grow (a Ray the job started): refused at once.
    with pytest.raises(ResourceMismatch, match="has"):
        check_actor_fits(pool(gpus=1), ClusterShapes([head], None), can_grow=False)
    # Fits a node type the autoscaler can add, or a node that is there.
    assert check_actor_fits(pool(gpus=1), ClusterShapes([head], [gpu_node]), can_grow=True)
    assert check_actor_fits(pool(gpus=1), ClusterShapes([head, gpu_node], None), can_grow=True)
    # An autoscaler whose node types Ray does not know: the pool waits, bounded by --actor-start-timeout.
    assert not check_actor_fits(two_gpus, ClusterShapes([head], None), can_grow=True)


# ------------------------------------------------------------------------------ Ray's metrics endpoint


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Our series on the node's Prometheus endpoint: name -> {labels we set: value summed over processes}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for line in text.splitlines():
        match = re.match(r"^(ray_dcfm_[a-z0-9_]+)\{(.*)\} (\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        tags = (set(EXPORTED[name].tags) if name in EXPORTED else set()) | {"le"}
        ours = tuple(sorted((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', labels) if k in tags))
        found[name][ours] += float(value)
    return found


@pytest.mark.slow
def test_metrics_endpoint_has_the_runs_totals(ray_local, tmp_path) -> None:
    import ray
    import torch

    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.inference import KeyframePolicy
    from dcfm.model import DCFM, DCFMConfig
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.job import run_segment_job
    from dcfm.synth import SynthConfig, generate_corpus

    generate_corpus(tmp_path / "corpus", SynthConfig(videos=3, frames=10, height=48, width=96, seed=11))
    videos = sorted((tmp_path / "corpus" / "videos").glob("*.mp4"))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    torch.manual_seed(7)  # a model of its own: its run id is this test's alone in the session's Ray
    config = DCFMConfig("pvt_v2_b0", num_classes=5)
    card = ModelCard(config, [f"c{i}" for i in range(5)], [(i, i, i) for i in range(5)], (32, 64))
    save_checkpoint(tmp_path / "model", DCFM(config).eval(), card)

    def job(inputs):
        return SegmentJobConfig([str(p) for p in inputs], str(tmp_path / "out"), str(tmp_path / "model"),
                                keyframes=KeyframePolicy(interval=2), chunk_frames=4, progress_interval_s=3600)

    port = next(n for n in ray.nodes() if n["Alive"])["MetricsExportPort"]  # the session's one-node Ray
    seen_during: list[dict[tuple, float]] = []
    done = threading.Event()

    def watch() -> None:  # what a Prometheus server would see while the job runs
        while not done.is_set():
            seen_during.append(dict(scrape(port).get("ray_dcfm_segment_frames_total", {})))
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first = run_segment_job(job(videos[:2] + [tmp_path / "broken.mp4"]), log=lambda line: None)
    second = run_segment_job(job(videos + [tmp_path / "broken.mp4"]), log=lambda line: None)  # resumes: 1 new video
    done.set()
    watcher.join()
    # The training loop's rank 0 reports too; here in this process (Ray is up), as on a Ray Train worker.
    from dcfm.train.config import AugmentConfig, TrainJobConfig
    from dcfm.train.loop import train_locally

    trained = train_locally(TrainJobConfig(data=str(tmp_path / "corpus"), output=str(tmp_path / "train" / "tele-run"),
                                           backbone="pvt_v2_b0", steps=3, batch_size=1, log_every=1,
                                           checkpoint_every=3, augment=AugmentConfig(crop=(32, 64))), device="cpu")
    assert first.run_id == second.run_id and first.ok == 2 and first.failed == 1 and second.skipped == 3

    run = (("run_id", first.run_id),)
    frames = first.frames + second.frames
    keyframes = sum(r["keyframes"] for r in first.rows + second.rows if r["keyframes"])
    expected = {
        ("ray_dcfm_segment_frames_total", run): frames,
        ("ray_dcfm_segment_keyframes_total", run): keyframes,
        ("ray_dcfm_segment_chunks_total", run + (("status", "ok"),)): first.chunks + second.chunks - 1,
        ("ray_dcfm_segment_chunks_total", run + (("status", "failed"),)): 1,  # the broken input (skipped later)
        ("ray_dcfm_segment_videos_total", run + (("status", "ok"),)): 3,
        ("ray_dcfm_segment_videos_total", run + (("status", "failed"),)): 1,
        ("ray_dcfm_segment_videos_total", run + (("status", "skipped"),)): 3,
        ("ray_dcfm_segment_chunk_seconds_count", run): first.chunks + second.chunks - 1,
        ("ray_dcfm_segment_actors", run): 0,  # the pool is gone
        ("ray_dcfm_segment_frames_planned", run): second.frames,  # a gauge: the last run's videos
        ("ray_dcfm_train_steps_total", (("run_id", "tele-run"),)): 3,
        ("ray_dcfm_train_step", (("run_id", "tele-run"),)): 3,
        ("ray_dcfm_train_loss", (("run_id", "tele-run"),)): pytest.approx(trained.state.history[-1]["loss"]),
    }
    deadline = time.monotonic() + 60  # Ray exports every few seconds (metrics_report_interval_ms)
    while True:
        found = scrape(port)
        got = {key: found.get(key[0], {}).get(tuple(sorted(key[1]))) for key in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert got == expected
    model_s = sum(v for k, v in found["ray_dcfm_segment_stage_seconds_total"].items()
                  if ("stage", "model") in k and run[0] in k)  # the session's Ray also holds other tests' runs
    assert model_s == pytest.approx(first.actor_s["model_s"] + second.actor_s["model_s"], rel=1e-6)
    assert set(found) <= set(EXPORTED), "series the dashboard test does not know of"
    # Scraped while the runs went on: a counter only grows, and never past the final total.
    ours = [scraped.get(run, 0.0) for scraped in seen_during]  # the session's Ray also holds other tests' runs
    assert ours and ours == sorted(ours) and ours[-1] <= frames, ours
