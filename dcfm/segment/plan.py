"""Split probed videos into chunk tasks.

Chunks are ``aligned_chunk_frames`` long, a multiple of the keyframe interval, so a fixed schedule puts
keyframes on the same frames whatever the chunking. To make every row independent of chunking, a chunk
also decodes

* a *lead-in* from the previous keyframe (``start - k``, fixed schedules): the frame before ``start`` is
  segmented exactly as the previous chunk segments it, which gives ``label_change_rate`` of the chunk's
  first frame;
* one *look-ahead* frame (``stop``, the next chunk's first frame, always a keyframe): the next keyframe of
  the chunk's last frames in bidirectional mode.

A chunk that starts between seek points decodes from the seek point before it ("pre-roll"). A boundary
whose pre-roll is over budget first moves, by up to a quarter chunk, to just after a nearby seek point. Where
seek points are too sparse for the chunk length (a long video whose only keyframe is frame 0 would decode every
chunk from the top: quadratic), chunk boundaries are dropped, cheapest first, until the pre-roll of the
whole video is at most ``PREROLL_SHARE`` of its frames: fewer, larger chunks, down to one sequential chunk.
``ChunkPlan.note`` says so. With several actors, the job's last videos end in half-length chunks
(``finish_split``), so the actors run out of work together.

Tasks travel through Ray Data as JSON strings: flat, schema-free rows that Arrow never has to guess.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from dcfm.decode import VideoError, VideoProbe, probe_video, seek_start
from dcfm.faults import Fault, RetryPolicy, Side, TransientFailure
from dcfm.storage import redact

if TYPE_CHECKING:  # planning runs in Ray tasks that must start fast: no torch here
    from dcfm.inference import KeyframePolicy


@dataclass
class ProbeInfo:
    """What the job needs of a probe, serialisable."""

    frame_count: int
    fps: float
    codec: str
    width: int
    height: int
    duration_s: float
    warning: str | None = None  # VideoProbe.warning: the container declares more video than its frames hold


@dataclass
class TaskError:
    """Why an input or chunk failed, as its errors/ row will say it."""

    stage: str
    error_type: str
    message: str
    # The traceback of an unexpected exception (a bug, not bad input), so it can be reported; None otherwise.
    detail: str | None = None
    # INPUT: the video is committed as failed. Anything else stops the job (exit 3) and commits nothing of it.
    fault: Fault = Fault.INPUT

    def __post_init__(self) -> None:
        # Messages and tracebacks quote URIs: they leave the actor redacted, so no log, row or staged summary
        # ever holds a signature or password.
        self.message = redact(self.message)
        self.detail = redact(self.detail) if self.detail is not None else None
        self.fault = Fault(self.fault)  # from JSON it arrives as its value

    @classmethod
    def stopped(cls, stage: str, err: TransientFailure) -> TaskError:
        """The error of a chunk or probe whose transient failure outlasted its retries."""
        return cls(stage, type(err).__name__, str(err), fault=err.fault)


@dataclass
class ChunkTask:
    """One unit of actor work: frames [start, stop) of a video, or a pass-through for a failed/empty input."""

    video_id: str
    uri: str
    chunk_index: int
    num_chunks: int
    start: int = 0
    stop: int = 0
    lead_start: int = 0  # first frame decoded (<= start)
    decode_stop: int = 0  # one past the last frame decoded (stop + 1 with a look-ahead frame)
    # The probe's window for this chunk (`VideoProbe.window`): the pts of frames pts_from.. up to
    # decode_stop and the seek points among them; frame-accurate seeking needs no more, and a chunk of a
    # long video stays small.
    pts_from: int = 0
    pts: list[int] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)
    time_base: tuple[int, int] = (1, 1)
    probe: ProbeInfo | None = None
    error: TaskError | None = None  # set when the input failed before chunking (chunk_index is then -1)
    # A run that was interrupted staged this chunk already (its summary file exists): the actor reuses it.
    staged: bool = False
    plan_note: str = ""  # on chunk 0: why the video has fewer chunks than --chunk-frames asks (ChunkPlan.note)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def video_probe(self) -> VideoProbe:
        """The decoder's view of the video this chunk belongs to."""
        assert self.probe is not None
        p = self.probe
        return VideoProbe(
            uri=self.uri, frame_count=p.frame_count, pts=tuple(self.pts), time_base=Fraction(*self.time_base),
            fps=p.fps, duration_s=p.duration_s, codec=p.codec, width=p.width, height=p.height,
            keyframes=tuple(self.keyframes), first_index=self.pts_from,
        )

    @classmethod
    def from_json(cls, text: str) -> ChunkTask:
        data = json.loads(text)
        data["time_base"] = tuple(data["time_base"])
        data["probe"] = ProbeInfo(**data["probe"]) if data["probe"] else None
        data["error"] = TaskError(**data["error"]) if data["error"] else None
        return cls(**data)


