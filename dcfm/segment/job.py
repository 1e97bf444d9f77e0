"""The segment job's driver: plan, run the Ray Data pipeline, commit videos as they finish, summarise."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from importlib import metadata

from dcfm import storage
from dcfm.checkpoint import read_card
from dcfm.decode import probe_video
from dcfm.errors import ExitCode, JobFailure, SettingsConflict
from dcfm.faults import Fault, RetryPolicy, Side, TransientFailure, classify, preflight
from dcfm.progress import ProgressBar
from dcfm.segment.actor import ActorSettings, ChunkSegmenter, ChunkSummary
from dcfm.segment.config import ActorResources, SegmentJobConfig, resolve_resources
from dcfm.segment.lease import OutputLease
from dcfm.segment.estimate import CostEstimate, check_gpu_pool
from dcfm.segment.preflight import ResourceMismatch, check_actor_fits, cluster_shapes
from dcfm.segment.outputs import OutputLayout
from dcfm.segment.plan import finish_split, lead_in_frames, plan_tasks, plan_video
from dcfm.sources import InputItem, scan_inputs
from dcfm.storage import redact
from dcfm.telemetry import SegmentTelemetry

# ChunkSummary's timing fields, summed over chunks: where the actors' time went.
ACTOR_STAGES = ("seconds", "model_s", "decode_wait_s", "rows_s", "write_s", "cpu_s")
PACKAGES = ("dcfm", "torch", "timm", "ray", "pyarrow", "av", "numpy", "s3fs")


@dataclass
class VideoState:
    """Chunk summaries of one video, until all have arrived."""

    item: InputItem
    summaries: dict[int, ChunkSummary] = field(default_factory=dict)  # by chunk index

    def add(self, chunk: ChunkSummary) -> bool:
        """Keep ``chunk``'s summary; False (and nothing kept) for a second summary of a chunk already here."""
        if chunk.chunk_index in self.summaries:
            return False
        first = next(iter(self.summaries.values()), chunk)
        if chunk.num_chunks != first.num_chunks:
            # Summaries of two different plans of the video: committing either count of chunks would publish
            # a video with frames missing or twice. Stop instead (a bug, not bad input).
            raise RuntimeError(f"{self.item.video_id}: chunk {chunk.chunk_index} belongs to a plan of "
                               f"{chunk.num_chunks} chunks, chunk {first.chunk_index} to one of {first.num_chunks}")
        self.summaries[chunk.chunk_index] = chunk
        return True

    def complete(self) -> bool:
        return bool(self.summaries) and len(self.summaries) == next(iter(self.summaries.values())).num_chunks


@dataclass
class JobSummary:
    run_id: str
    videos: int = 0
    ok: int = 0
    empty: int = 0
    failed: int = 0
    skipped: int = 0  # already committed
    skipped_failed: int = 0  # already committed as failed
    # Files the input directories, prefixes and globs held besides videos (see --extensions), and a few of them.
    skipped_files: int = 0
    skipped_file_examples: list[str] = field(default_factory=list)
    frames: int = 0
    chunks: int = 0
    reused_chunks: int = 0  # staged by an interrupted run of the same settings, reused as they were
    seconds: float = 0.0
    peak_actor_rss_mb: float = 0.0
    # From the job's start until the first actor had its model loaded: input listing, starting a local
    # Ray if none is running, probing, Ray Data and actor start-up, model load. The fixed cost of a run,
    # whatever the corpus size.
    startup_s: float = 0.0
    actor_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ACTOR_STAGES, 0.0))
    # From the first chunk an actor started (its wall clock) until the driver had the last chunk: the work
    # itself, without start-up.
    work_s: float = 0.0
    # "node_id:pid" -> chunks, frames, busy seconds and CPU seconds of each actor that computed chunks
    actors: dict[str, dict[str, float]] = field(default_factory=dict)
    resources: ActorResources | None = None
    planned_frames: int = 0  # frames of the videos whose chunks have started arriving
    rows: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.INPUTS_FAILED if self.failed or self.skipped_failed else ExitCode.OK

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else math.nan


