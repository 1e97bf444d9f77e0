"""Training benchmark: DCFM's symmetric-pair training against per-frame training, and training throughput.

    python benchmarks/bench_train.py --minutes 12 --size 64x128 --motion 4 --held-out 6  # BENCHMARKS.md: ~42 min
    python benchmarks/bench_train.py --minutes 0.5 --videos 3 --held-out 1 --frames 12 --size 64x128 \\
        --throughput-steps 4                                                       # a smoke run: ~3 min

1. Generates a synthetic training corpus and a held-out one (other seed), every frame labelled.
2. Throughput: `dcfm train` on the local Ray with 1 worker (all CPUs) and with 2 workers (half each),
   ``--throughput-steps`` steps each, checkpointing only at the end; pairs/s is the mean over the logged
   intervals after the first (which includes warm-up).
3. Trains the same ResNet-18 DCFM for the same number of steps, as many as the faster setting of step 2
   fits into ``--minutes``, once per ``--models`` entry:
     dcfm            the joint loss (λ1 = 0.4, λ2 = 10, the paper's Cityscapes/CamVid values), pairs at δ = 1
                     (the official configs);
     dcfm-delta1-5   the joint loss, the neighbour distance drawn from 1..5 per pair (`--max-delta 5`), so
                     reuse is trained over the gaps k = 6 has at inference;
     per-frame       LossWeights(0, 0): no reuse CE, no consistency loss.
   From scratch (no pretrained weights can be downloaded here), so AdamW lr 1e-3 with warm-up, as `make demo`.
4. Evaluates each on the held-out corpus at k = 1, 2, 4, 6, causal and bidirectional (`dcfm evaluate
   --sweep`) and prints mIoU, mIoU over non-keyframes, VC8 and FPS; everything also goes to
   WORK/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dcfm.devices import describe_host
from dcfm.evaluate.config import EvaluateJobConfig
from dcfm.evaluate.job import run_evaluate_job
from dcfm.losses import LossWeights
from dcfm.synth import SynthConfig, generate_corpus
from dcfm.train.config import TrainJobConfig
from dcfm.train.job import run_train_job
from dcfm.train.recipe import AugmentConfig, OptimConfig


def corpus(path: Path, videos: int, frames: int, size: tuple[int, int], seed: int, motion: float) -> Path:
    if not (path / "manifest.json").exists():
        generate_corpus(path, SynthConfig(videos=videos, frames=frames, height=size[0], width=size[1], seed=seed,
                                          motion=motion))
    return path


MODELS = {  # name -> (loss weights, max_delta, non-key scale); every model draws the neighbour's sign per visit
    "dcfm": (LossWeights(0.4, 10.0), None, 1.0),
    "dcfm-delta1-5": (LossWeights(0.4, 10.0), 5, 1.0),
    "per-frame": (LossWeights(0.0, 0.0), None, 1.0),
    "dcfm-s0.5": (LossWeights(0.4, 10.0, similarity=10.0), None, 0.5),  # AR-Seg: non-keyframes at half size
    # Variants of the half-size model (BENCHMARKS.md, issue 11): a 10x stronger FST term; the neighbour drawn
    # 1..5 frames away, so the low-resolution branch is trained on the gaps k = 6 has at inference.
    "dcfm-s0.5-sim100": (LossWeights(0.4, 10.0, similarity=100.0), None, 0.5),
    "dcfm-s0.5-delta1-5": (LossWeights(0.4, 10.0, similarity=10.0), 5, 0.5),
}


def train(args, data: Path, output: Path, steps: int, workers: int, loss: LossWeights | None,
          checkpoints: int = 4, max_delta: int | None = None, nonkey_scale: float = 1.0) -> dict:
    """Train with `dcfm train`'s job; pairs/s is the mean of the logged intervals after the first (warm-up)."""
    cpus = max(1, (os.cpu_count() or 2) // workers)
    config = TrainJobConfig(
        data=str(data), output=str(output), backbone=args.backbone, steps=steps, batch_size=args.batch_size,
        augment=AugmentConfig(crop=args.size, scale=(1.0, 1.5)),
        optim=OptimConfig(name="adamw", lr=1e-3, decoder_lr_mult=1.0, weight_decay=1e-4,
                          warmup_steps=max(1, steps // 20)),
        loss=loss, max_delta=max_delta, nonkey_scale=nonkey_scale, workers=workers, cpus_per_worker=cpus,
        checkpoint_every=max(steps // checkpoints, 1), log_every=max(1, steps // 20),
    )
    start = time.perf_counter()
    summary = run_train_job(config, log=lambda line: print(line, flush=True))
    rates = [row["pairs_per_s"] for row in summary.history[1:]] or [summary.history[-1]["pairs_per_s"]]
    return {"output": str(output), "final_checkpoint": summary.final_checkpoint, "steps": steps,
            "workers": workers, "cpus_per_worker": cpus, "seconds": time.perf_counter() - start,
            "pairs_per_s": sum(rates) / len(rates), "final_loss": summary.history[-1]["loss"]}


def evaluate(checkpoint: str, data: Path, output: Path, compare: list[str]) -> list[dict]:
    """The sweep of one model; ``compare``: earlier models' evaluations, drawn in this one's table and plot."""
    summary = run_evaluate_job(EvaluateJobConfig(checkpoint, str(data), str(output), sweep=True, batch_size=8,
                                                 compare=compare), log=lambda line: None)
    return summary.rows


def print_gains(rows: dict[str, list[dict]]) -> None:
    """mIoU over non-keyframes of each joint-loss model minus the per-frame model's, setting by setting."""
    others = [name for name in rows if name != "per-frame"]
    baseline = {r["setting"]: r for r in rows["per-frame"]}
    print("\nNon-keyframe mIoU gain over per-frame training (and the gain at k = 1, for scale):\n")
    print("| k | mode | " + " | ".join(others) + " |\n|---|---|" + "---|" * len(others))
    for r in rows["per-frame"]:
        key = "miou" if r["keyframe_interval"] == 1 else "miou_non_key"
        gains = []
        for name in others:
            mine = next(x for x in rows[name] if x["setting"] == r["setting"])
            gains.append(f"{mine[key] - baseline[r['setting']][key]:+.3f}")
        print(f"| {r['keyframe_interval']} | {r['mode']} | " + " | ".join(gains) + " |")


def main(argv: list[str] | None = None) -> int:
    from dcfm.jobcli import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per model (default 15)")
    parser.add_argument("--work", type=Path, default=Path("bench-train-work"), help="corpora, runs and results")
    parser.add_argument("--videos", type=int, default=12, help="training videos (default 12)")
    parser.add_argument("--held-out", type=int, default=3, help="held-out videos (default 3)")
    parser.add_argument("--frames", type=int, default=40, help="frames per video (default 40)")
    parser.add_argument("--motion", type=float, default=2.5,
                        help="synth world speed, 1 = the default street (default 2.5: at k = 6 and 128x256 objects move 6-33 px "
                             "between keyframe and frame, 10th-90th percentile, so reuse has something to get wrong)")
    parser.add_argument("--size", type=parse_size, default=(128, 256), help="frame and crop size (default 128x256)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per worker per step (default 4)")
    parser.add_argument("--throughput-steps", type=int, default=20, help="steps of each throughput run")
    parser.add_argument("--models", default="dcfm,dcfm-delta1-5,per-frame",
                        help=f"models to train, of {list(MODELS)} (default: the first three)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train every model this many steps on 1 worker (skips the throughput runs and --minutes)")
    args = parser.parse_args(argv)
    print(f"host: {describe_host()}", flush=True)

    import ray

    work = args.work.resolve()
    tag = f"{args.backbone}-{args.size[0]}x{args.size[1]}-{args.videos}v{args.frames}f-{args.minutes:g}min"
    world = f"{args.frames}f-{args.size[0]}x{args.size[1]}-motion{args.motion:g}"
    train_data = corpus(work / f"train-{args.videos}v{world}", args.videos, args.frames, args.size, seed=0,
                        motion=args.motion)
    held_out = corpus(work / f"held-out-{args.held_out}v{world}", args.held_out, args.frames, args.size, seed=1000,
                      motion=args.motion)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}

    if args.steps is None:
        # One checkpoint at the end only: writing checkpoints is not what this measures.
        throughput = {w: train(args, train_data, work / f"throughput-{stamp}-{w}w", args.throughput_steps, w, None,
                               checkpoints=1) for w in (1, 2)}
        best = max(throughput, key=lambda w: throughput[w]["pairs_per_s"])
        pairs_per_step = best * args.batch_size
        # 92% of the budget for the steps themselves: Ray's start and the checkpoints take the rest.
        steps = max(2, int(0.92 * args.minutes * 60 * throughput[best]["pairs_per_s"] / pairs_per_step))
        print(f"[bench] {best} worker(s) train fastest; {steps} steps of {pairs_per_step} pairs fit "
              f"{args.minutes:g} min", flush=True)
    else:
        throughput, best, steps = {}, 1, args.steps
        tag = f"{args.backbone}-{args.size[0]}x{args.size[1]}-{args.videos}v{args.frames}f-{steps}steps"
    results["throughput"] = throughput

    runs, rows, evaluations = {}, {}, []
    for name in args.models.split(","):
        weights, max_delta, scale = MODELS[name]
        output = work / f"{name}-{tag}-{stamp}"
        runs[name] = train(args, train_data, output, steps, best, weights, max_delta=max_delta, nonkey_scale=scale)
        evaluation = work / f"eval-{name}-{tag}-{stamp}"
        # The last model's accuracy_vs_speed.png draws every model (one line per mode and non-key scale).
        rows[name] = evaluate(runs[name]["final_checkpoint"], held_out, evaluation, list(evaluations))
        evaluations.append(str(evaluation))
    results.update(training=runs, evaluation=rows)
    (work / "bench_train.json").write_text(json.dumps(results, indent=2))

    print(f"\nTraining throughput ({args.backbone}, {args.size[0]}x{args.size[1]} crops, {args.batch_size} pairs per "
          f"worker per step, {os.cpu_count()} CPUs):\n")
    print("| workers | CPUs per worker | pairs/s |\n|---|---|---|")
    for w, r in throughput.items():
        print(f"| {w} | {r['cpus_per_worker']} | {r['pairs_per_s']:.2f} |")
    durations = ", ".join(f"{n}: {r['seconds'] / 60:.1f} min" for n, r in runs.items())
    print(f"\nAccuracy on {args.held_out} held-out videos x {args.frames} frames after {steps} steps "
          f"({durations}):\n")
    print("| training | k | mode | mIoU | mIoU non-key | VC8 | FPS |\n|---|---|---|---|---|---|---|")
    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name, table in rows.items():
        for r in table:
            print(f"| {name} | {r['keyframe_interval']} | {r['mode']} | {fmt(r['miou'])} | {fmt(r['miou_non_key'])} | "
                  f"{fmt(r['vc8'])} | {fmt(r['fps'], 1)} |")
    if "per-frame" in rows:
        print_gains(rows)
    print(f"\n[bench] results in {work / 'bench_train.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
