"""Procedurally generated labelled videos: the project's training and evaluation data.

Each video is a side view of a street scene: sky, a skyline of buildings and trees, a far ground band,
a two-lane road and a near ground band (one of the ground bands is water, the other grass). Cars,
people and bouncing balls move across it and occlude each other; the camera pans and zooms across a
larger background canvas, the lighting drifts and there is sensor noise. Classes are meant to be told
apart by texture and context: their colours are jittered per video and per object, so e.g. a blue car,
water and sky, or grey road, overcast sky and concrete, overlap in colour.

The label of a pixel is exactly the class of whatever was rendered there (the frontmost object, else
the background); both are sampled with the same nearest-neighbour camera mapping, so they never drift.
Label maps hold class indices 0..len(CLASSES)-1; IGNORE_INDEX (255) is reserved and never written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcfm import synth_world as world
from dcfm.data import IGNORE_INDEX
from dcfm.encode import write_video

FORMAT = "dcfm-synth/1"
CLASSES: tuple[str, ...] = world.CLASSES
PALETTE: tuple[tuple[int, int, int], ...] = world.PALETTE


@dataclass
class SynthConfig:
    """What to generate. height and width must be even (H.264 4:2:0)."""

    videos: int
    frames: int
    height: int
    width: int
    labeled_every: int = 1
    seed: int = 0
    fps: int = 15
    # How fast the world moves per frame (camera, objects, lighting, ripples); 1 is the default street.
    # Larger values make neighbouring frames differ more, which is what keyframe reuse has to cope with.
    motion: float = 1.0
    # Scene cuts per video: the video jumps to another, unrelated scene this many times (at evenly spaced frames,
    # jittered), as edited footage does; the encoder starts a new GOP at each (x264 scene-cut detection).
    cuts: int = 0
    # Longest stretch between seek points, in seconds (the encoder's GOP); None leaves x264's default of 250
    # frames (17 s at 15 fps). Broadcast and streaming footage has one every 1-2 s.
    gop_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("videos", "frames", "height", "width", "labeled_every", "fps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.height % 2 or self.width % 2 or self.height < 16 or self.width < 16:
            raise ValueError(f"height and width must be even and >= 16, got {self.height}x{self.width}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.motion <= 16:
            raise ValueError(f"motion must be in (0, 16], got {self.motion}")
        if self.gop_seconds is not None and not self.gop_seconds * self.fps >= 1:
            raise ValueError(f"gop_seconds must give at least one frame per GOP, got {self.gop_seconds} "
                             f"at {self.fps} fps")
        if not 0 <= self.cuts < self.frames:
            raise ValueError(f"cuts must be in 0..frames-1, got {self.cuts} for {self.frames} frames")
        if not labeled_frame_indices(self.frames, self.labeled_every):
            raise ValueError(f"labeled_every={self.labeled_every} labels no frame of a {self.frames}-frame video "
                             f"(the first labelled frame is {self.labeled_every // 2})")


@dataclass(frozen=True)
class SynthVideo:
    """One manifest entry; paths are relative to the corpus root."""

    id: str
    video: str
    labels: str
    frames: int
    labeled_frames: tuple[int, ...]


@dataclass(frozen=True)
class SynthManifest:
    """A parsed manifest.json; `root` is the corpus directory the relative paths hang off."""

    root: Path
    format: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    fps: int
    height: int
    width: int
    seed: int
    labeled_every: int
    videos: tuple[SynthVideo, ...]
    motion: float = 1.0
    # Optional named subsets of video ids ({"train": [...], "val": [...]}), for corpora a user split by hand;
    # `dcfm synth` writes one corpus per split instead.
    splits: dict[str, tuple[str, ...]] | None = None

    def split_ids(self, split: str) -> tuple[str, ...] | None:
        """The video ids of ``split``, or None (every video) for a manifest without splits."""
        if self.splits is None:
            return None
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in {self.root / 'manifest.json'} (has {sorted(self.splits)})")
        return self.splits[split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def video_path(self, video: SynthVideo) -> Path:
        return self.root / video.video

    def label_path(self, video: SynthVideo, frame_index: int) -> Path:
        return self.root / video.labels / label_filename(frame_index)


def label_filename(frame_index: int) -> str:
    return f"{frame_index:06d}.png"


def video_id(index: int) -> str:
    return f"synth_{index:04d}"


def labeled_frame_indices(frames: int, labeled_every: int) -> list[int]:
    """Frames that get a label map.

    Every frame when labeled_every == 1; otherwise frames with index % M == M // 2, i.e. the middle
    of each block of M, so every labelled frame has unlabelled neighbours on both sides (as Cityscapes
    labels the 20th frame of its 30-frame snippets), which DCFM's pair sampling (U = L +- delta) needs.
    """
    if labeled_every == 1:
        return list(range(frames))
    return [i for i in range(frames) if i % labeled_every == labeled_every // 2]


def render_video(config: SynthConfig, index: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (rgb uint8 HxWx3, label uint8 HxW) for every frame of video `index`, before encoding.

    Deterministic in (config.seed, index, height, width); `frames` only decides how many are yielded,
    so a shorter video is a prefix of a longer one.
    """
    rng = np.random.default_rng([config.seed, index])
    scene = world.build_scene(rng, config.height, config.width, motion=config.motion)
    cuts = cut_frames(config, index)
    start = 0
    for t in range(config.frames):
        if t in cuts:  # a new, unrelated scene from here on; scene j's randomness depends on j only
            scene = world.build_scene(np.random.default_rng([config.seed, index, t]), config.height, config.width,
                                      motion=config.motion)
            start = t
        yield scene.render(t - start)