def video_row(state: VideoState, run_id: str, digest: str) -> tuple[dict, list[dict], list[int]]:
    """The videos/ row, the errors/ rows and the chunks to publish, from a complete set of summaries."""
    summaries = [state.summaries[index] for index in sorted(state.summaries)]
    failed = [s for s in summaries if s.status == "failed"]
    status = "failed" if failed else ("empty" if summaries[0].status == "empty" else "ok")
    probe = next((s.probe for s in summaries if s.probe), None) or {}
    frames = sum(s.frames for s in summaries)
    change_n = sum(s.change_count for s in summaries)
    agree_n = sum(s.agreement_count for s in summaries)
    ok = status == "ok"
    row = {
        "video_id": state.item.video_id,
        "video_uri": redact(state.item.uri),
        "status": status,
        "error": failed[0].error["message"] if failed else None,
        "frame_count": probe.get("frame_count"),
        "fps": probe.get("fps"),
        "codec": probe.get("codec"),
        "width": probe.get("width"),
        "height": probe.get("height"),
        "duration_s": probe.get("duration_s"),
        "warning": probe.get("warning") if ok else None,
        "chunks": 0 if summaries[0].chunk_index < 0 else len(summaries),
        "keyframes": sum(s.keyframes for s in summaries) if ok else None,
        "mean_confidence": sum(s.confidence_sum for s in summaries) / frames if ok and frames else None,
        "mean_label_change_rate": sum(s.change_sum for s in summaries) / change_n if ok and change_n else None,
        "mean_keyframe_agreement": sum(s.agreement_sum for s in summaries) / agree_n if ok and agree_n else None,
        "seconds": sum(s.seconds for s in summaries),
        "run_id": run_id,
        "model_digest": digest,
    }
    errors = [
        {
            "video_id": state.item.video_id,
            "video_uri": redact(state.item.uri),
            "chunk_index": s.chunk_index if s.chunk_index >= 0 else None,
            **s.error,
            "run_id": run_id,
        }
        for s in failed
    ]
    publish = [s.chunk_index for s in summaries] if ok else []
    return row, errors, publish


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_segment_job(config: SegmentJobConfig, log: Callable[[str], None] = print) -> JobSummary:
    """Run (or resume) the job described by ``config``; returns what happened.

    Everything but a dry run holds the output's lease (one writer per output) from before it reads what is
    committed until it stops, failures included."""
    with ExitStack() as stack:
        return _run_segment_job(config, log, stack)


