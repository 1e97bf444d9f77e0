"""Codec-aware keyframes vs a fixed interval on footage with scene cuts.

    python benchmarks/bench_codec.py --checkpoint RUN/final [--videos 6 --frames 40 --size 64x128 --motion 4 \\
        --cuts 2 --seed 1000]

Generates a held-out synth corpus whose videos jump to an unrelated scene ``--cuts`` times each (every frame
labelled; the encoder starts a GOP at each cut, so the stream's seek points are frame 0 and the cuts), then
scores the checkpoint with `dcfm evaluate`'s machinery under fixed intervals and under codec keyframes (the
stream's seek points, at least MIN and at most MAX frames apart), causal and bidirectional, and prints mIoU,
mIoU over non-keyframes and the keyframe count of each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcfm.evaluate.config import EvaluateJobConfig
from dcfm.evaluate.job import run_evaluate_job
from dcfm.inference import KeyframePolicy, ReuseMode
from dcfm.jobcli import parse_size
from dcfm.synth import SynthConfig, generate_corpus

POLICIES = {  # name -> keyframe policy
    "fixed k=6": KeyframePolicy(interval=6),
    "fixed k=4": KeyframePolicy(interval=4),
    "codec, max 6": KeyframePolicy(codec=True, min_interval=1, max_interval=6),
    "codec, min 3 max 6": KeyframePolicy(codec=True, min_interval=3, max_interval=6),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--work", type=Path, default=Path("bench-codec-work"))
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", type=parse_size, default=(64, 128))
    parser.add_argument("--motion", type=float, default=4.0)
    parser.add_argument("--cuts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args(argv)
    data = args.work / f"cuts{args.cuts}-{args.videos}v{args.frames}f-{args.size[0]}x{args.size[1]}-m{args.motion:g}"
    if not (data / "manifest.json").exists():
        generate_corpus(data, SynthConfig(videos=args.videos, frames=args.frames, height=args.size[0],
                                          width=args.size[1], seed=args.seed, motion=args.motion, cuts=args.cuts))
    print(f"{args.videos} videos x {args.frames} frames at {args.size[0]}x{args.size[1]}, motion {args.motion:g}, "
          f"{args.cuts} cuts each; checkpoint {args.checkpoint}\n")
    print("| keyframes | mode | mIoU | mIoU non-key | keyframes/frames |\n|---|---|---|---|---|")
    for name, policy in POLICIES.items():
        for mode in (ReuseMode.CAUSAL, ReuseMode.BIDIRECTIONAL):
            out = args.work / "eval" / f"{name.replace(' ', '_').replace(',', '')}-{mode.value}"
            (row,) = run_evaluate_job(EvaluateJobConfig(args.checkpoint, str(data), str(out), keyframes=policy,
                                                        mode=mode), log=lambda _: None).rows
            print(f"| {name} | {mode.value} | {row['miou']:.3f} | {row['miou_non_key']:.3f} | "
                  f"{row['keyframes']}/{row['frames']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
