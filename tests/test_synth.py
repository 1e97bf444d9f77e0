"""The procedural labelled video corpus: determinism, layout, and labels that sit on what they label."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcfm import synth_world
from dcfm.cli import main
from dcfm.synth import CLASSES, SynthConfig, generate_corpus, labeled_frame_indices, load_manifest, render_video
from dcfm.decode import iter_frames, read_frames
from dcfm.encode import write_video

CFG = SynthConfig(videos=3, frames=8, height=64, width=128, seed=3)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_a")
    generate_corpus(root, CFG)
    return root


def test_same_seed_gives_identical_bytes(corpus: Path, tmp_path: Path) -> None:
    generate_corpus(tmp_path, CFG)
    first, second = _digests(corpus), _digests(tmp_path)
    assert len(first) == 1 + CFG.videos * (1 + CFG.frames)  # manifest + per video: mp4 + every label
    assert first == second


def test_different_seed_gives_different_content(corpus: Path, tmp_path: Path) -> None:
    generate_corpus(tmp_path, SynthConfig(**{**CFG.__dict__, "seed": CFG.seed + 1}))
    first, second = _digests(corpus), _digests(tmp_path)
    assert first.keys() == second.keys()
    for name in first:
        if name != "manifest.json" and name.endswith((".mp4", "000000.png")):
            assert first[name] != second[name], name


def test_manifest_describes_the_files(corpus: Path) -> None:
    raw = (corpus / "manifest.json").read_text()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, indent=2) + "\n"
    m = load_manifest(corpus)
    assert m.format == "dcfm-synth/1" and m.classes == CLASSES and len(m.palette) == len(CLASSES)
    assert (m.ignore_index, m.fps, m.height, m.width, m.seed, m.labeled_every) == (255, 15, 64, 128, 3, 1)
    assert [v.id for v in m.videos] == ["synth_0000", "synth_0001", "synth_0002"]
    assert load_manifest(corpus / "manifest.json") == m
    for v in m.videos:
        assert v.frames == CFG.frames and v.labeled_frames == tuple(range(CFG.frames))
        assert m.video_path(v).is_file() and m.label_path(v, CFG.frames - 1).is_file()


def test_decoded_video_has_all_frames_at_the_right_size(corpus: Path) -> None:
    path = corpus / "videos" / "synth_0001.mp4"
    frames = list(iter_frames(path))
    assert len(frames) == CFG.frames
    assert all(f.shape == (CFG.height, CFG.width, 3) and f.dtype == np.uint8 for f in frames)
    picked = read_frames(path, [5, 0, 5])
    assert all(np.array_equal(a, frames[i]) for a, i in zip(picked, [5, 0, 5]))
    with pytest.raises(IndexError):
        read_frames(path, [CFG.frames])


def test_files_match_the_in_memory_render(corpus: Path) -> None:
    """PNGs are the rendered label maps; decoded frame t is the rendered frame t (not t +- 1)."""
    rendered = list(render_video(CFG, 2))
    decoded = list(iter_frames(corpus / "videos" / "synth_0002.mp4"))
    for t, (rgb, label) in enumerate(rendered):
        assert np.array_equal(_label(corpus / "labels" / "synth_0002" / f"{t:06d}.png"), label)
        err = [np.abs(decoded[t].astype(np.float32) - r[0]).mean() for r in rendered]
        assert err[t] < 10.0 and int(np.argmin(err)) == t


def _disputed_sse(rgb: np.ndarray, label: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Colour spread around each map's own class means, over the pixels where the two maps disagree.

    Whichever map follows the image content has the smaller spread there.
    """
    x = rgb.reshape(-1, 3).astype(np.float64)
    out = []
    for lab in (label.reshape(-1), other.reshape(-1)):
        means = np.zeros((256, 3))
        for c in np.unique(lab):
            means[c] = x[lab == c].mean(0)
        disputed = label.reshape(-1) != other.reshape(-1)
        out.append(float(((x[disputed] - means[lab[disputed]]) ** 2).sum()))
    return out[0], out[1]


