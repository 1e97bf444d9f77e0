"""Whole-job throughput of `dcfm segment` vs a plain single-process loop, and actor memory vs video length.

    python benchmarks/bench_segment.py [--videos 4 --frames 480 --size 128x256 --long-frames 5000]
    python benchmarks/bench_segment.py --frames 360 --actors 1 --intervals 6 --nonkey-scales 1.0,0.5 \
        --skip-plain --skip-memory      # non-keyframes at full vs half resolution (AR-Seg), k = 6

1. Throughput: one synthetic corpus, one ResNet-18 DCFM (random weights: speed does not depend on them).
   * plain loop: PyAV sequential decode + resize + model keyframe path on every frame (k = 1) in batches +
     argmax at source resolution, one process, no Ray, nothing written;
   * the job on local Ray for k = 1, 2, 6 (bidirectional), ``--actors`` actors sharing the 2 CPUs,
     everything included: planning, probing, actor start and model load, decode, PNG masks, Parquet,
     commits. Reported as frames / wall seconds of `run_segment_job`, with where the actors' time went
     (the job's own accounting: model, waiting on decode, masks and metrics, Parquet writes) and how
     long until the first actor had its model loaded (the fixed start-up cost).
2. Memory: peak RSS of the (single) actor on a short video and on a long one (>= 5000 frames), each in a
   fresh Ray session, chunk 256 frames.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcfm.devices import describe_host
from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.inference import KeyframePolicy
from dcfm.model import DCFM, IMAGENET_MEAN, IMAGENET_STD, DCFMConfig, upsample_logits
from dcfm.segment.config import SegmentJobConfig
from dcfm.segment.job import run_segment_job
from dcfm.synth import SynthConfig, generate_corpus


def plain_loop(videos: list[Path], model: DCFM, size: tuple[int, int], batch: int) -> tuple[int, float]:
    """Decode, resize, segment every frame as a keyframe, argmax at source size; returns (frames, seconds)."""
    import av

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    frames = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for path in videos:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                source = (stream.height, stream.width)
                pending: list[np.ndarray] = []
                decoded = (f.to_ndarray(width=size[1], height=size[0], format="rgb24") for f in container.decode(stream))
                for rgb in decoded:
                    pending.append(rgb)
                    if len(pending) == batch:
                        frames += _segment(model, pending, mean, std, source)
                        pending = []
                if pending:
                    frames += _segment(model, pending, mean, std, source)
    return frames, time.perf_counter() - start


def _segment(model, frames, mean, std, source) -> int:
    x = (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() - mean) / std
    logits = model.forward_keyframe(x).logits
    for one in logits:
        upsample_logits(one[None], source)[0].argmax(0)
    return len(frames)


def run_job(videos, out: Path, checkpoint: str, k: int, actors: int, chunk: int, fresh_ray: bool,
            batch: int = 8) -> dict:
    import ray

    if fresh_ray and ray.is_initialized():
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    shutil.rmtree(out, ignore_errors=True)
    config = SegmentJobConfig(
        [str(v) for v in videos], str(out), checkpoint, keyframes=KeyframePolicy(interval=k), chunk_frames=chunk,
        min_actors=actors, max_actors=actors, cpus_per_actor=2 / actors, progress_interval_s=3600, batch_size=batch,
    )
    start = time.perf_counter()
    summary = run_segment_job(config, log=lambda _: None)
    seconds = time.perf_counter() - start
    return {"frames": summary.frames, "seconds": seconds, "rss": summary.peak_actor_rss_mb,
            "startup_s": summary.startup_s, "actor_s": summary.actor_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=480)
    parser.add_argument("--actors", default="1,2", help="actor counts to run, comma-separated (default 1,2)")
    parser.add_argument("--chunk", type=int, default=128, help="chunk frames of the throughput runs (default 128)")
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--long-frames", type=int, default=5000)
    parser.add_argument("--long-size", default="64x128")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--intervals", default="1,2,6", help="keyframe intervals of the job runs (default 1,2,6)")
    parser.add_argument("--nonkey-scales", default="1.0",
                        help="non-keyframe resolution scales, one model each (random weights; default 1.0)")
    parser.add_argument("--skip-plain", action="store_true", help="no plain-loop baseline")
    parser.add_argument("--skip-memory", action="store_true", help="no actor-memory runs")
    args = parser.parse_args()
    print(f"host: {describe_host()}", flush=True)
    h, w = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="dcfm-bench-"))
    torch.manual_seed(0)
    generate_corpus(work / "corpus", SynthConfig(videos=args.videos, frames=args.frames, height=h, width=w))
    videos = sorted((work / "corpus" / "videos").glob("*.mp4"))
    scales = [float(v) for v in args.nonkey_scales.split(",")]
    for scale in scales:
        config = DCFMConfig(args.backbone, num_classes=8, nonkey_scale=scale)
        model = DCFM(config).eval()
        card = ModelCard(config, [f"c{i}" for i in range(8)], [(i, i, i) for i in range(8)], train_size=(h, w))
        save_checkpoint(work / f"ckpt-{scale:g}", model, card)
    print(f"corpus: {args.videos} videos x {args.frames} frames at {h}x{w}; {args.backbone}; torch threads "
          f"{torch.get_num_threads()}; 2 CPU cores")

    torch.set_num_threads(2)
    print("\n| pipeline | non-key scale | k | actors x threads | frames | seconds | frames/s | start-up s "
          "| actor time: model / decode wait / masks+metrics / Parquet |")
    print("|---|---|---|---|---|---|---|---|---|")
    if not args.skip_plain:
        frames, seconds = plain_loop(videos, model, (h, w), args.batch)
        print(f"| plain loop (decode + model, no Ray, no output) | - | 1 | 1 x 2 | {frames} | {seconds:.1f} | "
              f"{frames / seconds:.1f} | | |")
    for k in (int(v) for v in args.intervals.split(",")):
        for scale in scales:
            for actors in (int(a) for a in args.actors.split(",")):
                r = run_job(videos, work / "out", str(work / f"ckpt-{scale:g}"), k, actors, chunk=args.chunk,
                            fresh_ray=False, batch=args.batch)
                t = r["actor_s"]
                split = " / ".join(f"{100 * t[stage] / t['seconds']:.0f}%" for stage in
                                   ("model_s", "decode_wait_s", "rows_s", "write_s"))
                print(f"| dcfm segment (local Ray, Parquet) | {scale:g} | {k} | {actors} x {2 // actors} | "
                      f"{r['frames']} | {r['seconds']:.1f} | {r['frames'] / r['seconds']:.1f} | "
                      f"{r['startup_s']:.1f} | {split} |", flush=True)
    if args.skip_memory:
        shutil.rmtree(work, ignore_errors=True)
        return

    lh, lw = (int(v) for v in args.long_size.split("x"))
    print(f"\nactor memory (k = 6, chunk 256, {lh}x{lw}, fresh Ray session each):")
    print("| video | frames | peak actor RSS MiB | seconds |")
    print("|---|---|---|---|")
    long_model = work / "ckpt-long"
    save_checkpoint(long_model, model, ModelCard(config, card.class_names, card.palette, train_size=(lh, lw)))
    for name, n in (("short", 100), ("long", args.long_frames)):
        generate_corpus(work / name, SynthConfig(videos=1, frames=n, height=lh, width=lw, seed=7))
        video = sorted((work / name / "videos").glob("*.mp4"))
        r = run_job(video, work / f"out-{name}", str(long_model), 6, 1, chunk=256, fresh_ray=True)
        print(f"| {name} | {r['frames']} | {r['rss']:.0f} | {r['seconds']:.1f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