def _run_segment_job(config: SegmentJobConfig, log: Callable[[str], None], stack: ExitStack) -> JobSummary:
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    log = storage.redacting(log)
    inputs = scan_inputs(config.inputs, config.extensions, config.allow_protocols)
    items = inputs.items
    card, digest = read_card(config.checkpoint)
    resolution = tuple(config.resolution or card.train_size)
    card.check_nonkey_scale(config.nonkey_scale, config.checkpoint)
    run_id = config.run_id(digest, resolution)
    layout = OutputLayout(config.output)
    retry = config.retry
    lease = None
    if not config.dry_run:
        # Before the lease (itself a write) and any model work: an output that takes no writes or an unreadable
        # checkpoint stops the job here with one line naming it, with nothing written, rather than failing
        # every video.
        preflight(config.output, config.checkpoint, retry, log=log)
        lease = stack.enter_context(OutputLease(config.output, run_id, config.lease, log))
    # Only network failures are worth waiting for here: an output this job may not list fails at once.
    committed = retry.call(layout.committed, Side.OUTPUT, f"listing {redact(config.output)}",
                           retry_on=frozenset({Fault.TRANSIENT}), log=log)
    if lease is not None and committed.read_one_by_one:
        # Now, not only at the end: a run that has nothing to do, or does not get there, still saves the next
        # rerun these reads.
        _write_commit_index(layout, committed, retry, log)
    summary = JobSummary(run_id=run_id, videos=len(items), skipped_files=inputs.skipped,
                         skipped_file_examples=inputs.skipped_examples)
    foreign = sorted({m["run_id"] for m in committed.values() if m["run_id"] != run_id})
    if foreign and not config.overwrite:
        raise SettingsConflict(
            f"{redact(config.output)} holds videos committed by run(s) {foreign} with another model or settings "
            f"(this command is run {run_id}); resuming would mix them. Use a new --output, or --overwrite."
        )
    # A marker counts only while its files exist: a video whose files were lost is redone.
    kept = [committed[i.video_id] for i in items if i.video_id in committed and not config.overwrite]
    broken = layout.missing_files(kept, committed=list(committed.values()))
    for video_id, missing in sorted(broken.items()):
        log(f"[segment] {video_id}: its commit marker lists {len(missing)} missing file(s) "
            f"(e.g. {redact(missing[0])}); redoing it")
    todo: list[InputItem] = []
    for item in items:
        marker = committed.get(item.video_id)
        if (marker is None or config.overwrite or item.video_id in broken
                or (config.retry_failed and marker["status"] == "failed")):
            todo.append(item)
        else:
            summary.skipped += 1
            summary.skipped_failed += marker["status"] == "failed"
    log(f"[segment] run {run_id}: {len(items)} inputs, {summary.skipped} already committed, {len(todo)} to do; "
        f"model {card.config.backbone} ({digest[:12]}) at {resolution[0]}x{resolution[1]}")
    if inputs.skipped:
        log(f"[segment] {inputs.skipped_note()}")
    if config.dry_run:
        resources = _resources(config, connect=False)
        summary.resources = resources
        log(f"[segment] would run {resources.describe()}")
        if config.fps_per_gpu:
            check_gpu_pool(resources)
        frames, chunks, largest = _print_plan(todo, config, resources.max_actors, log)
        if config.fps_per_gpu:
            log(CostEstimate(frames, chunks, largest, config.fps_per_gpu, resources).describe())
        return summary
    if not todo:
        log("[segment] nothing to do: every input is committed (use --overwrite to redo, --retry-failed for failures)")
        return summary

    assert lease is not None  # held by every run that gets this far
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    local_ray = not ray.is_initialized() and address in (None, "", "local")  # a Ray this job starts cannot grow
    resources = _resources(config, connect=True)
    summary.resources = resources
    log(f"[segment] running {resources.describe()}")
    fits_now = check_actor_fits(resources, cluster_shapes(), can_grow=not local_ray)  # refuses what never fits
    if not fits_now:
        log(f"[segment] no node fits an actor yet and the autoscaler's node types are not known here; the pool "
            f"waits up to {config.actor_start_timeout_s:g}s for its first actors (--actor-start-timeout)")
    telemetry = SegmentTelemetry(run_id)  # Ray's metrics endpoint; after ray.init
    telemetry.videos("skipped", summary.skipped)
    lease.check()
    retry.call(lambda: layout.clear_videos([item.video_id for item in todo], run_id, set(committed),
                                           keep_staged=not config.overwrite),
               Side.OUTPUT, f"clearing unfinished videos in {redact(config.output)}", log=log)
    settings = ActorSettings(
        checkpoint=config.checkpoint, model_digest=digest, output=config.output, run_id=run_id,
        keyframes=config.keyframes, mode=config.mode, resolution=resolution,
        mask_resolution=config.mask_resolution, batch_size=config.batch_size, device=config.device,
        threads=resources.threads, reuse_staged=not config.overwrite, retry=retry,
    )
    states = {item.video_id: VideoState(item) for item in todo}
    progress = _Progress(log, config.progress_interval_s, len(todo))
    first_start = last_end = None
    staging = layout.staging_root(run_id)
    rows = _pipeline(todo, config, settings, resources, staging).iter_rows()
    for chunk in _chunk_summaries(_guard_actor_start(rows, resources, config)):
        state = states.get(chunk.video_id)
        first_of_video = state is not None and not state.summaries
        if state is None or not state.add(chunk):
            # Ray redoes the task of an actor that died, and one that died after handing its chunk over but
            # before its task ended hands it over twice: count it, and commit its video, once. Both attempts
            # staged the same files under the same names.
            log(f"[segment] {chunk.video_id} chunk {chunk.chunk_index}: a second result for it (its actor was "
                f"restarted); the first one counts")
            continue
        telemetry.chunk(chunk)
        if first_of_video and chunk.probe:
            summary.planned_frames += chunk.probe["frame_count"]
        summary.chunks += 1
        summary.frames += chunk.frames
        if chunk.reused:
            summary.reused_chunks += 1
        elif chunk.frames:
            # Wall clock, from the actor's own start of the chunk: the driver hears of the first chunk only
            # when it ends, possibly late (Ray Data hands its first output over after a delay).
            first_start = min(first_start or chunk.started_at, chunk.started_at)
            last_end = time.time()
            summary.peak_actor_rss_mb = max(summary.peak_actor_rss_mb, chunk.peak_rss_mb)
            ready_s = chunk.actor_ready_at - started.timestamp()
            summary.startup_s = min(summary.startup_s, ready_s) if summary.startup_s else ready_s
            for stage in ACTOR_STAGES:
                summary.actor_s[stage] += getattr(chunk, stage)
            actor = summary.actors.setdefault(f"{chunk.node_id}:{chunk.pid}",
                                              {"chunks": 0, "frames": 0, "seconds": 0.0, "cpu_s": 0.0})
            actor["chunks"] += 1
            actor["frames"] += chunk.frames
            actor["seconds"] += chunk.seconds
            actor["cpu_s"] += chunk.cpu_s
        report_chunk(chunk, log)
        if state.complete():
            video, errors, publish = video_row(state, run_id, digest)
            lease.check()  # a run that lost its lease commits nothing more
            committed[chunk.video_id] = retry.call(
                lambda: layout.commit_video(chunk.video_id, run_id, publish, video, errors), Side.OUTPUT,
                f"committing {chunk.video_id} to {redact(config.output)}", log=log)
            setattr(summary, video["status"], getattr(summary, video["status"]) + 1)
            telemetry.videos(video["status"])
            summary.rows.append(video)
            del states[chunk.video_id]
        progress.update(summary, chunk)
    progress.bar.close()
    telemetry.finished()
    summary.seconds = time.perf_counter() - t0
    summary.work_s = (last_end - first_start) if first_start is not None else 0.0
    if states:  # cannot happen unless Ray dropped rows; refuse to pretend the job finished
        raise RuntimeError(f"the pipeline ended with {len(states)} videos incomplete: {sorted(states)[:5]}")
    lease.check()
    retry.call(lambda: _write_manifest(layout, config, summary, digest, resolution, started), Side.OUTPUT,
               f"writing the run manifest to {redact(config.output)}", log=log)
    # Every marker now, read at the start or written since: the next run reads them from the index.
    _write_commit_index(layout, committed, retry, log)
    _print_summary(summary, log)
    return summary