def cut_frames(config: SynthConfig, index: int) -> tuple[int, ...]:
    """The first frames of the new scenes of video ``index`` (none without ``cuts``): evenly spaced, jittered by
    up to a quarter of the spacing."""
    if not config.cuts:
        return ()
    rng = np.random.default_rng([config.seed, index, 0xC07])
    spacing = config.frames / (config.cuts + 1)
    jitter = rng.uniform(-spacing / 4, spacing / 4, size=config.cuts)
    return tuple(sorted({min(config.frames - 1, max(1, round(spacing * (j + 1) + jitter[j])))
                         for j in range(config.cuts)}))


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Write a class-index map as an 8-bit greyscale PNG (no metadata, so bytes depend only on pixels)."""
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(path, format="PNG", compress_level=6)


def generate_corpus(out_dir: Path, config: SynthConfig) -> Path:
    """Render, encode and label `config.videos` videos under out_dir; return the manifest path.

    Layout: videos/<id>.mp4, labels/<id>/<frame:06d>.png, manifest.json (written last, so a
    directory with a manifest is complete). Same config, same bytes, when the width is a multiple
    of 32 (see dcfm.encode.write_video); at other widths the same labels, and videos that may differ
    in encoder decisions.
    """
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    labeled = labeled_frame_indices(config.frames, config.labeled_every)
    entries: list[dict[str, object]] = []
    for index in range(config.videos):
        vid = video_id(index)
        label_dir = out_dir / "labels" / vid
        label_dir.mkdir(parents=True, exist_ok=True)
        # A rerun with another labeled_every must not leave label maps the manifest doesn't list.
        for stale in label_dir.glob("*.png"):
            stale.unlink()
        wanted = set(labeled)

        def frames_and_labels(index: int = index, label_dir: Path = label_dir) -> Iterator[np.ndarray]:
            for t, (rgb, label) in enumerate(render_video(config, index)):
                if t in wanted:
                    write_label_png(label_dir / label_filename(t), label)
                yield rgb

        write_video(out_dir / "videos" / f"{vid}.mp4", frames_and_labels(), fps=config.fps,
                    force_keyframes=cut_frames(config, index),
                    keyint=round(config.gop_seconds * config.fps) if config.gop_seconds else None)
        entries.append({
            "id": vid,
            "video": f"videos/{vid}.mp4",
            "labels": f"labels/{vid}",
            "frames": config.frames,
            "labeled_frames": labeled,
        })
    manifest = {
        "format": FORMAT,
        "classes": list(CLASSES),
        "palette": [list(c) for c in PALETTE],
        "ignore_index": IGNORE_INDEX,
        "fps": config.fps,
        "height": config.height,
        "width": config.width,
        "seed": config.seed,
        "motion": config.motion,
        "labeled_every": config.labeled_every,
        "videos": entries,
    }
    if config.cuts:  # the first frame of every new scene, per video
        manifest["cuts"] = {e["id"]: list(cut_frames(config, i)) for i, e in enumerate(entries)}
    path = out_dir / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(root: str | Path) -> SynthManifest:
    """Read a corpus manifest; `root` is the corpus directory or the manifest.json file itself."""
    path = Path(root)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing synth manifest: {path} (make a corpus with `dcfm synth`)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {data.get('format')!r}, expected {FORMAT!r}")
    videos = tuple(
        SynthVideo(
            id=str(v["id"]),
            video=str(v["video"]),
            labels=str(v["labels"]),
            frames=int(v["frames"]),
            labeled_frames=tuple(int(i) for i in v["labeled_frames"]),
        )
        for v in data["videos"]
    )
    return SynthManifest(
        root=path.parent,
        format=data["format"],
        classes=tuple(str(c) for c in data["classes"]),
        palette=tuple((int(r), int(g), int(b)) for r, g, b in data["palette"]),
        ignore_index=int(data["ignore_index"]),
        fps=int(data["fps"]),
        height=int(data["height"]),
        width=int(data["width"]),
        seed=int(data["seed"]),
        labeled_every=int(data["labeled_every"]),
        videos=videos,
        motion=float(data.get("motion", 1.0)),  # manifests from before the knob existed
        splits={str(k): tuple(str(i) for i in ids) for k, ids in data["splits"].items()} if "splits" in data else None,
    )
