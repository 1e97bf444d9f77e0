"""`dcfm report`: one self-contained HTML page about a segment job's output.

Sections: the run manifests (settings, timings, counts; newest first), a table of every committed video with
its status and metrics (and links to its renders when ``--renders DIR`` holds them), the share of pixels of
each class over all committed frames (a bar chart, embedded as a PNG data URI), and the error list. Styles
and the chart are inside the page; only the links to renders point elsewhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dcfm import storage
from dcfm.labels.committed import ClassInfo, CommittedVideo, class_info, committed_videos, run_manifests
from dcfm.segment.outputs import OutputLayout

RENDER_KINDS = (("overlay.mp4", "overlay video"), ("contact.png", "contact sheet"), ("timeline.png", "timeline"))
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#eee}td.num{text-align:right}.failed{color:#b00}.ok{color:#070}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
"""


@dataclass
class ReportConfig:
    output: str  # a segment job's --output
    to: str  # the .html file (local or s3://)
    renders: str | None = None  # a `dcfm render --to` directory to link to
    checkpoint: str | None = None  # for class names; default: the run manifest's


def class_pixels(videos: Sequence[CommittedVideo], num_classes: int) -> np.ndarray:
    """Pixels of each class over every frame of ``videos`` (only the class_pixels column is read)."""
    totals = np.zeros(num_classes, dtype=np.int64)
    for video in videos:
        for uri in video.frame_files:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(columns=["class_pixels"]):
                    for frame in batch.column(0).to_pylist():
                        for item in frame:
                            if item["class_id"] >= len(totals):
                                totals = np.pad(totals, (0, item["class_id"] + 1 - len(totals)))
                            totals[item["class_id"]] += item["pixels"]
    return totals


