"""Pair datasets: tiny trees in each on-disk layout, built from generated images in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcfm.data import LAYOUTS, detect_layout, open_pair_dataset
from dcfm.data.base import PairDataset, PairRef, PairSample
from dcfm.data.camvid import CamVidPairs
from dcfm.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSequencePairs
from dcfm.data.synth import SynthPairs
from dcfm.data.vspw import VSPW_CLASSES, VSPWPairs

H, W = 32, 64


def frame_image(code: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A flat RGB image whose pixels encode `code` (R = high byte, G = low byte), so a test can tell which
    frame was loaded; flat colour survives PNG exactly and a bilinear resize unchanged."""
    img = np.zeros((*size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = code // 256, code % 256, 77
    return img


def decode(img: np.ndarray) -> int:
    return int(round(float(img[..., 0].mean()))) * 256 + int(round(float(img[..., 1].mean())))


def strips(values: list[int]) -> np.ndarray:
    """H×W label made of vertical strips, one per value (W must split evenly)."""
    assert W % len(values) == 0
    return np.repeat(np.asarray(values, np.uint8), W // len(values))[None, :].repeat(H, axis=0)


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


# --- Cityscapes -------------------------------------------------------------------------------------------

CS_IDS = [0, 1, 7, 8, 26, 33, 9, 24]  # unlabeled, ego vehicle, road, sidewalk, car, bicycle, parking, person
CS_TRAIN = [255, 255, 0, 1, 13, 18, 255, 11]


def make_cityscapes(root: Path, frames: range = range(17, 23), seqs: tuple[int, ...] = (0, 3),
                    split: str = "train", city: str = "aachen") -> Path:
    for seq in seqs:
        prefix = f"{city}_{seq:06d}"
        for f in frames:
            save(root / "leftImg8bit_sequence" / split / city / f"{prefix}_{f:06d}_leftImg8bit.png",
                 frame_image(1000 * seq + f))
        save(root / "gtFine" / split / city / f"{prefix}_000019_gtFine_labelIds.png", strips(CS_IDS))
    return root


def test_cityscapes_pairs_neighbour_and_label_mapping(tmp_path: Path) -> None:
    ds = CityscapesSequencePairs(make_cityscapes(tmp_path), "train", delta=1)
    assert len(ds) == 2 and ds.classes == CITYSCAPES_CLASSES and len(ds.palette) == 19
    for i, seq in enumerate((0, 3)):
        s = ds[i]
        assert (s.ref.video_id, s.ref.labeled_index, s.ref.neighbour_index) == (f"aachen_{seq:06d}", 19, 20)
        assert decode(s.labeled) == 1000 * seq + 19 and decode(s.neighbour) == 1000 * seq + 20
        np.testing.assert_array_equal(s.label, strips(CS_TRAIN))


def test_cityscapes_delta_and_backward_fallback(tmp_path: Path) -> None:
    ds = CityscapesSequencePairs(make_cityscapes(tmp_path, frames=range(15, 21)), "train", delta=3)
    # 19 + 3 = 22 was not written, so the neighbour is 19 - 3.
    assert [r.neighbour_index for r in ds.refs] == [16, 16]
    assert decode(ds[1].neighbour) == 3016


def test_cityscapes_negative_delta_prefers_the_past(tmp_path: Path) -> None:
    ds = CityscapesSequencePairs(make_cityscapes(tmp_path), "train", delta=-1)
    assert [r.neighbour_index for r in ds.refs] == [18, 18] and decode(ds[0].neighbour) == 18
    # 19 - 3 = 16 was not written, so the neighbour is 19 + 3.
    fallback = CityscapesSequencePairs(make_cityscapes(tmp_path / "b", frames=range(19, 25)), "train", delta=-3)
    assert [r.neighbour_index for r in fallback.refs] == [22, 22]


def test_cityscapes_prefers_label_train_ids(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, seqs=(0,))
    save(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
         strips([0, 5, 18, 19, 255, 7, 200, 1]))
    s = CityscapesSequencePairs(root)[0]
    assert s.ref.label_path.endswith("_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(s.label, strips([0, 5, 18, 255, 255, 7, 255, 1]))


def test_cityscapes_missing_files_are_named(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, frames=range(19, 20), seqs=(0,))
    ds = CityscapesSequencePairs(root)
    with pytest.raises(FileNotFoundError, match="neighbour frame.*aachen_000000_000020_leftImg8bit.png"):
        ds[0]
    save(root / "leftImg8bit_sequence/train/aachen/aachen_000000_000020_leftImg8bit.png", frame_image(20))
    Path(ds.refs[0].label_path).unlink()
    with pytest.raises(FileNotFoundError, match="label.*aachen_000000_000019_gtFine_labelIds.png"):
        ds[0]


# --- VSPW -------------------------------------------------------------------------------------------------

VSPW_RAW = [0, 1, 5, 124, 255, 125, 2, 60]
VSPW_EXPECTED = [255, 0, 4, 123, 255, 255, 1, 59]


def make_vspw(root: Path, videos: dict[str, int] | None = None, split: list[str] | None = None) -> Path:
    """`videos`: name -> number of frames; frames named 00000000.jpg.. (every frame annotated)."""
    palette = [c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)]
    for v, (name, n) in enumerate((videos or {"vid_a": 3, "vid_b": 2}).items()):
        for f in range(n):
            save(root / "data" / name / "origin" / f"{f:08d}.jpg", frame_image(40 * (f + 1)))
            mask = Image.fromarray(strips(VSPW_RAW), "P")
            mask.putpalette(palette)  # P-mode like the real masks: indices must not go through the palette
            (root / "data" / name / "mask").mkdir(parents=True, exist_ok=True)
            mask.save(root / "data" / name / "mask" / f"{f:08d}.png")
    if split is not None:
        (root / "train.txt").write_text("".join(f"{s}\n" for s in split))
    return root


def decode_jpg(img: np.ndarray) -> int:
    return int(round(float(img[..., 1].mean()) / 40)) - 1


def test_vspw_pairs_mapping_and_neighbours(tmp_path: Path) -> None:
    ds = VSPWPairs(make_vspw(tmp_path), "train", delta=1)
    assert len(VSPW_CLASSES) == 124 and len(ds.palette) == 124 and ds.classes[0] == "wall"
    pairs = [(r.video_id, r.labeled_index, r.neighbour_index) for r in ds.refs]
    assert pairs == [("vid_a", 0, 1), ("vid_a", 1, 2), ("vid_a", 2, 1), ("vid_b", 0, 1), ("vid_b", 1, 0)]
    s = ds[2]
    assert (decode_jpg(s.labeled), decode_jpg(s.neighbour)) == (2, 1)
    np.testing.assert_array_equal(s.label, strips(VSPW_EXPECTED))


def test_vspw_split_file_selects_videos(tmp_path: Path) -> None:
    ds = VSPWPairs(make_vspw(tmp_path, split=["vid_b"]), "train")
    assert {r.video_id for r in ds.refs} == {"vid_b"}
    (tmp_path / "train.txt").write_text("vid_b\nvid_missing\n")
    with pytest.raises(FileNotFoundError, match="vid_missing"):
        VSPWPairs(tmp_path, "train")


# --- CamVid -----------------------------------------------------------------------------------------------

CAMVID_RAW = [0, 3, 10, 11, 200, 5, 8, 1]
CAMVID_EXPECTED = [0, 3, 10, 255, 255, 5, 8, 1]
# real CamVid naming: 0001TP_<6 digits>, Seq05VD_f<5 digits>; stills every 30th frame
CAMVID_STILLS = {"0001TP_006690": 6690, "0001TP_006720": 6720, "Seq05VD_f00030": 30}


def make_camvid(root: Path, split: str = "train") -> Path:
    for stem, num in CAMVID_STILLS.items():
        save(root / split / f"{stem}.png", frame_image(num))
        save(root / f"{split}annot" / f"{stem}.png", strips(CAMVID_RAW))
    big = (2 * H, 2 * W)  # decoded video frames are larger than the SegNet stills
    save(root / "frames/0001TP/0001TP_006691.png", frame_image(6691, big))
    save(root / "frames/0001TP/0001TP_006719.png", frame_image(6719, big))  # 006721 absent: backward
    save(root / "images_sequence/Seq05VD_f00031.png", frame_image(31, big))  # TMANet-style flat dir
    return root


def test_camvid_pairs_neighbours_resize_and_mapping(tmp_path: Path) -> None:
    ds = CamVidPairs(make_camvid(tmp_path), "train", delta=1)
    got = {(r.video_id, r.labeled_index, r.neighbour_index) for r in ds.refs}
    assert got == {("0001TP", 6690, 6691), ("0001TP", 6720, 6719), ("Seq05VD", 30, 31)}
    for s in ds:
        assert decode(s.labeled) == s.ref.labeled_index and decode(s.neighbour) == s.ref.neighbour_index
        assert s.neighbour.shape == s.labeled.shape == (H, W, 3)
        np.testing.assert_array_equal(s.label, strips(CAMVID_EXPECTED))


def test_camvid_missing_neighbour_is_named(tmp_path: Path) -> None:
    ds = CamVidPairs(make_camvid(tmp_path), "train", delta=2)
    with pytest.raises(FileNotFoundError, match="frames/0001TP/0001TP_006692.png"):
        ds[0]


# --- synth (needs dcfm.synth / dcfm.decode, written separately) ---------------------------------------------


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    synth = pytest.importorskip("dcfm.synth")
    root = tmp_path_factory.mktemp("synth")
    synth.generate_corpus(root, synth.SynthConfig(videos=2, frames=8, height=32, width=64, labeled_every=4,
                                                  seed=0))
    return root


def test_synth_pairs_decode_the_right_frames(synth_root: Path) -> None:
    from dcfm.decode import read_frames

    ds = SynthPairs(synth_root, delta=2)
    refs = [(r.video_id, r.labeled_index, r.neighbour_index) for r in ds.refs]
    # labelled frames 2 and 6 of 8; 6 + 2 is past the end, so its neighbour is 6 - 2
    assert refs == [(v, lab, u) for v in ("synth_0000", "synth_0001") for lab, u in ((2, 4), (6, 4))]
    for s in ds:
        want_l, want_u = read_frames(s.ref.labeled_path, [s.ref.labeled_index, s.ref.neighbour_index])
        np.testing.assert_array_equal(s.labeled, want_l)
        np.testing.assert_array_equal(s.neighbour, want_u)
        png = synth_root / "labels" / s.ref.video_id / f"{s.ref.labeled_index:06d}.png"
        np.testing.assert_array_equal(s.label, np.asarray(Image.open(png)))
        assert not np.array_equal(s.labeled, s.neighbour)


def test_synth_video_subset(synth_root: Path) -> None:
    ds = SynthPairs(synth_root, video_ids=["synth_0001"])
    assert {r.video_id for r in ds.refs} == {"synth_0001"} and len(ds) == 2
    assert [r.neighbour_index for r in ds.refs] == [3, 7]
    with pytest.raises(ValueError, match="synth_9999"):
        SynthPairs(synth_root, video_ids=["synth_9999"])


def test_synth_manifest_splits_select_videos(synth_root: Path, tmp_path: Path) -> None:
    """A corpus split by hand (a "splits" entry in manifest.json) trains on one split and evaluates on another."""
    import json
    import shutil

    from dcfm.data import open_clips

    root = tmp_path / "split"
    shutil.copytree(synth_root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"] = {"train": ["synth_0000"], "val": ["synth_0001"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert {r.video_id for r in open_pair_dataset(root, split="train").refs} == {"synth_0000"}
    assert [v.video_id for v in open_clips(root, split="val").videos] == ["synth_0001"]
    with pytest.raises(ValueError, match="split 'test' not in .*has \\['train', 'val'\\]"):
        open_pair_dataset(root, split="test")


# --- one contract for every layout ------------------------------------------------------------------------

BUILDERS = {
    "cityscapes": (make_cityscapes, CityscapesSequencePairs),
    "vspw": (make_vspw, VSPWPairs),
    "camvid": (make_camvid, CamVidPairs),
}


@pytest.fixture(params=LAYOUTS)
def any_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, type[PairDataset]]:
    if request.param == "synth":
        return "synth", request.getfixturevalue("synth_root"), SynthPairs
    build, cls = BUILDERS[request.param]
    return request.param, build(tmp_path), cls


def test_every_layout_loads_into_the_same_contract(any_root: tuple[str, Path, type[PairDataset]]) -> None:
    layout, root, cls = any_root
    assert detect_layout(root) == layout
    ds = open_pair_dataset(root)  # layout="auto", split="train", delta=1
    assert type(ds) is cls and ds.layout == layout and ds.ignore_index == 255
    assert len(ds) > 0 and len(ds.classes) == len(ds.palette)
    assert all(len(c) == 3 and all(0 <= x <= 255 for x in c) for c in ds.palette)
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader / Ray workers get a copy
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s, PairSample) and isinstance(s.ref, PairRef) and s.ref == ds.refs[i]
        assert s.labeled.dtype == s.neighbour.dtype == s.label.dtype == np.uint8
        assert s.labeled.ndim == 3 and s.labeled.shape[2] == 3 and s.neighbour.shape == s.labeled.shape
        assert s.label.shape == s.labeled.shape[:2]
        assert abs(s.ref.neighbour_index - s.ref.labeled_index) == 1
        valid = s.label[s.label != 255]
        assert valid.size == 0 or int(valid.max()) < len(ds.classes)
    assert type(open_pair_dataset(root, layout=layout)) is cls


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError) as err:
        open_pair_dataset(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert all(name in str(err.value) for name in LAYOUTS)
    with pytest.raises(ValueError, match="unknown layout 'kitti'"):
        open_pair_dataset(make_camvid(tmp_path), layout="kitti")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        open_pair_dataset(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="gtFine"):
        CityscapesSequencePairs(tmp_path)
