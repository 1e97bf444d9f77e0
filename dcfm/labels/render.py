"""`dcfm render`: look at one video's masks without writing code.

    DIR/<video_id>.overlay.mp4    every source frame blended with its coloured mask (H.264, source size):
                                  keyframes framed in yellow with "KEY" top left, the frame number top right,
                                  a legend of the classes in view bottom left
    DIR/<video_id>.overlay.png    the overlay of the lowest-scored frame (a still for reports and READMEs)
    DIR/<video_id>.contact.png    a grid of overlays: the lowest-scored half of the tiles, then keyframes
                                  spread over the video; COLUMNS x TILE_WIDTH px wide, rows x (tile height +
                                  CAPTION_HEIGHT) px high, rows = ceil(tiles / COLUMNS),
                                  tile height = TILE_WIDTH x H / W (rounded)
    DIR/<video_id>.timeline.png   TIMELINE_SIZE px: confidence, label change and keyframe agreement per frame,
                                  keyframes below, the lowest-scored frames in red

The source is read through the job's own decoder (``dcfm.decode``: probe, then a frame-accurate decode), frame
by frame alongside the committed mask rows, so memory stays flat however long the video is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dcfm import storage
from dcfm.errors import ConfigError
from dcfm.labels.committed import (METRIC_COLUMNS, ClassInfo, CommittedVideo, class_info, committed_videos,
                                   decode_mask, iter_frame_rows, iter_source_frames)
from dcfm.labels.files import staged_file
from dcfm.labels.review import FrameScore, frame_score, lowest
from dcfm.progress import ProgressBar

TILE_WIDTH = 320
CAPTION_HEIGHT = 20
TIMELINE_SIZE = (1200, 600)  # width, height in pixels
KEY_COLOUR = (255, 220, 0)
WORST_COLOUR = (230, 40, 40)
_LEGEND_ROWS = 6


@dataclass
class RenderConfig:
    output: str  # a segment job's --output
    video_id: str
    to: str  # directory or s3:// prefix
    checkpoint: str | None = None  # default: the checkpoint the run manifest records
    alpha: float = 0.5  # weight of the mask colour in the blend
    columns: int = 4
    rows: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.columns < 1 or self.rows < 1:
            raise ValueError(f"the contact sheet needs at least one column and row, got {self.columns}x{self.rows}")


@dataclass
class RenderResult:
    overlay_mp4: str
    overlay_png: str
    contact_sheet: str
    timeline: str
    frames: int = 0
    sheet_frames: list[int] = field(default_factory=list)


def tile_size(height: int, width: int, tile_width: int = TILE_WIDTH) -> tuple[int, int]:
    """(tile height, tile width) of a contact-sheet tile for a source of ``height`` x ``width``."""
    return max(1, round(tile_width * height / width)), tile_width


def contact_sheet_size(height: int, width: int, tiles: int, columns: int) -> tuple[int, int]:
    """(height, width) in pixels of a contact sheet of ``tiles`` frames of a ``height`` x ``width`` source."""
    tile_h, tile_w = tile_size(height, width)
    rows = max(1, math.ceil(tiles / columns))
    return rows * (tile_h + CAPTION_HEIGHT), columns * tile_w


def blend(rgb: np.ndarray, mask: np.ndarray, lut: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * frame + alpha * colour of the class``, per pixel; the mask is resized (nearest) to the frame."""
    height, width = rgb.shape[:2]
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    weight = round(alpha * 256)
    mixed = rgb.astype(np.uint16) * (256 - weight) + lut[mask].astype(np.uint16) * weight
    return ((mixed + 128) >> 8).astype(np.uint8)


