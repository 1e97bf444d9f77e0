"""The evaluate job: score a checkpoint on labelled clips under one or several inference settings.

Each clip is decoded (and resized to the model's resolution) once and then run under every setting, so a
sweep costs one decode per clip. A video is decoded and resized by the segment job's own decoder, so the
masks scored are the masks ``dcfm segment`` writes for the same checkpoint, resolution and keyframes.
Outputs under ``OUTPUT`` (local or ``s3://``)::

    OUTPUT/evaluation.json          header + one row per setting (see dcfm.evaluate.report.result_row)
    OUTPUT/evaluation.md            the same as Markdown tables
    OUTPUT/accuracy_vs_speed.png    mIoU (and VC8) against FPS, when more than one setting was scored
    OUTPUT/masks/<setting>/<clip>/<frame:06d>.png   predicted masks, with save_masks
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import load_checkpoint
from dcfm.data import open_clips
from dcfm.data.base import LabelledVideo
from dcfm.data.staging import stage_dataset
from dcfm.devices import pick_device
from dcfm.errors import ConfigError
from dcfm.evaluate.config import EvaluateJobConfig, Setting
from dcfm.evaluate.report import CONVENTIONS, accuracy_vs_speed_png, markdown, result_row
from dcfm.evaluate.score import SettingAccumulator, label_size, read_labels
from dcfm.inference import ClipSegmenter, FrameResult, InferenceConfig, KeyframePolicy
from dcfm.storage import redact

JSON_FILE, MARKDOWN_FILE, PLOT_FILE, MASKS_DIR = "evaluation.json", "evaluation.md", "accuracy_vs_speed.png", "masks"


@dataclass
class EvaluationSummary:
    header: dict[str, Any]
    rows: list[dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)  # what was written: json, markdown, plot, masks


def mask_uri(output: str, setting: str, video_id: str, index: int) -> str:
    return storage.join(output, MASKS_DIR, setting, video_id, f"{index:06d}.png")


def _mask_writer(output: str, setting: Setting) -> Callable[[LabelledVideo, FrameResult], None]:
    def write(video: LabelledVideo, result: FrameResult) -> None:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(result.labels)).save(buffer, format="PNG")
        storage.write_bytes_atomic(mask_uri(output, setting.name, video.video_id, result.index), buffer.getvalue())

    return write


def run_evaluate_job(config: EvaluateJobConfig, log: Callable[[str], None] = print) -> EvaluationSummary:
    """Evaluate ``config.checkpoint`` on ``config.data`` and write the reports to ``config.output``."""
    log = storage.redacting(log)
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_checkpoint(config.checkpoint, device)
    card = loaded.card
    clips = open_clips(stage_dataset(config.data, config.data_cache), config.layout, config.split, config.video_ids)
    if len(clips.classes) != card.config.num_classes:
        raise ValueError(f"{redact(config.checkpoint)} predicts {card.config.num_classes} classes but "
                         f"{redact(config.data)} ({clips.layout}) is labelled with {len(clips.classes)}; "
                         "evaluate on the data it was trained for")
    card.check_nonkey_scale(config.nonkey_scale, config.checkpoint)
    resolution = None if config.native_resolution else tuple(config.resolution or card.train_size)
    settings = config.settings()
    accumulators = [
        SettingAccumulator(
            loaded.model,
            InferenceConfig(keyframes=s.keyframes, mode=s.mode, batch_size=config.batch_size,
                            mean=card.mean, std=card.std),
            card.config.num_classes,
            mask_sink=_mask_writer(config.output, s) if config.save_masks else None,
        )
        for s in settings
    ]
    size = "native size" if resolution is None else f"{resolution[0]}x{resolution[1]}"
    # Before the work: a wrong URI or an evaluation of other clips fails fast.
    compared = [_read_evaluation(uri) for uri in config.compare]
    for evaluation in compared:
        _same_clips(evaluation, {"data": redact(config.data), "layout": clips.layout, "split": config.split,
                                 "videos": len(clips.videos), "resolution": _resolution_name(resolution)})
    log(f"[evaluate] {len(clips.videos)} {clips.layout} clips, {len(settings)} setting(s), "
        f"model {card.config.backbone} ({loaded.digest[:12]}) at {size} on {device}")
    t0 = time.perf_counter()
    for i, video in enumerate(clips.videos):
        # Decoded and resized once, outside the timed region; a video exactly as the segment job decodes it.
        inputs = list(video.iter_frames(resolution))
        output_size = label_size(video)
        labels = read_labels(video)
        if i == 0 and config.warmup:
            for acc in accumulators:  # first calls allocate and pick kernels; keep that out of the timings
                warm = replace(acc.config, output_size=output_size)
                warm = replace(warm, keyframes=KeyframePolicy(interval=2)) if not warm.keyframes.fixed else warm
                list(ClipSegmenter(loaded.model, warm).segment(inputs[: 2 * config.batch_size]))
        for acc in accumulators:
            acc.add(video, inputs, output_size, labels)
        log(f"[evaluate] clip {i + 1}/{len(clips.videos)} {video.video_id}: {len(inputs)} frames "
            f"({time.perf_counter() - t0:.0f}s)")
    rows = [result_row(s, acc.report(clips.classes), card.nonkey_scale) for s, acc in zip(settings, accumulators)]
    header = {
        "format": "dcfm-evaluation/1",
        "checkpoint": redact(config.checkpoint),
        "model_digest": loaded.digest,
        "backbone": card.config.backbone,
        "nonkey_scale": card.nonkey_scale,
        "data": redact(config.data),
        "layout": clips.layout,
        "split": config.split,
        "videos": len(clips.videos),
        "frames_per_setting": rows[0]["frames"],
        "labelled_frames": sum(len(v.labels) for v in clips.videos),
        "resolution": _resolution_name(resolution),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
        "conventions": CONVENTIONS,
    }
    if compared:
        header["compared"] = [_same_clips(evaluation, header) for evaluation in compared]
    return _write_outputs(config, header, rows, [row for e in compared for row in _rows_of(e)], log)


_COMPARED_ON = ("data", "layout", "split", "videos", "frames_per_setting", "resolution")


def _resolution_name(resolution: tuple[int, int] | None) -> str:
    return "native" if resolution is None else f"{resolution[0]}x{resolution[1]}"


def _read_evaluation(uri: str) -> dict[str, Any]:
    where = storage.join(uri, JSON_FILE)
    try:
        evaluation = json.loads(storage.read_bytes(where))
    except FileNotFoundError:
        raise ConfigError("compare", f"{redact(where)} does not exist: give the OUTPUT of an earlier "
                                     "`dcfm evaluate`") from None
    if evaluation.get("format") != "dcfm-evaluation/1":
        raise ConfigError("compare", f"{redact(where)} is not a dcfm evaluation (format {evaluation.get('format')!r})")
    return evaluation


def _same_clips(evaluation: dict[str, Any], header: dict[str, Any]) -> str:
    """The compared evaluation's checkpoint, once it is known to have scored the clips this run scored."""
    for key in (key for key in _COMPARED_ON if key in header):
        if evaluation.get(key) != header[key]:
            raise ConfigError("compare", f"the evaluation of {evaluation['checkpoint']} scored {key} "
                                         f"{evaluation.get(key)!r}, this run {header[key]!r}: compare evaluations "
                                         "of the same clips at the same resolution")
    return evaluation["checkpoint"]


