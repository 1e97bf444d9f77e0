"""Chunk planning and the job's configuration rules (no Ray needed)."""

import subprocess
import sys
from fractions import Fraction

import pytest

from dcfm.decode import VideoProbe
from dcfm.inference import KeyframePolicy
from dcfm.segment.config import SegmentJobConfig, resolve_resources
from dcfm.segment.plan import (PREROLL_SHARE, ChunkTask, chunk_bounds, finish_split, lead_in_frames, plan_chunks,
                               plan_tasks)


def probe(n: int, gop: int = 2) -> VideoProbe:
    """A video of ``n`` frames with a seek point every ``gop`` frames (``gop=0``: frame 0 only)."""
    pts = tuple(range(0, 100 * n, 100))
    keyframes = tuple(range(0, n, gop)) if gop else (0,)
    return VideoProbe("v.mp4", n, pts, Fraction(1, 1000), 10.0, n / 10, "h264", 64, 32, keyframes=keyframes)


def test_chunks_cover_every_frame_once() -> None:
    for n in (1, 5, 16, 17, 100):
        for size in (1, 4, 16, 64):
            covered = [i for start, stop in chunk_bounds(n, size) for i in range(start, stop)]
            assert covered == list(range(n))


def test_chunk_length_is_aligned_to_the_keyframe_interval() -> None:
    config = SegmentJobConfig(["x.mp4"], "out", "ckpt", keyframes=KeyframePolicy(interval=6), chunk_frames=100)
    assert config.aligned_chunk_frames == 102
    adaptive = SegmentJobConfig(["x.mp4"], "out", "ckpt", keyframes=KeyframePolicy(adaptive=True), chunk_frames=100)
    assert adaptive.aligned_chunk_frames == 100


def test_tasks_carry_lead_in_and_lookahead() -> None:
    tasks = plan_tasks("v", "v.mp4", probe(20), chunk_frames=8, lead_in=2)
    assert [(t.start, t.stop, t.lead_start, t.decode_stop) for t in tasks] == [
        (0, 8, 0, 9), (8, 16, 6, 17), (16, 20, 14, 20)
    ]
    assert all(t.num_chunks == 3 for t in tasks)
    assert ChunkTask.from_json(tasks[1].to_json()) == tasks[1]
    # Each task carries the probe's window for its decode, not the whole video's pts.
    assert tasks[1].video_probe() == probe(20).window(6, 17)


