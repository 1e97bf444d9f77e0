"""CVAT export, review queue, renders, report and progress bar on constructed segment outputs (no Ray)."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from dcfm.checkpoint import CARD_FILE, read_card
from dcfm.classes import default_class_names, default_palette
from dcfm.cli import main
from dcfm.labels.cvat import CvatExportConfig, export_cvat
from dcfm.progress import ProgressBar
from dcfm.labels.render import TIMELINE_SIZE, RenderConfig, contact_sheet_size, render_video
from dcfm.labels.report import ReportConfig, write_report
from dcfm.synth import SynthConfig, generate_corpus, load_manifest
from tests.labels_output import Frame, save_model, write_output

NAMES = ["sky", "road", "car"]
PALETTE = [(70, 130, 180), (128, 64, 128), (0, 0, 142)]


def parse_labelmap(text: str) -> dict[str, tuple[int, int, int]]:
    """labelmap.txt read the way CVAT documents it (name:r,g,b:parts:actions), independently of the exporter."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, colour = line.split(":")[:2]
            out[name] = tuple(int(c) for c in colour.split(","))
    return out


def strips(height: int, width: int, shift: int) -> np.ndarray:
    """Three horizontal bands (classes 0, 1, 2) with a car box that moves by ``shift``."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 2:] = 1
    mask[height // 2: height // 2 + 6, 4 + shift: 16 + shift] = 2
    return mask


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("model") / "ckpt")
    return path, save_model(path, NAMES, PALETTE)


# Metrics whose review order is known: score = mean(confidence, 1 - change, agreement).
KNOWN = [  # (confidence, label change, agreement)
    (0.90, None, 0.95), (0.50, 0.10, 0.90), (0.95, 0.60, 0.90), (0.99, 0.01, 0.99),
    (0.80, 0.05, 0.40), (0.30, 0.00, 1.00), (0.97, 0.02, 0.98), (0.60, 0.30, 0.70),
]


def expected_scores() -> list[float]:
    scores = []
    for conf, change, agree in KNOWN:
        terms = [conf, agree] + ([] if change is None else [1 - change])
        scores.append(sum(terms) / len(terms))
    return scores


@pytest.fixture()
def known_output(tmp_path, model) -> str:
    frames = [Frame(strips(24, 40, i), c, ch, a, i % 2 == 0) for i, (c, ch, a) in enumerate(KNOWN)]
    out = str(tmp_path / "out")
    write_output(out, model[0], model[1], {"vid-a": frames, "vid-b": frames[:3]}, chunk_frames=3)
    return out


def test_review_keeps_the_n_lowest_scored_frames_and_ranks_them(known_output, tmp_path) -> None:
    to = tmp_path / "cvat"
    assert main(["export", "cvat", known_output, "--to", str(to), "--videos", "vid-a", "--review", "3"]) == 0
    scores = expected_scores()
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:3]
    with open(to / "vid-a.review.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["frame_index"]) for r in rows] == order
    assert [r["frame"] for r in rows] == [f"frame_{i:06d}" for i in order]
    assert [float(r["score"]) for r in rows] == pytest.approx([scores[i] for i in order])
    with zipfile.ZipFile(to / "vid-a.zip") as archive:
        listed = archive.read("ImageSets/Segmentation/default.txt").decode().split()
        pngs = sorted(n for n in archive.namelist() if n.startswith("SegmentationClass/"))
    assert listed == [f"frame_{i:06d}" for i in sorted(order)]
    assert pngs == [f"SegmentationClass/frame_{i:06d}.png" for i in sorted(order)]
    assert not (to / "vid-b.zip").exists()


def test_every_nth_frame_then_review_among_them(known_output, tmp_path) -> None:
    results = export_cvat(CvatExportConfig(known_output, str(tmp_path / "c"), ["vid-a"], every=2, review=2), log=print)
    scores = expected_scores()
    order = sorted(range(0, len(scores), 2), key=lambda i: (scores[i], i))[:2]
    with zipfile.ZipFile(results[0].zip_uri) as archive:
        assert archive.read("ImageSets/Segmentation/default.txt").decode().split() == [
            f"frame_{i:06d}" for i in sorted(order)]


def test_zip_layout_colours_and_labelmap_match_the_card(known_output, model, tmp_path) -> None:
    results = export_cvat(CvatExportConfig(known_output, str(tmp_path / "c"), every=3), log=print)
    assert sorted(Path(r.zip_uri).name for r in results) == ["vid-a.zip", "vid-b.zip"]
    card, _ = read_card(model[0])
    with zipfile.ZipFile(tmp_path / "c" / "vid-a.zip") as archive:
        labelmap = parse_labelmap(archive.read("labelmap.txt").decode())
        assert labelmap == {"background": (0, 0, 0), **dict(zip(card.class_names, map(tuple, card.palette)))}
        names = archive.read("ImageSets/Segmentation/default.txt").decode().split()
        assert names == ["frame_000000", "frame_000003", "frame_000006"]
        for name in names:
            rgb = np.asarray(Image.open(io.BytesIO(archive.read(f"SegmentationClass/{name}.png"))).convert("RGB"))
            expected = np.asarray(PALETTE, np.uint8)[strips(24, 40, int(name[-6:]))]
            np.testing.assert_array_equal(rgb, expected)


def test_unknown_or_uncommitted_video_is_refused(known_output, tmp_path, capsys) -> None:
    assert main(["export", "cvat", known_output, "--to", str(tmp_path / "c"), "--videos", "nope"]) == 3
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_staged_but_uncommitted_video_is_not_exported(known_output, tmp_path) -> None:
    marker = Path(known_output) / "_commits" / "vid-b.json"
    marker.unlink()  # as a run killed before the commit marker would leave it
    results = export_cvat(CvatExportConfig(known_output, str(tmp_path / "c")), log=print)
    assert [r.video_id for r in results] == ["vid-a"]


def test_card_without_names_and_colours_falls_back_to_documented_defaults(known_output, model, tmp_path) -> None:
    old = tmp_path / "old-model"
    shutil.copytree(model[0], old)
    card = json.loads((old / CARD_FILE).read_text())
    del card["class_names"], card["palette"]
    (old / CARD_FILE).write_text(json.dumps(card))
    loaded, _ = read_card(str(old))
    assert loaded.class_names == default_class_names(3) == ["class_0", "class_1", "class_2"]
    assert loaded.palette == default_palette(3) and (0, 0, 0) not in loaded.palette
    export_cvat(CvatExportConfig(known_output, str(tmp_path / "c"), ["vid-b"], checkpoint=str(old)), log=print)
    with zipfile.ZipFile(tmp_path / "c" / "vid-b.zip") as archive:
        assert parse_labelmap(archive.read("labelmap.txt").decode())["class_2"] == default_palette(3)[2]


def test_another_models_checkpoint_is_refused(known_output, tmp_path, capsys) -> None:
    other = str(tmp_path / "other")
    save_model(other, ["a", "b", "c", "d"], default_palette(4))
    assert main(["export", "cvat", known_output, "--to", str(tmp_path / "c"), "--checkpoint", other]) == 3
    assert "masks were made by" in capsys.readouterr().err


# --- with a real source video: JPEGImages, torchvision's VOC reader, renders -----------------------------------
@pytest.fixture(scope="module")
def synth_output(tmp_path_factory, model) -> tuple[str, dict[int, np.ndarray], str]:
    """A synth video with its ground truth committed as the masks (a perfect model), 9 frames at 48x96."""
    root = tmp_path_factory.mktemp("synth")
    generate_corpus(root / "corpus", SynthConfig(videos=1, frames=9, height=48, width=96, seed=5))
    manifest = load_manifest(root / "corpus")
    video = manifest.videos[0]
    labels = {i: np.asarray(Image.open(root / "corpus" / video.labels / f"{i:06d}.png")) for i in range(9)}
    checkpoint = str(root / "model")
    digest = save_model(checkpoint, list(manifest.classes), list(manifest.palette))
    frames = [Frame(labels[i], 0.9 - 0.05 * (i % 4), None if i == 0 else 0.1, None, i % 3 == 0) for i in range(9)]
    out = str(root / "out")
    write_output(out, checkpoint, digest, {"street": frames}, {"street": str(root / "corpus" / video.video)})
    return out, labels, checkpoint


def test_torchvision_voc_reader_loads_the_export(synth_output, tmp_path) -> None:
    """torchvision.datasets.VOCSegmentation (maintained; Datumaro cannot be installed beside our pins) reads it."""
    from torchvision.datasets import VOCSegmentation

    out, labels, checkpoint = synth_output
    export_cvat(CvatExportConfig(out, str(tmp_path / "c"), images=True, subset="val"), log=print)
    root = tmp_path / "voc"
    with zipfile.ZipFile(tmp_path / "c" / "street.zip") as archive:
        archive.extractall(root / "VOCdevkit" / "VOC2012")  # the reader's fixed root layout
        labelmap = parse_labelmap(archive.read("labelmap.txt").decode())
    card, _ = read_card(checkpoint)
    assert labelmap == {"background": (0, 0, 0), **dict(zip(card.class_names, map(tuple, card.palette)))}
    colour_to_id = {colour: card.class_names.index(name) for name, colour in labelmap.items() if name != "background"}
    dataset = VOCSegmentation(str(root), year="2012", image_set="val")
    assert len(dataset) == 9
    for i in range(9):
        image, target = dataset[i]
        rgb = np.asarray(target.convert("RGB"))
        assert image.size == target.size == (96, 48)
        ids = np.vectorize(lambda r, g, b: colour_to_id[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
        np.testing.assert_array_equal(ids, labels[i])


def test_render_writes_overlay_sheet_and_timeline(synth_output, tmp_path) -> None:
    out, labels, checkpoint = synth_output
    result = render_video(RenderConfig(out, "street", str(tmp_path / "r"), columns=3, rows=2), log=print)
    with av.open(result.overlay_mp4) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (48, 96, 3)
    sheet = Image.open(result.contact_sheet)
    assert sheet.format == "PNG" and sheet.size[::-1] == contact_sheet_size(48, 96, 6, 3)
    timeline = Image.open(result.timeline)
    assert timeline.format == "PNG" and timeline.size == TIMELINE_SIZE
    # The still is the lowest-scored frame (3: confidence 0.75, change 0.1): lossless, so exactly the blend.
    with av.open(str(Path(out).parent / "corpus" / "videos" / "synth_0000.mp4")) as container:
        source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][3]
    still = np.asarray(Image.open(result.overlay_png).convert("RGB"))
    y, x = 24, 48  # clear of the tags (top corners) and the legend (bottom left)
    colour = np.asarray(load_manifest(Path(out).parent / "corpus").palette[labels[3][y, x]])
    expected = np.round(0.5 * source[y, x] + 0.5 * colour)
    np.testing.assert_allclose(still[y, x], expected, atol=1)
    assert np.abs(frames[3][y, x].astype(int) - expected).max() <= 24  # H.264, 4:2:0


def test_report_page_has_runs_videos_class_share_and_errors(known_output, model, tmp_path) -> None:
    write_output(known_output, model[0], model[1], {}, failed={"broken": "/videos/broken.mp4: zero-byte file"})
    renders = tmp_path / "renders"
    renders.mkdir()
    (renders / "vid-a.timeline.png").write_bytes(b"png")
    page = tmp_path / "report.html"
    write_report(ReportConfig(known_output, str(page), renders=str(renders)), log=print)
    parsed = _Page()
    parsed.feed(page.read_text())
    assert {"Runs", "Videos", "Class share", "Errors (1)"} <= set(parsed.headings)
    assert "zero-byte file" in parsed.text and "constructed-run" in parsed.text
    assert {"sky", "road", "car"} <= set(parsed.cells)
    assert "renders/vid-a.timeline.png" in parsed.links and not [h for h in parsed.links if "vid-b" in h]
    image = [src for src in parsed.images if src.startswith("data:image/png;base64,")]
    assert image and Image.open(io.BytesIO(base64.b64decode(image[0].split(",", 1)[1]))).size[0] > 100
    chromium = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if chromium:  # the page renders in a real browser where the machine has one
        shot = tmp_path / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1200,1600", page.as_uri()], check=True, timeout=120, capture_output=True)
        assert Image.open(shot).size == (1200, 1600)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.cells: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.text = ""
        self._tag = ""

    def handle_starttag(self, tag, attrs) -> None:
        self._tag = tag
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data) -> None:
        self.text += data
        if self._tag in ("h2",):
            self.headings.append(data)
        if self._tag == "td":
            self.cells.append(data)


def test_progress_bar_only_on_a_terminal() -> None:
    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    quiet = Stream(False)
    bar = ProgressBar("export", 100, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
    live = Stream(True)
    bar = ProgressBar("segment", 100, unit="chunks", stream=live)
    bar.update(40, extra="812 frames, 61.0 frames/s")
    text = live.getvalue()
    assert text.startswith("\r[segment]") and "40/100 chunks" in text and "812 frames, 61.0 frames/s" in text
    assert "chunks/s" in text and "ETA" in text and "40%" in text
    bar.close()
    assert live.getvalue().endswith("\r\x1b[K")


def test_progress_outside_ray_starts_no_ray() -> None:
    """The one training loop reports progress on every step; run in one process (train_locally, make demo) it
    must not start a local Ray as a side effect (a later ray.init in the same process would then fail)."""
    script = ("import ray\nfrom dcfm.progress import tell_progress\n"
              "tell_progress('/tmp/some-run-without-ray', 1)\nprint(ray.is_initialized())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