def _rows_of(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    scale = evaluation.get("nonkey_scale", 1.0)
    return [{**row, "nonkey_scale": row.get("nonkey_scale", scale)} for row in evaluation["results"]]


def _write_outputs(config: EvaluateJobConfig, header: dict, rows: list[dict], compared_rows: list[dict],
                   log: Callable[[str], None]) -> EvaluationSummary:
    """``rows`` are this run's; ``compared_rows`` (from ``--compare``) join the table and the plot only."""
    summary = EvaluationSummary(header, rows)
    files = {"json": storage.join(config.output, JSON_FILE), "markdown": storage.join(config.output, MARKDOWN_FILE)}
    table = markdown(rows + compared_rows, header)
    storage.write_bytes_atomic(files["json"], json.dumps({**header, "results": rows}, indent=2).encode())
    storage.write_bytes_atomic(files["markdown"], table.encode())
    plotted = rows + compared_rows
    if len(plotted) > 1:
        files["plot"] = storage.join(config.output, PLOT_FILE)
        scales = sorted({row["nonkey_scale"] for row in plotted}, reverse=True)
        title = (f"{header['backbone']}, non-keyframes at {', '.join(f'{s:g}' for s in scales)}x, on "
                 f"{header['layout']} ({header['videos']} clips, {header['device']})")
        storage.write_bytes_atomic(files["plot"], accuracy_vs_speed_png(plotted, title))
    if config.save_masks:
        files["masks"] = storage.join(config.output, MASKS_DIR)
    summary.files = files
    log(table.split("\nPer-class IoU:")[0].rstrip())
    log(f"[evaluate] wrote {', '.join(files.values())}")
    return summary