def _write_commit_index(layout: OutputLayout, committed: dict[str, dict], retry: RetryPolicy,
                        log: Callable[[str], None]) -> None:
    """Write the commit index of every marker in ``committed``. A cache: a run whose work is committed does
    not fail for want of it, nor wait out a refusal (only network failures are retried); it says so, and the
    next rerun reads each marker instead."""
    try:
        retry.call(lambda: layout.write_commit_index(committed), Side.OUTPUT,
                   f"writing the commit index of {redact(layout.root)}", retry_on=frozenset({Fault.TRANSIENT}),
                   log=log)
    except Exception as err:  # noqa: BLE001
        log(f"[segment] WARNING: could not write the commit index ({redact(str(err))}); the next rerun reads "
            f"every commit marker instead")


def report_chunk(chunk: ChunkSummary, log: Callable[[str], None]) -> None:
    """Log what a chunk's summary says beyond progress: a plan note, a failure (with the traceback of an
    unexpected one), a warning about its video."""
    if chunk.extra.get("plan_note"):
        log(f"[segment] {chunk.uri}: {chunk.extra['plan_note']}")
    if chunk.status == "failed":
        log(f"[segment] FAILED {chunk.uri} ({chunk.error['stage']}): {chunk.error['message']}")
        if chunk.error.get("detail"):  # an unexpected exception: a bug to report, with where it happened
            log(f"[segment] unexpected error (please report it with this traceback, also in the errors/ row's "
                f"detail column):\n{chunk.error['detail']}")
    elif chunk.chunk_index <= 0 and chunk.probe and chunk.probe.get("warning"):
        log(f"[segment] WARNING {chunk.uri}: {chunk.probe['warning']}")
