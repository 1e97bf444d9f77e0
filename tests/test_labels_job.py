"""CVAT export, renders and report on the output of a real segment job (local Ray; SeaweedFS for s3://)."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import av
import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import ModelCard, read_card, save_checkpoint
from dcfm.cli import main
from dcfm.inference import KeyframePolicy
from dcfm.labels.render import TIMELINE_SIZE, contact_sheet_size
from dcfm.model import DCFM, DCFMConfig
from dcfm.segment.config import SegmentJobConfig
from dcfm.segment.job import run_segment_job
from dcfm.sources import expand_inputs
from dcfm.synth import CLASSES, PALETTE, SynthConfig, generate_corpus
from tests.test_labels import _Page, parse_labelmap

pytestmark = pytest.mark.slow

FRAMES, HEIGHT, WIDTH = 13, 48, 96


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, SynthConfig(videos=2, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=11))
    return sorted((root / "videos").glob("*.mp4"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained model whose card carries the synth classes and colours, as `dcfm train` writes it."""
    config = DCFMConfig("pvt_v2_b0", num_classes=len(CLASSES))
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    save_checkpoint(path, DCFM(config).eval(), ModelCard(config, list(CLASSES), list(PALETTE), (32, 64)))
    return path


def segment(corpus: list[Path], output: str, checkpoint: str) -> dict[str, str]:
    summary = run_segment_job(SegmentJobConfig([str(p) for p in corpus], output, checkpoint,
                                               keyframes=KeyframePolicy(interval=2), mode="bidirectional",
                                               chunk_frames=4, progress_interval_s=3600))
    assert summary.ok == len(corpus)
    return {item.video_id: item.uri for item in expand_inputs([str(p) for p in corpus])}


@pytest.fixture(scope="module")
def real_output(ray_local, corpus, checkpoint, tmp_path_factory) -> tuple[str, dict[str, str]]:
    out = str(tmp_path_factory.mktemp("out") / "segment")
    return out, segment(corpus, out, checkpoint)


def parquet_masks(output: str) -> dict[tuple[str, int], np.ndarray]:
    fs, path = storage.filesystem(storage.join(output, "frames"))
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["video_id", "frame_index", "mask_png"])
    return {(r["video_id"], r["frame_index"]): np.asarray(Image.open(io.BytesIO(r["mask_png"])))
            for r in table.to_pylist()}


def check_zip(archive: zipfile.ZipFile, video_id: str, masks: dict, checkpoint: str) -> list[str]:
    """Colours -> class ids through labelmap.txt; every exported frame must equal its Parquet mask."""
    card, _ = read_card(checkpoint)
    labelmap = parse_labelmap(archive.read("labelmap.txt").decode())
    assert labelmap == {"background": (0, 0, 0), **dict(zip(card.class_names, map(tuple, card.palette)))}
    lut = {colour: card.class_names.index(name) for name, colour in labelmap.items() if name != "background"}
    names = archive.read("ImageSets/Segmentation/default.txt").decode().split()
    for name in names:
        rgb = np.asarray(Image.open(io.BytesIO(archive.read(f"SegmentationClass/{name}.png"))).convert("RGB"))
        packed = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
        ids = np.full(packed.shape, -1)
        for (r, g, b), class_id in lut.items():
            ids[packed == (r << 16 | g << 8 | b)] = class_id
        np.testing.assert_array_equal(ids, masks[(video_id, int(name.removeprefix("frame_")))], err_msg=name)
    return names


def test_export_reads_back_as_voc_segmentation_and_equals_the_parquet_masks(real_output, checkpoint, tmp_path) -> None:
    """The independent reader is torchvision.datasets.VOCSegmentation: Datumaro (the library CVAT imports with)
    pins pyarrow<26, pandas<3 and protobuf 4 in every release that installs here, so it cannot sit beside our
    dependencies."""
    from torchvision.datasets import VOCSegmentation

    out, ids = real_output
    masks = parquet_masks(out)
    assert main(["export", "cvat", out, "--to", str(tmp_path / "cvat")]) == 0
    for video_id in ids:
        with zipfile.ZipFile(tmp_path / "cvat" / f"{video_id}.zip") as archive:
            names = check_zip(archive, video_id, masks, checkpoint)
        assert names == [f"frame_{i:06d}" for i in range(FRAMES)]
    video_id = sorted(ids)[0]
    assert main(["export", "cvat", out, "--to", str(tmp_path / "voc"), "--videos", video_id, "--images",
                 "--subset", "train", "--every", "3"]) == 0
    root = tmp_path / "extracted"
    with zipfile.ZipFile(tmp_path / "voc" / f"{video_id}.zip") as archive:
        archive.extractall(root / "VOCdevkit" / "VOC2012")
    card, _ = read_card(checkpoint)
    colour_to_id = {tuple(c): i for i, c in enumerate(card.palette)}
    dataset = VOCSegmentation(str(root), year="2012", image_set="train")
    assert [Path(m).stem for m in dataset.masks] == [f"frame_{i:06d}" for i in range(0, FRAMES, 3)]
    for (image, target), mask_path in zip(dataset, dataset.masks):
        assert image.size == target.size == (WIDTH, HEIGHT)
        rgb = np.asarray(target.convert("RGB")).reshape(-1, 3)
        ids_ = np.array([colour_to_id[tuple(p)] for p in rgb]).reshape(HEIGHT, WIDTH)
        np.testing.assert_array_equal(ids_, masks[(video_id, int(Path(mask_path).stem[6:]))])


