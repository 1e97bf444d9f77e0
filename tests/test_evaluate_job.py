"""`dcfm evaluate`: its numbers against an independent computation from the masks it predicted, the sweep's
outputs, the public layouts' clips, and S3 in and out."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.cli import main
from dcfm.data import open_clips
from dcfm.evaluate.config import EvaluateJobConfig
from dcfm.evaluate.job import mask_uri, run_evaluate_job
from dcfm.inference import KeyframePolicy
from dcfm.model import DCFM, DCFMConfig
from dcfm.synth import SynthConfig, generate_corpus, load_manifest
from dcfm.train.config import TrainJobConfig
from dcfm.train.loop import train_locally
from dcfm.train.recipe import AugmentConfig, OptimConfig
from tests.test_datasets import make_camvid, make_cityscapes, make_vspw

H, W, FRAMES = 32, 64, 18


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-corpus")
    generate_corpus(root, SynthConfig(videos=2, frames=FRAMES, height=H, width=W, seed=11))
    return root


@pytest.fixture(scope="module")
def checkpoint(corpus: Path, tmp_path_factory) -> Path:
    """A briefly trained model, so predictions hold several classes and change between frames."""
    output = tmp_path_factory.mktemp("ckpt") / "run"
    train_locally(TrainJobConfig(data=str(corpus), output=str(output), backbone="pvt_v2_b0", steps=12, batch_size=2,
                                 augment=AugmentConfig(crop=(H, W)), checkpoint_every=12,
                                 optim=OptimConfig(name="adamw", lr=2e-3, decoder_lr_mult=1.0)), device="cpu")
    return output / "checkpoint_000012"  # a training checkpoint is a model checkpoint too


def read_png(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))))


def independent_scores(preds: list[np.ndarray], gts: list[np.ndarray], classes: int) -> dict:
    """mIoU (absent classes left out), fwIoU, pixel accuracy and per-class IoU from scratch."""
    p = np.concatenate([x.ravel() for x in preds]).astype(np.int64)
    g = np.concatenate([x.ravel() for x in gts]).astype(np.int64)
    keep = g != 255
    p, g = p[keep], g[keep]
    ious, weights = [], []
    for c in range(classes):
        tp = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        ious.append(tp / union if union else math.nan)
        weights.append(np.sum(g == c) / g.size)
    present = [v for v in ious if not math.isnan(v)]
    fw = sum(w * (0 if math.isnan(v) else v) for w, v in zip(weights, ious))
    return {"miou": sum(present) / len(present), "wiou": fw, "pixel_accuracy": float(np.mean(p == g)), "ious": ious}


def independent_vc(videos: list[tuple[list[np.ndarray], list[np.ndarray]]], n: int) -> float | None:
    """VSPW VC_n: windows 0..T-n-1, GT- and prediction-consistent pixels, pooled over all windows."""
    scores = []
    for preds, gts in videos:
        for start in range(len(gts) - n):
            gt_same = np.all([gts[start + i] == gts[start] for i in range(n)], axis=0)
            pred_same = np.all([preds[start + i] == preds[start] for i in range(n)], axis=0)
            if gt_same.sum():
                scores.append((gt_same & pred_same).sum() / gt_same.sum())
    return float(np.mean(scores)) if scores else None


def test_evaluate_numbers_equal_an_independent_computation_from_its_masks(corpus, checkpoint, tmp_path) -> None:
    out = str(tmp_path / "eval")
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--output", out,
                 "--sweep", "--save-masks", "--batch-size", "4"])
    assert code == 0
    report = json.loads(Path(out, "evaluation.json").read_text())
    rows = report["results"]
    assert [r["setting"] for r in rows] == ["k1-causal", "k2-causal", "k2-bidirectional", "k4-causal",
                                            "k4-bidirectional", "k6-causal", "k6-bidirectional"]
    manifest = load_manifest(corpus)
    gts = {v.id: [np.asarray(Image.open(manifest.label_path(v, i))) for i in range(v.frames)] for v in manifest.videos}
    table = Path(out, "evaluation.md").read_text()
    distinct_predictions = set()
    for row in rows:
        preds = {vid: [read_png(mask_uri(out, row["setting"], vid, i)) for i in range(FRAMES)] for vid in gts}
        distinct_predictions |= {int(c) for p in preds.values() for c in np.unique(np.stack(p))}
        mine = independent_scores(sum(preds.values(), []), sum(gts.values(), []), manifest.num_classes)
        assert row["miou"] == pytest.approx(mine["miou"], abs=1e-9)
        assert row["wiou"] == pytest.approx(mine["wiou"], abs=1e-9)
        assert row["pixel_accuracy"] == pytest.approx(mine["pixel_accuracy"], abs=1e-9)
        for name, iou in zip(manifest.classes, mine["ious"]):
            assert row["per_class_iou"][name] == (None if math.isnan(iou) else pytest.approx(iou, abs=1e-9))
        for n in (8, 16):
            assert row[f"vc{n}"] == pytest.approx(independent_vc([(preds[v], gts[v]) for v in gts], n), abs=1e-9)
        # Keyframes where the schedule puts them; non-keyframe mIoU over exactly the other frames.
        k = row["keyframe_interval"]
        assert row["keyframes_by_video"] == {vid: list(range(0, FRAMES, k)) for vid in gts}
        assert row["keyframes"] == 2 * len(range(0, FRAMES, k)) and row["frames"] == 2 * FRAMES
        if k == 1:
            assert row["miou_non_key"] is None and row["ms_per_non_keyframe"] is None
        else:
            non_key = [i for i in range(FRAMES) if i % k]
            mine = independent_scores([preds[v][i] for v in gts for i in non_key],
                                      [gts[v][i] for v in gts for i in non_key], manifest.num_classes)
            assert row["miou_non_key"] == pytest.approx(mine["miou"], abs=1e-9)
            # The time split is an attribution of the measured total, frame by frame.
            non_keyframes = row["frames"] - row["keyframes"]
            total_ms = row["keyframes"] * row["ms_per_keyframe"] + non_keyframes * row["ms_per_non_keyframe"]
            assert total_ms == pytest.approx(1000 * row["seconds"], rel=1e-6)
        assert row["fps"] == pytest.approx(row["frames"] / row["seconds"])
        assert f"| {row['setting']} | {k} | {row['mode']} | 1 | {row['miou']:.3f} |" in table
    assert len(distinct_predictions) >= 3  # a model that predicts one class would make the check vacuous
    with Image.open(Path(out, "accuracy_vs_speed.png")) as plot:
        assert plot.format == "PNG" and plot.width > 400


def test_compare_puts_checkpoints_of_other_non_key_scales_in_one_sweep(corpus, checkpoint, tmp_path,
                                                                        capsys) -> None:
    half = tmp_path / "half"
    train_locally(TrainJobConfig(data=str(corpus), output=str(half), backbone="resnet18", steps=2, batch_size=2,
                                 augment=AugmentConfig(crop=(H, W)), checkpoint_every=2, nonkey_scale=0.5),
                  device="cpu")
    full_out, half_out = str(tmp_path / "eval-full"), str(tmp_path / "eval-half")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--output", full_out,
                 "--sweep"]) == 0
    assert main(["evaluate", "--checkpoint", str(half / "checkpoint_000002"), "--data", str(corpus),
                 "--output", half_out, "--sweep", "--compare", full_out]) == 0
    report = json.loads(Path(half_out, "evaluation.json").read_text())
    assert {r["nonkey_scale"] for r in report["results"]} == {0.5} and len(report["results"]) == 7
    assert report["compared"] == [str(checkpoint)]
    full_rows = json.loads(Path(full_out, "evaluation.json").read_text())["results"]
    table = Path(half_out, "evaluation.md").read_text()
    for row, scale in [(r, 0.5) for r in report["results"]] + [(r, 1.0) for r in full_rows]:
        assert f"| {row['setting']} | {row['mode']} | {scale:g} | {row['miou']:.3f} |".replace(
            f"| {row['mode']}", f"| {row['keyframe_interval']} | {row['mode']}") in table
    assert "k6-causal s=0.5" in table and "k6-causal s=1" in table
    with Image.open(Path(half_out, "accuracy_vs_speed.png")) as plot:
        assert plot.format == "PNG"
    # Only evaluations of the same clips compare; a wrong URI fails before any work.
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--output",
                 str(tmp_path / "one-clip"), "--videos", "synth_0000", "--compare", full_out]) == 2
    assert "--compare the evaluation of " in (err := capsys.readouterr().err) and "scored videos 2, this run 1" in err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--output",
                 str(tmp_path / "x"), "--compare", str(tmp_path / "nowhere")]) == 2
    assert "evaluation.json does not exist" in capsys.readouterr().err


def test_single_setting_and_bad_command_lines(corpus, checkpoint, tmp_path, capsys) -> None:
    summary = run_evaluate_job(EvaluateJobConfig(str(checkpoint), str(corpus), str(tmp_path / "one"),
                                                 keyframes=KeyframePolicy(adaptive=True, max_interval=4),
                                                 mode="causal", native_resolution=True), log=lambda _: None)
    (row,) = summary.rows
    assert row["adaptive"] and row["keyframe_interval"] is None and row["setting"].startswith("adaptive-rgb")
    assert all(max(np.diff(k + [FRAMES])) <= 4 for k in row["keyframes_by_video"].values())
    assert not Path(tmp_path / "one" / "accuracy_vs_speed.png").exists() and "plot" not in summary.files
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--output", str(tmp_path),
                 "--sweep", "--adaptive"]) == 2
    assert "--sweep scores fixed intervals 1, 2, 4, 6; it cannot be combined with adaptive" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", str(corpus),
                 "--output", str(tmp_path)]) == 3
    assert "not a DCFM checkpoint" in capsys.readouterr().err


def test_public_layouts_give_clips_with_mapped_labels(tmp_path) -> None:
    vspw = open_clips(make_vspw(tmp_path / "vspw"), split="train")
    assert [(v.video_id, v.frames, sorted(v.labels)) for v in vspw.videos] == [("vid_a", 3, [0, 1, 2]),
                                                                              ("vid_b", 2, [0, 1])]
    assert vspw.videos[0].fully_labelled and vspw.videos[0].read_label(1)[0, :8].tolist() == [255] * 8  # raw 0
    cityscapes = open_clips(make_cityscapes(tmp_path / "cs"), split="train")
    clip = cityscapes.videos[0]
    # frames 17..22 exist; the labelled 19th is third; labelIds map to train ids.
    assert (clip.video_id, clip.frames, list(clip.labels)) == ("aachen_000000_000019", 6, [2])
    assert [p.name[14:20] for p in clip.frame_paths] == ["000017", "000018", "000019", "000020", "000021", "000022"]
    assert set(np.unique(clip.read_label(2))) == {0, 1, 11, 13, 18, 255}
    camvid = open_clips(make_camvid(tmp_path / "camvid"), split="train")
    by_id = {v.video_id: v for v in camvid.videos}
    # A window of the decoded sequence around each still (the still stands in for the frame frames/ lacks).
    assert [(i, by_id[i].frames, list(by_id[i].labels)) for i in sorted(by_id)] == [
        ("0001TP_006690", 2, [0]), ("0001TP_006720", 2, [1]), ("Seq05VD_f00030", 2, [0])]
    clip = by_id["0001TP_006720"]
    assert [p.name for p in clip.frame_paths] == ["0001TP_006719.png", "0001TP_006720.png"]
    frames = list(clip.iter_frames())
    assert len({f.shape for f in frames}) == 1  # the half-size still was brought to the video frames' size


def test_evaluate_runs_on_a_cityscapes_sequence_tree(tmp_path) -> None:
    root = make_cityscapes(tmp_path / "cs", seqs=(0, 3, 5))
    model_config = DCFMConfig("pvt_v2_b0", num_classes=19)
    clips = open_clips(root, split="train")
    card = ModelCard(model_config, clips.classes, clips.palette, (H, W))
    save_checkpoint(tmp_path / "m", DCFM(model_config).eval(), card)
    config = EvaluateJobConfig(str(tmp_path / "m"), str(root), str(tmp_path / "out"), split="train",
                               keyframes=KeyframePolicy(interval=4), mode="causal")
    summary = run_evaluate_job(config, log=lambda _: None)
    (row,) = summary.rows
    # Three 6-frame snippets (17..22), each run at the 4 keyframe phases (keyframes per clip: 2, 2, 1, 1); the
    # labelled frame 19 is third in its clip, so a keyframe at phase 2 only.
    assert (row["frames"], row["keyframes"], summary.header["labelled_frames"]) == (72, 18, 3)
    assert row["phase_averaged_clips"] == 3
    assert row["miou"] is not None and row["miou_non_key"] is not None and row["vc8"] is None
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m"), "--data", str(make_vspw(tmp_path / "vspw")),
                 "--output", str(tmp_path / "vspw-out"), "--split", "train"]) == 3  # 124 classes vs 19: refused


def test_sparse_labels_are_scored_over_every_keyframe_phase(tmp_path) -> None:
    """Cityscapes: the 20th of 30 frames is labelled. At k = 3 it is a keyframe in one phase of three and a
    non-keyframe 1 or 2 frames after its keyframe in the others; the score pools all three, each computed here
    from a plain ClipSegmenter run with that phase."""
    from dcfm.evaluate.score import SettingAccumulator, phases_for, read_labels
    from dcfm.inference import ClipSegmenter, InferenceConfig
    from dcfm.metrics import ConfusionMatrix

    root = make_cityscapes(tmp_path / "cs", frames=range(0, 30), seqs=(0, 4))
    clips = open_clips(root, split="train")
    assert [(v.frames, list(v.labels)) for v in clips.videos] == [(30, [19]), (30, [19])]
    torch.manual_seed(0)
    model = DCFM(DCFMConfig("resnet18", num_classes=19)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    config = InferenceConfig(keyframes=KeyframePolicy(interval=3), mode="causal", batch_size=8)
    accumulator = SettingAccumulator(model, config, 19)
    expected, expected_non_key = ConfusionMatrix(19), ConfusionMatrix(19)
    roles = []
    for video in clips.videos:
        frames = [np.array(Image.fromarray(f).resize((W, H))) for f in video.iter_frames()]
        labels = read_labels(video)
        accumulator.add(video, frames, labels[19].shape, labels)
        assert list(phases_for(video, config)) == [0, 1, 2]
        for phase in range(3):
            phased = InferenceConfig(keyframes=KeyframePolicy(interval=3, phase=phase), mode="causal",
                                     output_size=labels[19].shape)
            results = list(ClipSegmenter(model, phased).segment(frames))
            if phase:  # frames before the first keyframe use the next keyframe only
                assert results[0].keyframes == (phase,)
            labelled = results[19]
            roles.append((labelled.is_keyframe, 19 - max(labelled.keyframes)))
            expected.update(labelled.labels, labels[19])
            if not labelled.is_keyframe:
                expected_non_key.update(labelled.labels, labels[19])
    assert roles == [(False, 1), (True, 0), (False, 2)] * 2  # 19 % 3 == 1: a keyframe at phase 1 only
    report = accumulator.report(clips.classes)
    assert np.array_equal(accumulator.confusion.matrix, expected.matrix)
    assert np.array_equal(accumulator.confusion_non_key.matrix, expected_non_key.matrix)
    assert report.phase_averaged_clips == 2 and report.frames == 2 * 3 * 30 and report.keyframes == 2 * 30
    # A fully labelled clip, or k = 1, has one phase only.
    assert list(phases_for(clips.videos[0], InferenceConfig(keyframes=KeyframePolicy(interval=1)))) == [0]


@pytest.mark.slow
def test_evaluate_reads_and_writes_s3(s3_env, corpus, checkpoint, tmp_path) -> None:
    fs, _ = storage.filesystem(s3_env)
    bucket = s3_env.removeprefix("s3://")
    fs.put(str(corpus) + "/", f"{bucket}/corpus/", recursive=True)
    fs.put(str(checkpoint) + "/", f"{bucket}/model/", recursive=True)
    config = EvaluateJobConfig(f"{s3_env}/model", f"{s3_env}/corpus", f"{s3_env}/eval", mode="causal",
                               data_cache=str(tmp_path / "staged"))
    summary = run_evaluate_job(config, log=lambda _: None)
    stored = json.loads(storage.read_bytes(f"{s3_env}/eval/evaluation.json"))
    assert stored["results"] == json.loads(json.dumps(summary.rows)) and stored["videos"] == 2
    assert storage.exists(f"{s3_env}/eval/evaluation.md")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_evaluate_scores_exactly_the_masks_segment_writes(ray_local, corpus, checkpoint, tmp_path, mode) -> None:
    """Same checkpoint, video, resolution and keyframes: the masks evaluate scores are the segment job's, pixel for
    pixel, at a resolution that makes both resize the frames (1.5 times the corpus' size; PVTv2's first stage
    needs 32 rows or more)."""
    import pyarrow.dataset as pads
    import torch

    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.job import run_segment_job

    resolution, k = (H * 3 // 2, W * 3 // 2), 3
    manifest = load_manifest(corpus)
    segment_out, evaluate_out = tmp_path / "segment", str(tmp_path / "evaluate")
    run_segment_job(SegmentJobConfig([str(manifest.video_path(v)) for v in manifest.videos], str(segment_out),
                                     str(checkpoint), keyframes=KeyframePolicy(interval=k), mode=mode,
                                     resolution=resolution, chunk_frames=FRAMES, progress_interval_s=3600))
    threads = torch.get_num_threads()
    try:  # the actor's one torch thread: float sums in another order could flip a near-tie argmax
        run_evaluate_job(EvaluateJobConfig(str(checkpoint), str(corpus), evaluate_out, mode=mode, threads=1,
                                           keyframes=KeyframePolicy(interval=k), resolution=resolution,
                                           save_masks=True, warmup=False), log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    frames = pads.dataset(str(segment_out / "frames"), format="parquet", partitioning="hive").to_table(
        columns=["video_uri", "frame_index", "is_keyframe", "mask_png"]).to_pylist()
    ids = {str(manifest.video_path(v).resolve()): v.id for v in manifest.videos}
    assert len(frames) == FRAMES * len(ids)
    setting = f"k{k}-{mode}"
    for row in frames:
        segmented = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
        evaluated = read_png(mask_uri(evaluate_out, setting, ids[row["video_uri"]], row["frame_index"]))
        assert segmented.shape == (H, W)  # the source's size: both upsample the logits to it
        assert np.array_equal(segmented, evaluated), (row["video_uri"], row["frame_index"])