def _chunk_summaries(rows: Iterator[dict]) -> Iterator[ChunkSummary]:
    """The chunk summaries as the pipeline yields them, or ``JobFailure`` (exit 3) for a chunk or probe whose
    storage, network or output failure outlasted its retries: the video it belongs to is then not committed
    (videos already committed stay; a rerun does the rest). Ray redoes a chunk whose actor died (restarting
    the actor); a cluster failure Ray gives up on stops the job too."""
    rows = iter(rows)
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except (JobFailure, ResourceMismatch):
                raise
            except Exception as err:
                if classify(err) is Fault.INPUT:
                    raise  # not storage or the cluster: a bug, shown with its traceback
                raise TransientFailure("the segment pipeline", classify(err), 1, 0.0,
                                       f"{type(err).__name__}: {err}") from err
            chunk = ChunkSummary(**json.loads(row["summary"]))
            if chunk.status == "failed" and Fault(chunk.error["fault"]).stops_job:
                raise JobFailure(chunk.error["message"])
            yield chunk
    finally:
        # A job that stops early shuts the pipeline down now (its actors free their CPUs), not whenever the
        # iterator is collected.
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def _resources(config: SegmentJobConfig, connect: bool) -> ActorResources:
    """The actor pool's size and resources. ``connect``: start or join Ray and ask it; otherwise (dry run)
    ask a running Ray if there is one, else count this machine the way a local Ray would."""
    import ray

    if connect and not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True)
    if ray.is_initialized():
        total = ray.cluster_resources()
        return resolve_resources(config, total.get("CPU", 1.0), total.get("GPU", 0.0))
    import os

    import torch

    return resolve_resources(config, float(os.cpu_count() or 1), float(torch.cuda.device_count()))


def _guard_actor_start(rows, resources: ActorResources, config: SegmentJobConfig):
    """Ray Data's timeout for the pool's first actors, as an error that names the request."""
    import ray

    try:
        yield from rows
    except ray.exceptions.GetTimeoutError as err:
        raise ResourceMismatch(
            f"the pool's first {resources.min_actors} actor(s) of {resources.cpus_per_actor:g} CPUs and "
            f"{resources.gpus_per_actor:g} GPUs did not all start and load the model within "
            f"{config.actor_start_timeout_s:g}s ({cluster_shapes().describe()}): no node type of the cluster holds "
            f"one, the autoscaler cannot add nodes, or loading the checkpoint hangs; lower --gpus-per-actor / "
            f"--cpus-per-actor, or raise --actor-start-timeout if nodes take longer to start") from err


def _pipeline(todo: list[InputItem], config: SegmentJobConfig, settings: ActorSettings, resources: ActorResources,
              staging: str):
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines are stable in logs and CI
    # The pool starts once its min actors have loaded the model (Ray's default, -1, starts each actor as it comes):
    # the actors begin together instead of the first one racing the others' start-up for the CPU, and a pool
    # that never comes up (no node fits, no node is added) stops after --actor-start-timeout with a clear error.
    ctx.wait_for_min_actors_s = int(config.actor_start_timeout_s)
    items = [{"video_id": item.video_id, "uri": item.uri,
              "finish_split": finish_split(position, len(todo), resources.max_actors)}
             for position, item in enumerate(todo)]
    lead_in = lead_in_frames(config.keyframes)
    # One chunk per block: the actor pool runs a block as one task, so a block of a video's chunks would run
    # them one after the other on one actor. A block is cut as soon as it exceeds this many bytes, i.e. after
    # every row. The dataset keeps a copy of the context; the process-wide one is restored.
    block_size = ctx.target_max_block_size
    ctx.target_max_block_size = 1
    try:
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
    finally:
        ctx.target_max_block_size = block_size
    return (
        dataset
        # Probing reserves no CPU: it is mostly I/O, and the actor pool may hold every CPU of a small
        # cluster, which would otherwise leave the planner unschedulable and the pipeline stalled. Without
        # a CPU to bound them, Ray would start a worker process per video at once: cap them.
        .flat_map(plan_video, fn_kwargs={"chunk_frames": config.aligned_chunk_frames, "lead_in": lead_in,
                                         "staging": staging, "retry": config.retry,
                                         "align_to_seek_points": config.keyframes.codec},
                  num_cpus=0, compute=TaskPoolStrategy(size=min(config.probe_concurrency, len(items))))
        .map_batches(
            ChunkSegmenter,
            fn_constructor_kwargs={"settings": settings.to_json()},
            # Two chunks in flight per actor: the next one is already on the actor when a chunk ends. With one,
            # each actor idled ~0.15 s between chunks (Ray Data looks for finished tasks every 0.1 s while
            # several run). A chunk queued behind another can wait while a second actor is free; the job's
            # last videos end in half-length chunks (finish_split), so that wait is short where it counts.
            compute=ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors,
                                      max_tasks_in_flight_per_actor=2),
            # A killed actor (OOM, a lost node, a SIGKILL) is restarted and its chunk redone on it: Ray Data's
            # defaults for actor pools (max_restarts=-1, max_task_retries=-1; passing them is deprecated), which
            # tests/test_segment_faults.py holds it to.
            batch_size=1,
            num_cpus=resources.cpus_per_actor,
            num_gpus=resources.gpus_per_actor,
        )
    )