def test_render_of_a_real_job(real_output, checkpoint, tmp_path) -> None:
    out, ids = real_output
    video_id = sorted(ids)[1]
    assert main(["render", out, video_id, "--to", str(tmp_path / "r")]) == 0
    with av.open(str(tmp_path / "r" / f"{video_id}.overlay.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(ids[video_id]) as container:
        source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(source) == FRAMES and frames[0].shape == source[0].shape == (HEIGHT, WIDTH, 3)
    sheet = Image.open(tmp_path / "r" / f"{video_id}.contact.png")
    assert sheet.format == "PNG" and sheet.size[::-1] == contact_sheet_size(HEIGHT, WIDTH, FRAMES, 4)
    timeline = Image.open(tmp_path / "r" / f"{video_id}.timeline.png")
    assert timeline.format == "PNG" and timeline.size == TIMELINE_SIZE
    # A pixel of known class: the overlay is the blend of the source and the class colour of the Parquet mask.
    masks = parquet_masks(out)
    card, _ = read_card(checkpoint)
    palette = np.asarray(card.palette, dtype=float)
    rows, columns = slice(14, 25), slice(4, WIDTH - 4)  # below the tags, above the legend
    for index in (1, 6, 11):
        mask = masks[(video_id, index)]
        # Pixels inside a region of one class (5x5): class edges are where H.264 4:2:0 smears colour.
        padded = np.pad(mask, 2, mode="edge")
        inside = np.ones(mask.shape, bool)
        for dy in range(5):
            for dx in range(5):
                inside &= padded[dy:dy + HEIGHT, dx:dx + WIDTH] == mask
        expected = 0.5 * source[index] + 0.5 * palette[mask]
        error = np.abs(frames[index].astype(float) - expected)[rows, columns][inside[rows, columns]]
        assert error.size > 50 and np.median(error) <= 8, (index, error.size, np.median(error))


def test_export_render_and_report_on_s3(ray_local, corpus, checkpoint, s3_env, tmp_path) -> None:
    out = f"{s3_env}/segment"
    ids = segment(corpus, out, checkpoint)
    masks = parquet_masks(out)
    assert main(["export", "cvat", out, "--to", f"{s3_env}/cvat", "--review", "4"]) == 0
    video_id = sorted(ids)[0]
    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(f"{s3_env}/cvat/{video_id}.zip"))) as archive:
        assert len(check_zip(archive, video_id, masks, checkpoint)) == 4
    queue = storage.read_bytes(f"{s3_env}/cvat/{video_id}.review.csv").decode().splitlines()
    assert queue[0].startswith("rank,frame,score") and len(queue) == 5
    assert main(["render", out, video_id, "--to", f"{s3_env}/renders"]) == 0
    with av.open(io.BytesIO(storage.read_bytes(f"{s3_env}/renders/{video_id}.overlay.mp4"))) as container:
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    assert main(["report", out, "--to", str(tmp_path / "report.html"), "--renders", f"{s3_env}/renders"]) == 0
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    assert f"{s3_env}/renders/{video_id}.overlay.mp4" in page.links
    assert sum(video in page.cells for video in ids) == 2


def test_ray_workers_drive_the_terminal_bar_of_the_driver(ray_local) -> None:
    import ray

    from dcfm.progress import RemoteProgress, tell_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = RemoteProgress("s3://bucket/run", "train", 10, "steps", stream=screen)
    ray.get(ray.remote(num_cpus=0)(lambda: tell_progress("s3://bucket/run", 7)).remote())
    deadline = time.monotonic() + 20
    while "7/10 steps" not in screen.getvalue() and time.monotonic() < deadline:
        time.sleep(0.1)
    progress.close()
    assert "7/10 steps" in screen.getvalue() and "ETA" in screen.getvalue()
    quiet = RemoteProgress("s3://bucket/other", "train", 10, "steps", stream=io.StringIO())
    ray.get(ray.remote(num_cpus=0)(lambda: tell_progress("s3://bucket/other", 3)).remote())  # no counter: no-op
    quiet.close()
