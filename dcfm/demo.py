"""`make demo`: from nothing to segmented video in a few minutes on 2 CPU cores.

1. generates a small synthetic labelled video corpus (real H.264 files + label maps);
2. trains a small DCFM (ResNet-18) briefly with the symmetric-pair loss, in the training loop `dcfm train`
   runs on every Ray Train worker (here in this process, as one worker);
3. saves the checkpoint (safetensors + model card);
4. runs the segment job (Ray Data, local Ray) on the held-out videos into OUTPUT/segment (Parquet) and scores
   its masks against the synthetic ground truth;
5. compares keyframe intervals and both reuse modes on the held-out videos: mIoU, VC8, label-free
   consistency and frames/s;
6. exports the masks for CVAT (with a review queue), renders the first held-out video (overlay MP4, contact
   sheet, timeline) and writes the HTML report, and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from dcfm.checkpoint import save_checkpoint
from dcfm.data.synth import synth_videos
from dcfm.devices import pick_device
from dcfm.evaluate.score import evaluate_videos
from dcfm.inference import InferenceConfig, KeyframePolicy, ReuseMode
from dcfm.synth import SynthConfig, generate_corpus, load_manifest
from dcfm.train.config import TrainJobConfig
from dcfm.train.loop import train_locally
from dcfm.train.recipe import AugmentConfig, OptimConfig


def segment_held_out(output: Path, manifest, videos, checkpoint: Path) -> None:
    """Run the segment job (local Ray) on the held-out videos and score its Parquet masks against the GT."""
    import io

    import numpy as np
    import pyarrow.dataset as pads
    from PIL import Image

    from dcfm.metrics import ConfusionMatrix
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.job import run_segment_job

    out = output / "segment"
    print(f"\n[demo] dcfm segment {' '.join(str(v.path) for v in videos)} --output {out} --checkpoint {checkpoint}")
    summary = run_segment_job(
        SegmentJobConfig(inputs=[str(v.path) for v in videos], output=str(out), checkpoint=str(checkpoint),
                         chunk_frames=16, progress_interval_s=5.0, overwrite=True)
    )
    by_path = {str(v.path.resolve()): v for v in videos}
    confusion = ConfusionMatrix(manifest.num_classes)
    frames = pads.dataset(str(out / "frames"), format="parquet", partitioning="hive")
    for row in frames.to_table(columns=["video_uri", "frame_index", "mask_png"]).to_pylist():
        video = by_path[row["video_uri"]]
        if row["frame_index"] in video.labels:
            mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])))
            confusion.update(mask, np.asarray(Image.open(video.labels[row["frame_index"]])))
    print(f"[demo] segment job: {summary.frames} frames written to {out}; mIoU of its masks against the synthetic "
          f"ground truth: {confusion.miou():.3f}")


def _split_by_hand(root: Path, train_ids: list[str], held_out_ids: list[str]) -> None:
    """Record the train / held-out split in the corpus manifest ("splits"), so training reads split "train"."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    splits = {"train": list(train_ids), "val": list(held_out_ids)}
    if data.get("splits") != splits:
        data["splits"] = splits
        path.write_text(json.dumps(data, indent=2))


def look_at(output: Path) -> None:
    """`dcfm export cvat`, `dcfm render` and `dcfm report` on the segment job's output."""
    from dcfm.labels.committed import committed_videos
    from dcfm.labels.cvat import CvatExportConfig, export_cvat
    from dcfm.labels.render import RenderConfig, render_video
    from dcfm.labels.report import ReportConfig, write_report

    segment, renders, quiet = str(output / "segment"), str(output / "renders"), lambda line: None
    print(f"\n[demo] dcfm export cvat {segment} --to {output / 'cvat'} --review 10")
    exported = export_cvat(CvatExportConfig(segment, str(output / "cvat"), review=10), log=quiet)
    video_id = committed_videos(segment)[0].video_id
    print(f"[demo] dcfm render {segment} {video_id} --to {renders}")
    result = render_video(RenderConfig(segment, video_id, renders), log=quiet)
    print(f"[demo] dcfm report {segment} --to {output / 'report.html'} --renders {renders}")
    report = write_report(ReportConfig(segment, str(output / "report.html"), renders=renders), log=quiet)
    print(f"[demo] CVAT zips:      {', '.join(e.zip_uri for e in exported)}")
    print(f"[demo] overlay video:  {result.overlay_mp4}")
    print(f"[demo] overlay still:  {result.overlay_png}")
    print(f"[demo] contact sheet:  {result.contact_sheet}")
    print(f"[demo] timeline:       {result.timeline}")
    print(f"[demo] HTML report:    {report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("demo-data"))
    parser.add_argument("--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    device = pick_device(args.device)

    t0 = time.perf_counter()
    if not (args.data / "manifest.json").exists():
        generate_corpus(args.data, SynthConfig(videos=args.videos, frames=args.frames, height=height, width=width))
    manifest = load_manifest(args.data)
    ids = [v.id for v in manifest.videos]
    train_ids, held_out_ids = ids[: -args.held_out], ids[-args.held_out :]
    _split_by_hand(args.data, train_ids, held_out_ids)
    print(f"[demo] corpus {args.data}: {len(ids)} videos x {args.frames} frames at {height}x{width} "
          f"({time.perf_counter() - t0:.1f}s); training on {len(train_ids)}, evaluating on {held_out_ids}")

    t1 = time.perf_counter()
    run = train_locally(
        TrainJobConfig(
            data=str(args.data), output=str(args.output / "train"), split="train", backbone="resnet18",
            steps=args.steps, batch_size=4, checkpoint_every=args.steps, log_every=20,
            augment=AugmentConfig(crop=(height, width), scale=(1.0, 1.5)),
            # From scratch (no pretrained weights can be downloaded here) AdamW converges far faster
            # than the official SGD recipe, which assumes an ImageNet-initialised backbone.
            optim=OptimConfig(name="adamw", lr=1e-3, decoder_lr_mult=1.0, weight_decay=1e-4, warmup_steps=5),
        ),
        device=device,
    )
    model = run.model
    print(f"[demo] trained {args.steps} steps in {time.perf_counter() - t1:.0f}s")
    digest = save_checkpoint(args.output / "checkpoint", model, run.card)
    print(f"[demo] checkpoint {args.output / 'checkpoint'} (sha256 {digest[:12]})")

    videos = synth_videos(manifest, held_out_ids)
    segment_held_out(args.output, manifest, videos, args.output / "checkpoint")

    print("\n| k | mode | mIoU | fwIoU | VC8 | label change | prev/next agree | keyframes | frames/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in (1, 2, 6):
        for mode in (ReuseMode.CAUSAL, ReuseMode.BIDIRECTIONAL):
            if k == 1 and mode is ReuseMode.BIDIRECTIONAL:
                continue  # identical to causal when every frame is a keyframe
            report = evaluate_videos(
                model, videos, InferenceConfig(keyframes=KeyframePolicy(interval=k), mode=mode), manifest.classes
            )
            agree = "-" if math.isnan(report.mean_agreement) else f"{report.mean_agreement:.3f}"
            print(
                f"| {k} | {mode.value} | {report.scores.miou:.3f} | {report.scores.fwiou:.3f} | {report.vc[8]:.3f} | "
                f"{report.label_change_rate:.3f} | {agree} | {report.keyframes}/{report.frames} | {report.fps:.1f} |"
            )
    look_at(args.output)
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s; outputs in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