class _Progress:
    def __init__(self, log: Callable[[str], None], interval: float, videos: int) -> None:
        self.log, self.interval, self.videos = log, interval, videos
        self.start = self.last = time.perf_counter()
        self.bar = ProgressBar("segment", None, unit="chunks")  # live only on a terminal
        self.chunks_of: dict[str, int] = {}

    def update(self, s: JobSummary, chunk: ChunkSummary) -> None:
        now = time.perf_counter()
        # Chunks of the videos not seen yet are estimated from those seen, for the bar's ETA.
        self.chunks_of[chunk.video_id] = max(1, chunk.num_chunks)
        total = round(sum(self.chunks_of.values()) * self.videos / len(self.chunks_of))
        self.bar.update(s.chunks, f"{s.frames} frames ({s.frames / max(now - self.start, 1e-9):.1f}/s), "
                                  f"{s.ok + s.empty + s.failed}/{self.videos} videos", total=max(total, s.chunks))
        if now - self.last < self.interval:
            return
        self.last = now
        done = s.ok + s.empty + s.failed
        self.bar.close()  # the log line goes on a line of its own; the bar redraws below it
        reused = f" ({s.reused_chunks} reused)" if s.reused_chunks else ""
        self.log(f"[segment] {done}/{self.videos} videos committed; {s.chunks} chunks{reused} and {s.frames} of "
                 f"{s.planned_frames} frames of the videos started done; {s.frames / (now - self.start):.1f} frames/s")


def _print_plan(todo: list[InputItem], config: SegmentJobConfig, actors: int,
                log: Callable[[str], None]) -> tuple[int, int, int]:
    """Probe and plan every video, print the table; returns the frames, chunks and largest chunk's frames."""
    lead_in = lead_in_frames(config.keyframes)
    largest = 0
    log("| video_id | uri | frames | fps | size | chunks | note |")
    log("|---|---|---|---|---|---|---|")
    total_frames = total_chunks = 0

    def probe(item: InputItem):
        try:
            return item, probe_video(item.uri), None
        except Exception as err:  # the plan reports bad inputs instead of stopping
            return item, None, err

    with ThreadPoolExecutor(max_workers=config.probe_concurrency) as pool:
        for position, (item, probe_result, err) in enumerate(pool.map(probe, todo)):
            if err is not None:
                log(f"| {item.video_id} | {redact(item.uri)} | unreadable: {redact(str(err))} | | | | |")
                continue
            codec = config.keyframes.codec
            split = finish_split(position, len(todo), actors)
            tasks = plan_tasks(item.video_id, item.uri, probe_result, config.aligned_chunk_frames, lead_in,
                               align_to_seek_points=codec, finish_split=split)
            chunks = 0 if tasks[0].chunk_index < 0 else len(tasks)
            note = tasks[0].plan_note if chunks else ""
            total_frames += probe_result.frame_count
            total_chunks += chunks
            largest = max([largest] + [t.stop - t.start for t in tasks if t.chunk_index >= 0])
            log(f"| {item.video_id} | {redact(item.uri)} | {probe_result.frame_count} | {probe_result.fps:.2f} | "
                f"{probe_result.width}x{probe_result.height} | {chunks} | {note} |")
    log(f"[segment] plan: {len(todo)} videos, {total_chunks} chunks of up to {config.aligned_chunk_frames} frames, "
        f"{total_frames} frames (dry run: nothing was loaded or written)")
    return total_frames, total_chunks, largest