def lead_in_frames(policy: KeyframePolicy) -> int:
    """How far before a chunk's start decoding begins: back to the previous keyframe (fixed schedules).

    Adaptive and codec schedules start every chunk on a keyframe of its own and decode no lead-in, so the
    first frame of each chunk has no label_change_rate (null) there.
    """
    return 0 if not policy.fixed else policy.interval


def chunk_bounds(frame_count: int, chunk_frames: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk."""
    return [(s, min(s + chunk_frames, frame_count)) for s in range(0, frame_count, chunk_frames)]


def seek_point_bounds(frame_count: int, chunk_frames: int, seek_points: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) of chunks that start on the stream's seek points (codec keyframes): each chunk runs to the
    first seek point at least ``chunk_frames`` after its start (or to the end), so it starts on a keyframe."""
    starts = [0]
    for point in sorted(seek_points):
        if point - starts[-1] >= chunk_frames and point < frame_count:
            starts.append(point)
    return list(zip(starts, starts[1:] + [frame_count]))


def finish_split(position: int, videos: int, actors: int) -> int:
    """How many of its last chunks the video at ``position`` of a job's ``videos`` halves: the last videos
    of a job with several actors end in half-length chunks, so the actors run out of work close together
    instead of one finishing a whole chunk alone (the pool hands chunks out in order)."""
    return actors if actors > 1 and position >= videos - actors else 0


def halve_last(bounds: list[tuple[int, int]], count: int, chunk_frames: int,
               midpoints: Callable[[int, int], list[int]]) -> list[tuple[int, int]]:
    """Split each of the last ``count`` chunks at the best of ``midpoints(start, stop)`` (best first), where
    the chunk is at least half of ``chunk_frames`` and a midpoint exists."""
    if count <= 0:
        return bounds
    halved = list(bounds[:-count])
    for start, stop in bounds[-count:]:
        options = midpoints(start, stop) if stop - start >= chunk_frames // 2 else []
        halved += [(start, options[0]), (options[0], stop)] if options else [(start, stop)]
    return halved


def probe_info(probe: VideoProbe) -> ProbeInfo:
    return ProbeInfo(probe.frame_count, probe.fps, probe.codec, probe.width, probe.height, probe.duration_s,
                     probe.warning)


# At most this share of a video's frames is decoded only to reach chunk starts between seek points.
PREROLL_SHARE = 0.1


@dataclass
class ChunkPlan:
    bounds: list[tuple[int, int]]
    decoded_frames: int  # frames decode_range decodes for all chunks: pre-roll, lead-in, look-ahead included
    note: str = ""  # why chunks were merged, if they were


def plan_chunks(probe: VideoProbe, chunk_frames: int, lead_in: int, finish_split: int = 0) -> ChunkPlan:
    """Chunk boundaries of a video: every ``chunk_frames``, moved by up to a quarter chunk to just after a seek
    point where that saves pre-roll, and dropped where the pre-roll would still exceed the budget; the last
    ``finish_split`` chunks are halved where a start near their middle fits the budget."""
    n = probe.frame_count

    def cost(start: int) -> int:  # frames decoded only to reach the chunk's lead-in
        lead_start = max(0, start - lead_in)
        return lead_start - seek_start(probe, lead_start)

    base = chunk_bounds(n, chunk_frames)
    # Moves keep a boundary on the keyframe schedule: steps of the interval (the lead-in of fixed schedules).
    step = max(1, lead_in)
    reach = chunk_frames // 4 // step
    # A boundary is kept only if its pre-roll is at most PREROLL_SHARE of the chunk it ends: each chunk
    # pays for the next one's pre-roll, so the video's total stays within PREROLL_SHARE of its frames, and
    # where seek points are sparse chunks grow to span them. Where the boundary itself is over budget but a
    # start a few frames away is not (footage with a seek point every second or two), that start is taken.
    # Each boundary is sought ``chunk_frames`` after the previous one, not on a fixed grid: a boundary moved
    # early and the next moved late would make a chunk half as long again as the others, and the actor
    # that draws it finishes the video alone.
    starts = [0]
    merged = False
    target = chunk_frames
    while target < n:
        near = [target + j * step for j in range(-reach, reach + 1) if starts[-1] < target + j * step < n]
        fits = [s for s in near if cost(s) <= PREROLL_SHARE * (s - starts[-1])]
        if fits:
            starts.append(min(fits, key=lambda s: (cost(s), abs(s - target))))
            target = starts[-1] + chunk_frames
        else:
            merged = True
            target += chunk_frames
    bounds = [(a, b) for a, b in zip(starts, [*starts[1:], n])] if n else []

    def midpoints(start: int, stop: int) -> list[int]:  # on the schedule, within budget, middle-most first
        quarter = (stop - start) // 4
        options = [m for m in range(start + quarter, stop - quarter + 1) if m % step == 0 and start < m < stop
                   and cost(m) <= PREROLL_SHARE * (m - start)]
        return sorted(options, key=lambda m: (cost(m), abs(2 * m - start - stop)))

    bounds = halve_last(bounds, finish_split, chunk_frames, midpoints)
    decoded = sum(min(n, b + 1) - seek_start(probe, max(0, a - lead_in)) for a, b in bounds)
    note = ""
    if merged:
        gaps = len(probe.keyframes) and n / len(probe.keyframes)
        where = "only frame 0 is a seek point" if len(probe.keyframes) <= 1 else f"a seek point every ~{gaps:.0f} frames"
        shape = "one sequential chunk" if len(bounds) == 1 else f"{len(bounds)} chunks instead of {len(base)}"
        note = (f"{shape}: {where}, so chunks of {chunk_frames} frames would decode "
                f"{sum(cost(start) for start, _ in base[1:]) + n} frames to reach their starts; now {decoded} "
                f"decoded for {n}")
    return ChunkPlan(bounds, decoded, note)


def plan_tasks(video_id: str, uri: str, probe: VideoProbe, chunk_frames: int, lead_in: int,
               staged: frozenset[int] = frozenset(), align_to_seek_points: bool = False,
               finish_split: int = 0) -> list[ChunkTask]:
    """The chunk tasks of one probed video (one pass-through task for an empty video).

    ``staged``: chunk indices an interrupted run of the same settings already staged.
    ``align_to_seek_points`` (codec keyframes): chunks start on the stream's seek points.
    ``finish_split``: how many of the video's last chunks are halved (see ``finish_split``).
    """
    n = probe.frame_count
    info = probe_info(probe)
    if n == 0:
        return [ChunkTask(video_id, uri, chunk_index=-1, num_chunks=1, probe=info)]
    if align_to_seek_points:  # chunks start on seek points: no pre-roll to budget
        def seek_midpoints(start: int, stop: int) -> list[int]:
            quarter = (stop - start) // 4
            inside = [p for p in probe.keyframes if start + quarter <= p <= stop - quarter and start < p < stop]
            return sorted(inside, key=lambda p: abs(2 * p - start - stop))

        bounds = halve_last(seek_point_bounds(n, chunk_frames, probe.keyframes), finish_split, chunk_frames,
                            seek_midpoints)
        plan = ChunkPlan(bounds, n)
    else:
        plan = plan_chunks(probe, chunk_frames, lead_in, finish_split)
    bounds = plan.bounds
    time_base = (probe.time_base.numerator, probe.time_base.denominator)
    tasks = []
    for index, (start, stop) in enumerate(bounds):
        lead_start, decode_stop = max(0, start - lead_in), min(n, stop + 1)
        window = probe.window(lead_start, decode_stop)
        tasks.append(ChunkTask(
            video_id, uri, index, len(bounds), start, stop, lead_start=lead_start, decode_stop=decode_stop,
            pts_from=window.first_index, pts=list(window.pts), keyframes=list(window.keyframes),
            time_base=time_base, probe=info, staged=index in staged, plan_note=plan.note if index == 0 else "",
        ))
    return tasks


def staged_chunks(staging_dir: str | None) -> frozenset[int]:
    """Indices of the chunks whose summary an earlier, interrupted run of this run id left in staging."""
    if staging_dir is None:
        return frozenset()
    from dcfm import storage

    fs, path = storage.filesystem(staging_dir)
    try:
        # Fresh: the killed run's actors staged these from other processes, and this worker process (Ray reuses
        # them across jobs) may hold a listing of the directory cached before they did (s3fs keeps them).
        names = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return frozenset()
    bases = {name.rsplit("/", 1)[-1] for name in names}
    found = set()
    for base in bases:
        # Both files: a driver killed after moving a chunk's Parquet file into frames/ leaves its summary behind.
        if base.startswith("part-") and base.endswith(".json") and base[:-len(".json")] + ".parquet" in bases:
            found.add(int(base[len("part-"):-len(".json")]))
    return frozenset(found)


def plan_video(row: dict, chunk_frames: int, lead_in: int, staging: str | None = None,
               align_to_seek_points: bool = False, retry: RetryPolicy | None = None) -> list[dict]:
    """Ray Data flat_map: probe one input and emit its chunk tasks (or one failed pass-through task).
    The row may carry ``finish_split`` (see ``finish_split``).

    ``staging``: the run's staging root; chunks already staged there are marked for reuse. ``retry``: how
    transient storage failures are retried; one that outlasts it becomes a pass-through task whose error
    stops the job instead of failing the video.
    """
    from dcfm.storage import redact

    video_id, uri = str(row["video_id"]), str(row["uri"])
    retry = retry or RetryPolicy()
    try:
        probe = retry.call(lambda: probe_video(uri), Side.INPUT, f"probing {redact(uri)}", log=print)
        staging_dir = f"{staging.rstrip('/')}/{video_id}" if staging else None
        staged = retry.call(lambda: staged_chunks(staging_dir), Side.OUTPUT, f"listing {redact(str(staging_dir))}", log=print)
        tasks = plan_tasks(video_id, uri, probe, chunk_frames, lead_in, staged, align_to_seek_points,
                           finish_split=int(row.get("finish_split") or 0))
    except TransientFailure as err:
        tasks = [ChunkTask(video_id, uri, -1, 1, error=TaskError.stopped("probe", err))]
    except VideoError as err:
        tasks = [ChunkTask(video_id, uri, -1, 1, error=TaskError(err.stage, type(err).__name__, str(err)))]
    except Exception as err:  # an unexpected probe failure is still this input's failure alone
        message = f"{uri}: {type(err).__name__}: {err}"
        error = TaskError("probe", type(err).__name__, message, detail=traceback.format_exc(limit=8))
        tasks = [ChunkTask(video_id, uri, -1, 1, error=error)]
    return [{"video_id": video_id, "task": t.to_json()} for t in tasks]