def test_labels_sit_on_the_decoded_pixels_they_label(corpus: Path) -> None:
    """Labels shifted by 3 px, or a neighbouring frame's labels, fit the decoded video clearly worse."""
    m = load_manifest(corpus)
    for v in m.videos:
        frames = list(iter_frames(m.video_path(v)))
        labels = [_label(m.label_path(v, t)) for t in range(v.frames)]
        crop = (slice(4, -4), slice(4, -4))
        for t in (1, v.frames // 2):
            wrong = [np.roll(labels[t], s, axis=a)[crop] for s in (-3, 3) for a in (0, 1)]
            wrong += [labels[t - 1][crop], labels[t + 1][crop]]
            for i, other in enumerate(wrong):
                right_sse, wrong_sse = _disputed_sse(frames[t][crop], labels[t][crop], other)
                assert wrong_sse > 1.25 * right_sse, (v.id, t, i)


def test_every_class_appears_and_objects_move(corpus: Path) -> None:
    m = load_manifest(corpus)
    seen: set[int] = set()
    for v in m.videos:
        first, last = _label(m.label_path(v, 0)), _label(m.label_path(v, v.frames - 1))
        seen |= set(np.unique(first).tolist()) | set(np.unique(last).tolist())
        assert 255 not in seen
        objects = [synth_world.CAR, synth_world.PERSON, synth_world.BALL]
        assert not np.array_equal(np.isin(first, objects), np.isin(last, objects)), v.id
    assert seen == set(range(len(CLASSES)))


def test_nearer_object_occludes_farther_one() -> None:
    scene = synth_world.build_scene(np.random.default_rng(0), 64, 128)
    ys, xs = scene.camera(0)
    box = np.ones((20, 30), bool)

    def sprite(cls: int, bottom_row: int, left_col: int) -> synth_world.Sprite:
        rgb = np.full((20, 30, 3), cls / 10, np.float32)
        return synth_world.Sprite(cls, [rgb], [box], ys[bottom_row] + 1.0, float(xs[left_col]), 0.0, (-1e6, 1e6))

    # The ball stands lower in the picture, so it is nearer; list order must not matter.
    scene.sprites = [sprite(synth_world.BALL, 50, 50), sprite(synth_world.CAR, 40, 40)]
    _, label = scene.render(0)
    assert label[36, 44] == synth_world.CAR  # only the car covers it
    assert label[48, 70] == synth_world.BALL  # only the ball
    assert label[38, 55] == synth_world.BALL  # both: the nearer one wins
    scene.sprites = []
    assert scene.render(0)[1][38, 55] not in (synth_world.CAR, synth_world.BALL)


def test_labeled_every_writes_only_the_middle_of_each_block(tmp_path: Path) -> None:
    assert labeled_frame_indices(10, 4) == [2, 6]
    assert labeled_frame_indices(3, 1) == [0, 1, 2]
    generate_corpus(tmp_path, SynthConfig(videos=1, frames=8, height=32, width=48, labeled_every=3))
    m = load_manifest(tmp_path)
    assert m.videos[0].labeled_frames == (1, 4, 7)
    assert sorted(p.name for p in (tmp_path / "labels" / "synth_0000").iterdir()) == \
        ["000001.png", "000004.png", "000007.png"]
    assert len(list(iter_frames(m.video_path(m.videos[0])))) == 8


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    assert main(["synth", str(out), "--videos", "2", "--frames", "4", "--size", "32x64",
                 "--labeled-every", "2", "--seed", "7", "--fps", "10"]) == 0
    m = load_manifest(out)
    assert (len(m.videos), m.height, m.width, m.seed, m.fps, m.labeled_every) == (2, 32, 64, 7, 10, 2)
    assert m.videos[1].labeled_frames == (1, 3)
    assert _label(m.label_path(m.videos[1], 3)).shape == (32, 64)
    capsys.readouterr()
    for bad in ("128", "12x256", "axb", "64x65"):
        with pytest.raises(SystemExit) as exc:
            main(["synth", str(out), "--size", bad])
        assert exc.value.code == 2
        assert "--size" in capsys.readouterr().err
    assert main(["synth", str(out), "--frames", "4", "--labeled-every", "10"]) == 2
    assert "labels no frame" in capsys.readouterr().err


def test_write_video_is_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Width 64: at widths that are not a multiple of 32 x264 reads uninitialised memory (see dcfm/encode.py).
    frames = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8) for _ in range(5)]
    assert write_video(tmp_path / "a.mp4", frames, fps=15) == 5
    write_video(tmp_path / "b.mp4", iter(frames), fps=15)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    with pytest.raises(ValueError):
        write_video(tmp_path / "c.mp4", [np.zeros((31, 48, 3), np.uint8)], fps=15)


def test_motion_speeds_up_the_world_not_the_layout() -> None:
    """motion=m shows at frame t what motion=1 shows at frame m*t: the same scene, moving m times faster."""
    base = SynthConfig(videos=1, frames=13, height=64, width=128, seed=5)
    fast = SynthConfig(videos=1, frames=5, height=64, width=128, seed=5, motion=3.0)
    slow_labels = [label for _, label in render_video(base, 0)]
    fast_labels = [label for _, label in render_video(fast, 0)]
    for t, label in enumerate(fast_labels):
        np.testing.assert_array_equal(label, slow_labels[3 * t])
    moved = [(a != b).mean() for a, b in zip(fast_labels, fast_labels[1:])]
    still = [(a != b).mean() for a, b in zip(slow_labels[:5], slow_labels[1:5])]
    assert np.mean(moved) > 1.3 * np.mean(still)  # displacement triples; changed pixels grow sub-linearly


def test_motion_is_recorded_and_checked(tmp_path: Path) -> None:
    generate_corpus(tmp_path, SynthConfig(videos=1, frames=2, height=32, width=64, motion=2.5))
    assert json.loads((tmp_path / "manifest.json").read_text())["motion"] == 2.5
    with pytest.raises(ValueError, match="motion"):
        SynthConfig(videos=1, frames=2, height=32, width=64, motion=0)


def test_gop_seconds_bounds_the_gap_between_seek_points(tmp_path: Path) -> None:
    from dcfm.decode import probe_video

    base = dict(videos=1, frames=45, height=32, width=64, fps=10)
    generate_corpus(tmp_path / "default", SynthConfig(**base))
    generate_corpus(tmp_path / "gop", SynthConfig(**base, gop_seconds=1.0))
    assert probe_video(str(tmp_path / "default" / "videos" / "synth_0000.mp4")).keyframes == (0,)
    points = probe_video(str(tmp_path / "gop" / "videos" / "synth_0000.mp4")).keyframes
    gaps = np.diff([*points, 45])
    assert points[0] == 0 and len(points) >= 4 and gaps.max() <= 10
    with pytest.raises(ValueError, match="gop_seconds"):
        SynthConfig(**base, gop_seconds=0.05)