def _print_summary(s: JobSummary, log: Callable[[str], None]) -> None:
    log("| video_id | status | frames | keyframes | mean confidence | label change | seconds |")
    log("|---|---|---|---|---|---|---|")
    for row in s.rows:
        conf = "" if row["mean_confidence"] is None else f"{row['mean_confidence']:.3f}"
        change = "" if row["mean_label_change_rate"] is None else f"{row['mean_label_change_rate']:.3f}"
        frames = row["frame_count"] if row["status"] != "failed" else "-"
        log(f"| {row['video_id']} | {row['status']} | {frames} | {row['keyframes'] or '-'} | {conf} | {change} | "
            f"{row['seconds']:.1f} |")
    reused = f", {s.reused_chunks} of {s.chunks} chunks reused from an interrupted run" if s.reused_chunks else ""
    skipped_files = f"; {s.skipped_files} file(s) in the inputs skipped (not videos)" if s.skipped_files else ""
    log(f"[segment] {s.ok} ok, {s.empty} empty, {s.failed} failed, {s.skipped} skipped (already committed){reused}"
        f"{skipped_files}; "
        f"{s.frames} frames in {s.seconds:.1f}s ({s.frames_per_second:.1f} frames/s); "
        f"peak actor memory {s.peak_actor_rss_mb:.0f} MiB; exit {int(s.exit_code)}")
    busy = s.actor_s["seconds"]
    if busy:
        share = {stage: 100 * s.actor_s[stage] / busy for stage in ACTOR_STAGES}
        log(f"[segment] actors busy {busy:.1f}s: model {share['model_s']:.0f}%, waiting on decode "
            f"{share['decode_wait_s']:.0f}%, masks and metrics {share['rows_s']:.0f}%, Parquet writes "
            f"{share['write_s']:.0f}%; {s.actor_s['cpu_s'] / busy:.2f} cores used per busy actor (reserved: "
            f"{s.resources.cpus_per_actor:g}); first actor ready after {s.startup_s:.1f}s")


def _write_manifest(layout: OutputLayout, config: SegmentJobConfig, s: JobSummary, digest: str,
                    resolution: tuple[int, int], started: dt.datetime) -> None:
    settings = asdict(config)
    settings["inputs"] = [redact(u) for u in config.inputs]
    settings["output"] = redact(config.output)
    settings["checkpoint"] = redact(config.checkpoint)
    manifest = {
        "format": "dcfm-segment-run/1",
        "run_id": s.run_id,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": json.loads(json.dumps(settings, default=str)),
        "resolution": list(resolution),
        "checkpoint_digest": digest,
        "packages": _package_versions(),
        "counts": {"inputs": s.videos, "ok": s.ok, "empty": s.empty, "failed": s.failed, "skipped": s.skipped,
                   "chunks": s.chunks, "reused_chunks": s.reused_chunks, "frames": s.frames,
                   "skipped_files": s.skipped_files},
        "skipped_file_examples": s.skipped_file_examples,
        "warnings": {row["video_id"]: row["warning"] for row in s.rows if row.get("warning")},
        "timings": {"seconds": s.seconds, "frames_per_second": s.frames_per_second,
                    "startup_s": s.startup_s, "work_s": s.work_s, "actor_s": s.actor_s},
        "resources": asdict(s.resources) if s.resources else None,
        "actors": s.actors,
        "peak_actor_rss_mb": s.peak_actor_rss_mb,
    }
    stamp = started.strftime("%Y%m%dT%H%M%S%fZ")
    storage.write_bytes_atomic(layout.run_manifest(s.run_id, stamp), json.dumps(manifest, indent=2).encode())
