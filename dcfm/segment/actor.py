"""The Ray Data actor that segments chunks: loads the model once, decodes in a background thread while
the model computes, writes each chunk's frame rows to staging, and returns a small summary per chunk."""

from __future__ import annotations

import io
import json
import os
import queue
import resource
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import load_checkpoint
from dcfm.decode import VideoError, decode_range
from dcfm.devices import pick_device
from dcfm.faults import RetryPolicy, Side, TransientFailure, on_output
from dcfm.inference import ClipSegmenter, FrameResult, InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.metrics import label_change_rate
from dcfm.schemas import output_schema
from dcfm.segment.config import MaskResolution
from dcfm.segment.outputs import OutputLayout, parquet_bytes, table_for
from dcfm.segment.plan import ChunkTask, TaskError
from dcfm.storage import redact

_DONE = object()


@dataclass
class ActorSettings:
    """What every actor needs; picklable."""

    checkpoint: str
    model_digest: str
    output: str
    run_id: str
    keyframes: KeyframePolicy
    mode: ReuseMode
    resolution: tuple[int, int]
    mask_resolution: MaskResolution
    batch_size: int
    device: str
    threads: int
    # A staged chunk is reused by a later run only if that run has the same run id; False (--overwrite)
    # recomputes it anyway.
    reuse_staged: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # transient storage failures, per chunk

    def to_json(self) -> str:
        """Plain JSON. The pipeline hands actors this rather than the dataclass: Ray Data ships its operators'
        arguments to its stats actor, which would otherwise unpickle these enums and import torch to do so
        (~4 CPU-seconds taken from the actors at the start of every run on a fresh Ray)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ActorSettings:
        data = json.loads(text)
        return cls(**{**data, "keyframes": KeyframePolicy(**data["keyframes"]), "mode": ReuseMode(data["mode"]),
                      "resolution": tuple(data["resolution"]),
                      "mask_resolution": MaskResolution(data["mask_resolution"]),
                      "retry": RetryPolicy(**data["retry"])})


@dataclass
class ChunkSummary:
    """What the driver learns of a chunk; the frame rows themselves went to staging."""

    video_id: str
    uri: str
    chunk_index: int
    num_chunks: int
    status: str  # ok | failed | empty
    start: int = 0
    stop: int = 0
    frames: int = 0
    keyframes: int = 0
    confidence_sum: float = 0.0
    change_sum: float = 0.0
    change_count: int = 0
    agreement_sum: float = 0.0
    agreement_count: int = 0
    seconds: float = 0.0
    # Where the chunk's seconds went (they add up to `seconds` less set-up): waiting on the decoder,
    # the model (inference, upsampling, argmax), building rows (PNG masks, metrics), writing Parquet.
    decode_wait_s: float = 0.0
    model_s: float = 0.0
    rows_s: float = 0.0
    write_s: float = 0.0
    # CPU seconds of the actor's whole process over the chunk (the model, decoder and mask threads, Ray's own):
    # over ``seconds`` it is the cores the actor used, to hold against its --cpus-per-actor.
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0  # the actor's peak resident memory after this chunk
    # Unix time the actor that ran this chunk had its model loaded. Wall clock, because the driver must
    # compare it with its own start; nodes of one cluster agree to well under a second (NTP).
    actor_ready_at: float = 0.0
    started_at: float = 0.0  # Unix time the actor began the chunk (same clock)
    # The actor that computed the chunk: Ray node id and process id.
    node_id: str = ""
    pid: int = 0
    reused: bool = False  # staged by an earlier, interrupted run and reused as it was
    probe: dict | None = None
    error: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def prefetch(items: Iterable, depth: int) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead: decoding overlaps compute
    (PyAV and torch both release the GIL), and memory stays bounded."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(_DONE)
        except BaseException as err:  # re-raised in the consumer, with the decoder's own traceback
            buffer.put(err)
        finally:
            # Close the source here, in the thread that iterated it, so an abandoned decode releases
            # its container now rather than whenever the generator is collected.
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="dcfm-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside Ray (tests, benchmarks calling the actor directly)
        return ""


def encode_mask(labels: np.ndarray) -> bytes:
    """Single-channel PNG: 8-bit, or 16-bit for label maps above 256 classes."""
    image = Image.fromarray(labels if labels.dtype == np.uint8 else labels.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def class_pixels(labels: np.ndarray) -> list[dict[str, int]]:
    counts = np.bincount(labels.ravel())
    present = np.flatnonzero(counts)
    return [{"class_id": int(c), "pixels": int(counts[c])} for c in present]


class ChunkSegmenter:
    """Callable class for ``Dataset.map_batches``: one model per actor, one summary row per chunk."""

    def __init__(self, settings: ActorSettings | str) -> None:
        """``settings``: the dataclass, or its ``to_json`` (what the pipeline passes)."""
        if isinstance(settings, str):
            settings = ActorSettings.from_json(settings)
        self.settings = settings
        torch.set_num_threads(max(1, settings.threads))
        self.device = pick_device(settings.device)
        # A storage blip while loading is retried; one that outlasts the retries fails the actor's start,
        # which reaches the driver as a transient failure (exit 3).
        loaded = settings.retry.call(lambda: load_checkpoint(settings.checkpoint, self.device), Side.OUTPUT,
                                     f"loading the checkpoint {storage.redact(settings.checkpoint)}", log=print)
        if loaded.digest != settings.model_digest:
            raise RuntimeError(
                f"{settings.checkpoint} changed while the job was running (weights digest {loaded.digest[:12]}, "
                f"expected {settings.model_digest[:12]}); rerun the job"
            )
        self.model = loaded.model
        self.card = loaded.card
        self.layout = OutputLayout(settings.output)
        self.pid = os.getpid()
        self.node_id = _node_id()
        self.ready_at = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        summaries = [self.run(ChunkTask.from_json(str(text))).to_json() for text in batch["task"]]
        return {"video_id": [str(v) for v in batch["video_id"]], "summary": summaries}

    def run(self, task: ChunkTask) -> ChunkSummary:
        """Segment one chunk; any failure becomes a failed summary, never an exception."""
        begin, begin_cpu = time.perf_counter(), time.process_time()
        base = ChunkSummary(
            task.video_id, redact(task.uri), task.chunk_index, task.num_chunks, status="ok", start=task.start,
            stop=task.stop, probe=asdict(task.probe) if task.probe else None, actor_ready_at=self.ready_at,
            node_id=self.node_id, pid=self.pid, extra={"plan_note": task.plan_note} if task.plan_note else {},
            started_at=time.time(),
        )
        if task.error is not None:
            return replace(base, status="failed", error=asdict(task.error))
        if task.chunk_index < 0:
            return replace(base, status="empty")
        try:
            # Storage and network failures are retried with backoff (a fresh copy of the summary each time);
            # a failure of the input itself is not, and one that outlasts the retries stops the job instead
            # of failing the video.
            summary = self.settings.retry.call(lambda: self._attempt(task, replace(base)), Side.INPUT,
                                               f"{storage.redact(task.uri)} chunk {task.chunk_index}", log=print)
        except TransientFailure as err:
            summary = replace(base, status="failed", error=asdict(TaskError.stopped("segment", err)))
        except VideoError as err:
            summary = replace(base, status="failed", error=asdict(TaskError(err.stage, type(err).__name__, str(err))))
        except Exception as err:  # one bad chunk must not take the batch down; the driver records it
            message = f"{task.uri} chunk {task.chunk_index}: {type(err).__name__}: {err}"
            error = TaskError("segment", type(err).__name__, message, detail=traceback.format_exc(limit=8))
            summary = replace(base, status="failed", error=asdict(error))
        if not summary.reused:
            summary.seconds = time.perf_counter() - begin
            summary.cpu_s = time.process_time() - begin_cpu
        # ru_maxrss is the actor process's peak so far (KiB on Linux): memory stays bounded when it does not
        # grow with video length.
        summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return summary

    def _attempt(self, task: ChunkTask, base: ChunkSummary) -> ChunkSummary:
        """One try at a chunk: reuse what an interrupted run staged, or segment it and stage it."""
        if task.staged and self.settings.reuse_staged:
            reused = self._staged_summary(task)
            if reused is not None:
                return reused
        begin, begin_cpu = time.perf_counter(), time.process_time()
        summary = self._segment(task, base)
        summary.seconds, summary.cpu_s = time.perf_counter() - begin, time.process_time() - begin_cpu
        # Written after the chunk's Parquet file: its presence says the chunk is staged in full, so a
        # rerun after a killed driver reuses it instead of recomputing it.
        uri = self.layout.staging_summary(self.settings.run_id, task.video_id, task.chunk_index)
        with on_output(uri):
            storage.write_bytes_atomic(uri, summary.to_json().encode())
        return summary

    def _segment(self, task: ChunkTask, summary: ChunkSummary) -> ChunkSummary:
        s = self.settings
        assert task.probe is not None
        source_size = (task.probe.height, task.probe.width)
        output_size = source_size if s.mask_resolution is MaskResolution.SOURCE else s.resolution
        segmenter = ClipSegmenter(
            self.model,
            InferenceConfig(
                keyframes=s.keyframes, mode=s.mode, batch_size=s.batch_size, output_size=output_size,
                mean=self.card.mean, std=self.card.std,
            ),
            device=self.device,
        )
        timestamps: dict[int, float] = {}

        def frames() -> Iterator[np.ndarray]:
            decoded = decode_range(task.uri, task.video_probe(), task.lead_start, task.decode_stop, size=s.resolution,
                                   threads=s.threads)
            with closing(prefetch(decoded, 2 * s.batch_size)) as buffered:
                while True:
                    asked = time.perf_counter()
                    frame = next(buffered, None)
                    summary.decode_wait_s += time.perf_counter() - asked
                    if frame is None:
                        return
                    timestamps[frame.index] = frame.timestamp_s
                    yield frame.rgb

        lookahead = task.stop - task.lead_start if task.decode_stop > task.stop else None
        rows: dict[str, list] = {name: [] for name in output_schema("frames").file_schema.names}
        previous: np.ndarray | None = None
        loop_start = time.perf_counter()
        # Masks (PNG), class counts and change rates are built in a thread beside the model (PNG encoding
        # and numpy release the GIL), in frame order; rows_s is the time the model loop waited for them.
        building: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcfm-rows") as builder:
            for result in segmenter.segment(frames(), start_index=task.lead_start, lookahead_from=lookahead,
                                            codec_keyframes=task.keyframes):
                if result.index >= task.start:
                    building.append(builder.submit(
                        self._row_values, task, result, previous, timestamps.pop(result.index), source_size))
                else:
                    timestamps.pop(result.index, None)
                previous = result.labels
                while len(building) > 2 * s.batch_size or (building and building[0].done()):
                    self._add_row(rows, building.popleft(), summary)
            while building:
                self._add_row(rows, building.popleft(), summary)
        summary.model_s = time.perf_counter() - loop_start - summary.rows_s - summary.decode_wait_s
        write_start = time.perf_counter()
        expected = task.stop - task.start
        if summary.frames != expected:
            raise VideoError(task.uri, "decode", f"{task.uri}: decoded {summary.frames} of the {expected} frames "
                             f"of chunk {task.chunk_index} ({task.start}-{task.stop}); the file may be truncated")
        staged = self.layout.staging_file(s.run_id, task.video_id, task.chunk_index)
        with on_output(staged):  # a full or read-only output is the output's failure, not the video's
            storage.write_bytes_atomic(staged, parquet_bytes(table_for("frames", rows)))
        summary.write_s = time.perf_counter() - write_start
        return summary

    def _staged_summary(self, task: ChunkTask) -> ChunkSummary | None:
        """The summary an interrupted run staged for this chunk, if it is for the same frames."""
        uri = self.layout.staging_summary(self.settings.run_id, task.video_id, task.chunk_index)
        try:
            data = json.loads(storage.read_bytes(uri))
        except (FileNotFoundError, ValueError):
            return None
        staged = ChunkSummary(**data)
        if (staged.start, staged.stop, staged.status) != (task.start, task.stop, "ok"):
            return None  # staged with other chunk lengths: recompute
        # The chunk count is this plan's: the interrupted run may have cut the video's other chunks
        # differently (its last chunks are halved or not with the number of actors), and the driver commits a
        # video once it holds that many chunks.
        return replace(staged, reused=True, num_chunks=task.num_chunks, node_id=self.node_id, pid=self.pid,
                       actor_ready_at=self.ready_at)

    def _row_values(
        self,
        task: ChunkTask,
        result: FrameResult,
        previous: np.ndarray | None,
        timestamp: float,
        source_size: tuple[int, int],
    ) -> dict:
        change = label_change_rate(previous, result.labels) if previous is not None else None
        return {
            "video_uri": redact(task.uri),
            "frame_index": result.index,
            "timestamp_s": timestamp,
            "is_keyframe": result.is_keyframe,
            "keyframes": list(result.keyframes),
            "height": source_size[0],
            "width": source_size[1],
            "mask_height": result.labels.shape[0],
            "mask_width": result.labels.shape[1],
            "mask_png": encode_mask(result.labels),
            "class_pixels": class_pixels(result.labels),
            "confidence": result.confidence,
            "label_change_rate": change,
            "keyframe_agreement": result.agreement,
            "run_id": self.settings.run_id,
            "model_digest": self.settings.model_digest,
        }

    def _add_row(self, rows: dict[str, list], built: Future, summary: ChunkSummary) -> None:
        waited = time.perf_counter()
        values = built.result()
        summary.rows_s += time.perf_counter() - waited
        for name, value in values.items():
            rows[name].append(value)
        summary.frames += 1
        summary.keyframes += int(values["is_keyframe"])
        summary.confidence_sum += values["confidence"]
        change = values["label_change_rate"]
        if change is not None:
            summary.change_sum += change
            summary.change_count += 1
        if values["keyframe_agreement"] is not None:
            summary.agreement_sum += values["keyframe_agreement"]
            summary.agreement_count += 1