def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(9, height // 30))


def decorate(image: np.ndarray, index: int, is_keyframe: bool, mask: np.ndarray, classes: ClassInfo) -> np.ndarray:
    """Keyframe frame and tag, frame number and the legend of the classes in view (largest first)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    font = _font(height)
    size = int(font.size) if hasattr(font, "size") else 10
    if is_keyframe:
        thickness = max(2, height // 90)
        draw.rectangle([0, 0, width - 1, height - 1], outline=KEY_COLOUR, width=thickness)
        draw.text((thickness + 2, thickness + 1), "KEY", fill=KEY_COLOUR, font=font)
    label = f"#{index}"
    draw.text((width - draw.textlength(label, font=font) - 4, 2), label, fill=(255, 255, 255), font=font,
              stroke_width=1, stroke_fill=(0, 0, 0))
    counts = np.bincount(mask.ravel(), minlength=len(classes.names))
    line = size + 3
    rows = min(_LEGEND_ROWS, int(0.4 * height) // line)  # the legend never hides most of a small frame
    present = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:rows]
    top = height - line * len(present) - 4
    if present:
        box_w = 8 + size + 4 + max(int(draw.textlength(classes.names[c], font=font)) for c in present)
        draw.rectangle([2, top - 2, 2 + box_w, height - 3], fill=(0, 0, 0))
    for row, class_id in enumerate(present):
        y = top + row * line
        draw.rectangle([6, y, 6 + size, y + size], fill=tuple(classes.palette[class_id]))
        draw.text((10 + size, y - 1), classes.names[class_id], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def sheet_frames(scores: list[FrameScore], tiles: int) -> tuple[list[int], dict[int, int]]:
    """Frames of the contact sheet in display order, and the review rank (1 = lowest score) of the worst ones."""
    if len(scores) <= tiles:
        worst = lowest(scores, max(1, tiles // 2))
        return [s.frame_index for s in scores], {s.frame_index: r for r, s in enumerate(worst, start=1)}
    worst = lowest(scores, tiles // 2)
    ranks = {s.frame_index: r for r, s in enumerate(worst, start=1)}
    rest = tiles - len(worst)
    keyframes = [s.frame_index for s in scores if s.is_keyframe and s.frame_index not in ranks]
    others = [s.frame_index for s in scores if not s.is_keyframe and s.frame_index not in ranks]
    picked = _spread(keyframes, rest)
    picked += _spread(others, rest - len(picked))
    return sorted([*ranks, *picked]), ranks


def _spread(items: list[int], n: int) -> list[int]:
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else [items[0]]


def timeline_png(scores: list[FrameScore], worst: list[FrameScore], title: str) -> bytes:
    """The timeline figure (TIMELINE_SIZE pixels) as PNG bytes."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    frames = np.array([s.frame_index for s in scores])
    dpi = 100
    fig = Figure(figsize=(TIMELINE_SIZE[0] / dpi, TIMELINE_SIZE[1] / dpi), dpi=dpi)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 3, 1]})
    series = [
        ("confidence", [s.confidence for s in scores], "tab:blue"),
        ("label change", [math.nan if s.label_change_rate is None else s.label_change_rate for s in scores],
         "tab:orange"),
        ("keyframe agreement", [math.nan if s.keyframe_agreement is None else s.keyframe_agreement for s in scores],
         "tab:green"),
    ]
    worst_set = {s.frame_index for s in worst}
    for ax, (name, values, colour) in zip(axes, series):
        values = np.asarray(values, dtype=float)
        if np.all(np.isnan(values)):
            ax.text(0.5, 0.5, f"no {name} (causal run)", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        else:
            # Frames without a value (keyframes have no agreement) are skipped, not breaks in the line.
            have = ~np.isnan(values)
            ax.plot(frames[have], values[have], color=colour, linewidth=1)
            bad = have & np.array([i in worst_set for i in frames], dtype=bool)
            ax.scatter(frames[bad], values[bad], color="red", s=12, zorder=3)
        ax.set_ylabel(name, fontsize=8)
        # Label change is small on most frames: scale to it, or a flat line hides the spikes.
        top = 1.02 if name != "label change" or np.all(np.isnan(values)) else max(0.1, 1.1 * np.nanmax(values))
        ax.set_ylim(-0.02 * top, top)
        ax.grid(alpha=0.3)
    keyframes = [s.frame_index for s in scores if s.is_keyframe]
    axes[3].vlines(keyframes, 0, 1, color="black", linewidth=0.6)
    axes[3].set_yticks([])
    axes[3].set_ylabel("keyframes", fontsize=8)
    axes[3].set_xlabel("frame")
    axes[3].set_xlim(-0.5, max(len(frames) - 0.5, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.09, hspace=0.15)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _png(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _even(image: np.ndarray) -> np.ndarray:
    """H.264 4:2:0 needs even sizes: repeat the last row/column of an odd-sized frame."""
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return image


class _Sheet:
    """Collects contact-sheet tiles as the frames stream past."""

    def __init__(self, frames: list[int], ranks: dict[int, int], scores: dict[int, float], height: int,
                 width: int, columns: int) -> None:
        self.frames, self.ranks, self.scores, self.columns = frames, ranks, scores, columns
        self.position = {f: i for i, f in enumerate(frames)}
        self.tile_h, self.tile_w = tile_size(height, width)
        sheet_h, sheet_w = contact_sheet_size(height, width, len(frames), columns)
        self.image = Image.new("RGB", (sheet_w, sheet_h), (24, 24, 24))
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(size=12)

    def add(self, index: int, overlay: np.ndarray, is_keyframe: bool) -> None:
        if index not in self.position:
            return
        row, column = divmod(self.position[index], self.columns)
        x, y = column * self.tile_w, row * (self.tile_h + CAPTION_HEIGHT)
        tile = Image.fromarray(overlay).resize((self.tile_w, self.tile_h), Image.Resampling.BOX)
        self.image.paste(tile, (x, y))
        caption = f"#{index}  score {self.scores[index]:.3f}"
        colour = (230, 230, 230)
        if index in self.ranks:
            caption += f"  worst {self.ranks[index]}"
            colour = WORST_COLOUR
        if is_keyframe:
            caption += "  KEY"
            self.draw.rectangle([x, y, x + self.tile_w - 1, y + self.tile_h - 1], outline=KEY_COLOUR, width=2)
        self.draw.text((x + 4, y + self.tile_h + 3), caption, fill=colour, font=self.font)


def _joined(video: CommittedVideo) -> Iterator[tuple[np.ndarray, dict]]:
    """(source frame, frame row with its mask) pairs in display order, one at a time."""
    rows = iter_frame_rows(video, ["is_keyframe", "mask_png"])
    for frame, row in zip(iter_source_frames(video), rows):
        if frame.index != row["frame_index"]:  # cannot happen unless the source was replaced in between
            raise ValueError(f"{video.video_uri}: decoded frame {frame.index} for mask {row['frame_index']}")
        yield frame.rgb, row


def render_video(config: RenderConfig, log: Callable[[str], None] = print) -> RenderResult:
    """Write the overlay MP4 and still, the contact sheet and the timeline of one committed video."""
    log = storage.redacting(log)
    from dcfm.encode import write_video

    (video,) = committed_videos(config.output, [config.video_id])
    classes = class_info(config.output, [video], config.checkpoint)
    lut = classes.lut()
    scores = [frame_score(row) for row in iter_frame_rows(video, METRIC_COLUMNS)]
    tiles = config.columns * config.rows
    frames, ranks = sheet_frames(scores, tiles)
    worst = lowest(scores, max(1, tiles // 2))
    still_index = worst[0].frame_index if worst else 0
    score_of = {s.frame_index: s.score for s in scores}
    height, width = int(video.row["height"]), int(video.row["width"])
    sheet = _Sheet(frames, ranks, score_of, height, width, config.columns)
    base = storage.join(config.to, config.video_id)
    result = RenderResult(f"{base}.overlay.mp4", f"{base}.overlay.png", f"{base}.contact.png", f"{base}.timeline.png",
                          sheet_frames=frames)
    log(f"[render] {config.video_id}: {len(scores)} frames at {width}x{height} -> {config.to}")
    bar = ProgressBar("render", len(scores))
    still: list[np.ndarray] = []

    def overlays() -> Iterator[np.ndarray]:
        for rgb, row in _joined(video):
            index = row["frame_index"]
            mask = decode_mask(row["mask_png"])
            mixed = blend(rgb, mask, lut, config.alpha)
            sheet.add(index, mixed, row["is_keyframe"])
            if mask.shape != rgb.shape[:2]:
                mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
            shown = decorate(mixed, index, row["is_keyframe"], mask, classes)
            if index == still_index:
                still.append(shown)
            result.frames += 1
            bar.update(result.frames)
            yield _even(shown)

    fps = max(1, round(float(video.row.get("fps") or 25)))
    with staged_file(result.overlay_mp4, suffix=".mp4") as local:
        write_video(local, overlays(), fps=fps, crf=20)
    bar.close()
    storage.write_bytes_atomic(result.overlay_png, _png(still[0]))
    storage.write_bytes_atomic(result.contact_sheet, _png(sheet.image))
    storage.write_bytes_atomic(result.timeline, timeline_png(scores, worst, f"{config.video_id} ({video.video_uri})"))
    log(f"[render] {result.overlay_mp4}\n[render] {result.overlay_png}\n[render] {result.contact_sheet}\n"
        f"[render] {result.timeline}")
    return result