def test_tasks_of_a_long_video_stay_small() -> None:
    n = 100_000
    long = VideoProbe("v.mp4", n, tuple(range(0, 100 * n, 100)), Fraction(1, 1000), 10.0, n / 10, "h264", 64, 32,
                      keyframes=tuple(range(0, n, 16)))
    tasks = plan_tasks("v", "v.mp4", long, chunk_frames=256, lead_in=2)
    assert len(tasks) == -(-n // 256)
    assert max(len(t.pts) for t in tasks) <= 256 + 1 + 2 + 2 * 16  # chunk, look-ahead, lead-in, two GOPs
    last = tasks[-1].video_probe()
    assert last.timestamp_s(n - 1) == long.timestamp_s(n - 1) and last.index_of(long.pts[n - 1]) == n - 1


def decoded_frames(video: VideoProbe, chunk_frames: int, lead_in: int) -> int:
    """What decode_range decodes for every task: from its seek start to its decode stop."""
    from dcfm.decode import seek_start

    return sum(t.decode_stop - seek_start(video, t.lead_start)
               for t in plan_tasks("v", "v.mp4", video, chunk_frames, lead_in))


@pytest.mark.parametrize("gop", [0, 250, 1000])
def test_sparse_seek_points_never_make_decoding_quadratic(gop) -> None:
    n, chunk, lead = 20_000, 64, 6
    video = probe(n, gop)
    plan = plan_chunks(video, chunk, lead)
    tasks = plan_tasks("v", "v.mp4", video, chunk, lead)
    covered = [i for t in tasks for i in range(t.start, t.stop)]
    assert covered == list(range(n))
    # Pre-roll within budget; beyond it each chunk decodes only its lead-in and look-ahead frame.
    assert decoded_frames(video, chunk, lead) == plan.decoded_frames
    assert plan.decoded_frames <= (1 + PREROLL_SHARE) * n + len(tasks) * (lead + 1)
    assert plan.note and ("sequential" in plan.note if gop == 0 else f"{len(tasks)} chunks" in plan.note)
    if gop:  # chunks that start right after a seek point cost nothing: those are kept
        assert len(tasks) >= n // (2 * gop)


def test_dense_seek_points_keep_every_chunk() -> None:
    plan = plan_chunks(probe(1000, gop=8), 64, 8)
    assert len(plan.bounds) == len(chunk_bounds(1000, 64)) and plan.note == ""


def test_boundaries_move_to_seek_points_a_few_frames_away() -> None:
    """Footage with a seek point every 2 s (30 frames): 64-frame chunks start just after the seek point near
    their nominal start instead of being merged, so a video still splits into even chunks for the actors."""
    video, chunk, lead = probe(1024, gop=30), 64, 2
    plan = plan_chunks(video, chunk, lead)
    starts = [a for a, _ in plan.bounds]
    assert plan.note == "" and all(a % lead == 0 for a in starts)
    # Every chunk but the last within a quarter of --chunk-frames: one boundary moved early and the next
    # moved late must not add up to a chunk that one actor is still running when the other has finished.
    assert all(abs((b - a) - chunk) <= chunk // 4 for a, b in plan.bounds[:-1])
    assert plan.decoded_frames <= (1 + PREROLL_SHARE) * 1024 + len(starts) * (lead + 1)
    assert decoded_frames(video, chunk, lead) == plan.decoded_frames


def test_the_last_videos_of_a_job_end_in_half_chunks() -> None:
    """With several actors, the job's last videos end in half-length chunks: the pool hands chunks out in
    order, so the actors run out of work at most half a chunk apart instead of one running a whole chunk alone."""
    assert [finish_split(p, 5, actors=2) for p in range(5)] == [0, 0, 0, 2, 2]
    assert [finish_split(p, 5, actors=1) for p in range(5)] == [0] * 5
    video, chunk, lead = probe(1024, gop=30), 64, 2
    whole = plan_chunks(video, chunk, lead)
    split = plan_chunks(video, chunk, lead, finish_split=2)
    assert split.bounds[:-4] == whole.bounds[:-2]
    assert [a for a, _ in split.bounds[-4:]][::2] == [a for a, _ in whole.bounds[-2:]]
    for (a, b), (first, second) in zip(whole.bounds[-2:], zip(split.bounds[-4::2], split.bounds[-3::2])):
        assert first[0] == a and second[1] == b and first[1] == second[0]
        assert abs((first[1] - a) - (b - a) / 2) <= (b - a) / 4 and first[1] % lead == 0  # on the schedule
    assert split.decoded_frames <= (1 + PREROLL_SHARE) * 1024 + len(split.bounds) * (lead + 1)
    tasks = plan_tasks("v", "v.mp4", video, chunk, lead, finish_split=2)
    assert [(t.start, t.stop) for t in tasks] == split.bounds and [t.chunk_index for t in tasks] == list(range(len(tasks)))
    # A chunk shorter than half --chunk-frames is left whole.
    short = plan_chunks(probe(80, gop=2), 64, 2, finish_split=2)
    assert short.bounds == [(0, 32), (32, 64), (64, 80)]


def test_defaults_fill_the_cluster() -> None:
    base = SegmentJobConfig(["a"], "out", "ckpt")
    cpu = resolve_resources(base, cluster_cpus=2, cluster_gpus=0)
    assert (cpu.min_actors, cpu.max_actors, cpu.cpus_per_actor, cpu.gpus_per_actor) == (2, 2, 1, 0)
    big = resolve_resources(base, cluster_cpus=32, cluster_gpus=0)
    assert (big.min_actors, big.cpus_per_actor) == (16, 2)
    gpu = resolve_resources(base, cluster_cpus=64, cluster_gpus=8)
    assert (gpu.min_actors, gpu.max_actors, gpu.cpus_per_actor, gpu.gpus_per_actor) == (8, 8, 7, 1)
    assert "8 actors" in gpu.reason
    given = SegmentJobConfig(["a"], "out", "ckpt", min_actors=1, max_actors=3, cpus_per_actor=2)
    explicit = resolve_resources(given, cluster_cpus=2, cluster_gpus=0)
    assert (explicit.min_actors, explicit.max_actors, explicit.cpus_per_actor) == (1, 3, 2)


def test_empty_video_is_one_pass_through_task() -> None:
    (task,) = plan_tasks("v", "v.mp4", probe(0), chunk_frames=8, lead_in=2)
    assert task.chunk_index == -1 and task.num_chunks == 1


def test_lead_in_reaches_back_to_the_previous_keyframe() -> None:
    assert lead_in_frames(KeyframePolicy(interval=6)) == 6
    assert lead_in_frames(KeyframePolicy(adaptive=True)) == 0


def test_run_id_depends_on_what_decides_rows_only() -> None:
    base = SegmentJobConfig(["a.mp4"], "out", "ckpt")
    same = SegmentJobConfig(["b.mp4", "c.mp4"], "s3://elsewhere", "ckpt2", chunk_frames=7, max_actors=3,
                            probe_concurrency=16)
    other_k = SegmentJobConfig(["a.mp4"], "out", "ckpt", keyframes=KeyframePolicy(interval=3))
    assert base.run_id("d", (64, 128)) == same.run_id("d", (64, 128))
    assert base.run_id("d", (64, 128)) != other_k.run_id("d", (64, 128))
    assert base.run_id("d", (64, 128)) != base.run_id("e", (64, 128))
    assert base.run_id("d", (64, 128)) != base.run_id("d", (32, 64))
    # Keyframe fields added later (codec, phase) leave run ids of runs without them as they were.
    assert "codec" not in base.row_settings("d", (64, 128))["keyframes"]
    codec = SegmentJobConfig(["a.mp4"], "out", "ckpt", keyframes=KeyframePolicy(codec=True, max_interval=12),
                             chunk_frames=100)
    assert codec.row_settings("d", (64, 128))["keyframes"]["codec"] is True
    assert codec.aligned_chunk_frames == 100 and codec.row_settings("d", (64, 128))["chunk_frames"] == 100
    assert lead_in_frames(codec.keyframes) == 0


def test_codec_keyframes_from_the_command_line() -> None:
    from dcfm.cli import build_parser
    from dcfm.segment.cli import config_from_args

    args = build_parser().parse_args(["segment", "v.mp4", "--output", "o", "--checkpoint", "c", "--codec-keyframes",
                                      "--min-interval", "2", "--max-interval", "30", "--nonkey-scale", "0.5"])
    config = config_from_args(args)
    assert (config.keyframes.codec, config.keyframes.min_interval, config.keyframes.max_interval) == (True, 2, 30)
    assert config.nonkey_scale == 0.5 and not config.keyframes.adaptive


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="no inputs"):
        SegmentJobConfig([], "out", "ckpt")
    with pytest.raises(ValueError, match="min_actors"):
        SegmentJobConfig(["a"], "out", "ckpt", min_actors=3, max_actors=2)
    with pytest.raises(ValueError, match="probe_concurrency"):
        SegmentJobConfig(["a"], "out", "ckpt", probe_concurrency=0)


def test_planning_does_not_import_torch() -> None:
    """Probe tasks run in fresh Ray worker processes, one per concurrent probe: importing torch there
    costs seconds of CPU each, taken from the actors on a small node."""
    code = "import sys, dcfm.segment.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_actor_settings_travel_as_plain_json_and_come_back_equal() -> None:
    """The pipeline hands actors their settings as JSON (Ray Data's stats actor sees operator arguments and
    must not have to import torch to read them); every field, enums and nested policies included, survives."""
    import json

    from dcfm.faults import RetryPolicy
    from dcfm.inference import KeyframeScore, ReuseMode
    from dcfm.segment.actor import ActorSettings
    from dcfm.segment.config import MaskResolution

    settings = ActorSettings("s3://b/ckpt", "abc", "s3://b/out", "run1",
                             KeyframePolicy(adaptive=True, max_interval=8, score=KeyframeScore.FEATURE),
                             ReuseMode.BIDIRECTIONAL, (96, 160), MaskResolution.SOURCE, 4, "cuda", 3,
                             reuse_staged=False, retry=RetryPolicy(attempts=2, first_delay_s=0.5, max_delay_s=1.0))
    text = settings.to_json()
    assert "Enum" not in text and isinstance(json.loads(text), dict)
    assert ActorSettings.from_json(text) == settings


def test_a_chunk_handed_over_twice_counts_once() -> None:
    """Ray redoes the task of an actor that died after handing its chunk over: the driver keeps the first
    summary, and the video completes on its own chunks, not on a repeat (which would publish a chunk twice)."""
    from dcfm.segment.actor import ChunkSummary
    from dcfm.segment.job import VideoState
    from dcfm.sources import InputItem

    state = VideoState(InputItem("v.mp4", "v"))
    first, again = (ChunkSummary("v", "v.mp4", 0, 2, "ok", frames=n) for n in (8, 99))
    assert state.add(first) and not state.add(again)
    assert not state.complete() and [s.frames for s in state.summaries.values()] == [8]
    # A summary from another plan of the video (another chunk count) stops the job rather than commit it.
    with pytest.raises(RuntimeError, match="plan of 3 chunks"):
        state.add(ChunkSummary("v", "v.mp4", 1, 3, "ok"))
    assert state.add(ChunkSummary("v", "v.mp4", 1, 2, "ok")) and state.complete()