def class_share_chart(pixels: np.ndarray, classes: ClassInfo) -> bytes:
    """Horizontal bars: share of all pixels per class, in the class colours."""
    from matplotlib.figure import Figure

    share = pixels / max(1, int(pixels.sum()))
    names = [classes.names[i] if i < len(classes.names) else f"class_{i}" for i in range(len(pixels))]
    colours = [tuple(c / 255 for c in classes.palette[i]) if i < len(classes.palette) else (0.5, 0.5, 0.5)
               for i in range(len(pixels))]
    fig = Figure(figsize=(7, 0.3 * len(pixels) + 1), dpi=100)
    ax = fig.subplots()
    ax.barh(range(len(pixels)), share, color=colours, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(pixels)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of pixels")
    for i, value in enumerate(share):
        ax.text(value, i, f" {100 * value:.1f}%", va="center", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.{digits}f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _render_links(renders: str | None, video_id: str, page: str) -> str:
    if not renders:
        return ""
    links = []
    for suffix, label in RENDER_KINDS:
        uri = storage.join(renders, f"{video_id}.{suffix}")
        if storage.exists(uri):
            local = "://" not in uri and "://" not in page
            href = os.path.relpath(uri, os.path.dirname(os.path.abspath(page))) if local else uri
            links.append(f'<a href="{html.escape(href)}">{label}</a>')
    return " · ".join(links)


def _errors(output: str, videos: Sequence[CommittedVideo]) -> list[dict[str, Any]]:
    layout = OutputLayout(output)
    rows = []
    for video in videos:
        if video.status != "failed":
            continue
        uri = storage.join(layout.errors_dir(video.video_id), "part-0.parquet")
        if storage.exists(uri):
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as handle:
                rows += [{**r, "video_id": video.video_id} for r in pq.read_table(handle).to_pylist()]
    return rows


def build_report(config: ReportConfig) -> str:
    """The page's HTML."""
    videos = committed_videos(config.output, statuses=None)
    ok = [v for v in videos if v.status == "ok"]
    manifests = list(reversed(run_manifests(config.output)))
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dcfm report: "
             f"{html.escape(config.output)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Segmentation report</h1><p>Output <code>{html.escape(config.output)}</code>: "
             f"{len(videos)} committed videos ({len(ok)} ok, {sum(v.status == 'failed' for v in videos)} failed, "
             f"{sum(v.status == 'empty' for v in videos)} empty), "
             f"{sum(v.frame_count for v in ok)} frames.</p>"]

    parts.append("<h2>Runs</h2>")
    if not manifests:
        parts.append("<p>No run manifest.</p>")
    for manifest in manifests:
        counts, timings = manifest.get("counts", {}), manifest.get("timings", {})
        parts.append(f"<h3 id=\"run-{html.escape(manifest['run_id'])}\">Run {html.escape(manifest['run_id'])}, "
                     f"{html.escape(str(manifest.get('started', '')))}</h3><table><tr>"
                     + "".join(f"<th>{html.escape(k)}</th>" for k in counts) + "<th>seconds</th><th>frames/s</th>"
                     "<th>start-up s</th></tr><tr>" + "".join(_cell(v) for v in counts.values())
                     + _cell(timings.get("seconds"), 1) + _cell(timings.get("frames_per_second"), 1)
                     + _cell(timings.get("startup_s"), 1) + "</tr></table>")
        parts.append("<details><summary>settings, actor time, packages</summary><pre>"
                     + html.escape(json.dumps({"config": manifest.get("config"), "resolution":
                                               manifest.get("resolution"), "actor_s": timings.get("actor_s"),
                                               "checkpoint_digest": manifest.get("checkpoint_digest"),
                                               "packages": manifest.get("packages")}, indent=2))
                     + "</pre></details>")

    parts.append("<h2>Videos</h2><table><tr><th>video</th><th>status</th><th>frames</th><th>keyframes</th>"
                 "<th>size</th><th>fps</th><th>mean confidence</th><th>label change</th><th>keyframe agreement"
                 "</th><th>seconds</th><th>renders</th><th>uri / error</th></tr>")
    for video in videos:
        row = video.row
        size = f"{row['width']}x{row['height']}" if row.get("width") else None
        parts.append(f"<tr><td>{html.escape(video.video_id)}</td><td class=\"{html.escape(video.status)}\">"
                     f"{html.escape(video.status)}</td>" + _cell(row.get("frame_count")) + _cell(row.get("keyframes"))
                     + _cell(size) + _cell(row.get("fps"), 2) + _cell(row.get("mean_confidence"))
                     + _cell(row.get("mean_label_change_rate")) + _cell(row.get("mean_keyframe_agreement"))
                     + _cell(row.get("seconds"), 1)
                     + f"<td>{_render_links(config.renders, video.video_id, config.to)}</td>"
                     + _cell(row.get("error") or video.video_uri) + "</tr>")
    parts.append("</table>")

    parts.append("<h2>Class share</h2>")
    if ok:
        classes = class_info(config.output, ok, config.checkpoint)
        pixels = class_pixels(ok, len(classes.names))
        chart = base64.b64encode(class_share_chart(pixels, classes)).decode()
        parts.append(f'<img alt="share of pixels per class" src="data:image/png;base64,{chart}">')
        parts.append("<table><tr><th>class</th><th>pixels</th><th>share</th></tr>" + "".join(
            f"<tr><td>{html.escape(classes.names[i] if i < len(classes.names) else f'class_{i}')}</td>"
            + _cell(int(p)) + _cell(float(p / max(1, pixels.sum()))) + "</tr>" for i, p in enumerate(pixels))
            + "</table>")
    else:
        parts.append("<p>No video with masks.</p>")

    errors = _errors(config.output, videos)
    parts.append(f"<h2>Errors ({len(errors)})</h2>")
    if errors:
        parts.append("<table><tr><th>video</th><th>chunk</th><th>stage</th><th>type</th><th>message</th></tr>"
                     + "".join("<tr>" + _cell(e["video_id"]) + _cell(e.get("chunk_index")) + _cell(e.get("stage"))
                               + _cell(e.get("error_type")) + _cell(e.get("message")) + "</tr>" for e in errors)
                     + "</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(config: ReportConfig, log: Callable[[str], None] = print) -> str:
    """Write the page to ``config.to``; returns its URI."""
    log = storage.redacting(log)
    page = build_report(config)
    storage.write_bytes_atomic(config.to, page.encode())
    log(f"[report] {config.to}")
    return config.to

