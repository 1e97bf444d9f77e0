"""Command line of the train job: `dcfm train ...` and `python jobs/train.py ...` share it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcfm.jobcli import parse_size, positive_int, run_job

EPILOG = """\
outputs (OUTPUT is local or s3://):
  OUTPUT/checkpoint_<step>/  training checkpoints: model.safetensors + dcfm.json (loadable by segment and
                             evaluate) + train_state.{json,safetensors} (optimiser, progress, loss history)
  OUTPUT/final/              the finished model (model.safetensors + dcfm.json): pass it to --checkpoint
  OUTPUT/dcfm-train.json     run record: status, settings, checkpoint URIs, loss and throughput history

Rerunning a command resumes from the latest checkpoint; a finished run trains nothing more. A worker that
dies is replaced and the run continues from the latest checkpoint (up to --max-failures times).

exit status:
  0  trained (or already finished)
  2  bad command line, or settings that differ from the run already in OUTPUT
  3  the job failed (data, cluster, storage); rerun the same command to resume
"""


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, e.g. 0.75,1.5; got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return low, high


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dcfm.datasets import LAYOUTS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--data", required=True, metavar="URI",
                   help="dataset root, local or s3://: a dcfm synth corpus, Cityscapes (leftImg8bit_sequence + "
                        "gtFine), VSPW (data/<video>/origin|mask) or CamVid (<split>/ + <split>annot/ + frames/)")
    p.add_argument("--output", required=True, metavar="URI", help="run directory (local or s3://bucket/path/run)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto", help="dataset layout (default: detect)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--delta", type=positive_int, default=1, help="neighbour distance U = L ± delta (default 1)")
    p.add_argument("--max-delta", type=positive_int, default=None,
                   help="draw the neighbour distance from DELTA..MAX_DELTA for every pair visit, so reuse is also "
                        "trained over the gaps k-1 frames wide that inference at interval k has (default: DELTA)")
    p.add_argument("--backbone", default="resnet18", help="resnet18/50/101 or pvt_v2_b0..b5 (default resnet18)")
    p.add_argument("--pretrained", action="store_true", help="ImageNet backbone weights from the timm hub")
    p.add_argument("--nonkey-scale", type=float, default=1.0, metavar="S",
                   help="run non-keyframes at S times the resolution (AR-Seg with DCFM; 0.5 its setting): adds the "
                        "cross-resolution fusion and the feature-similarity loss; recorded in the checkpoint "
                        "(default 1.0: plain DCFM)")
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (DDP ranks; default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (1 on a GPU cluster)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker, also its torch threads")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per worker per step (default 4)")
    p.add_argument("--crop", type=parse_size, default=(256, 512), metavar="HxW", help="training crop (default 256x512)")
    p.add_argument("--scale", type=_float_pair, default=(0.75, 1.5), metavar="MIN,MAX",
                   help="random scale range relative to the size that fits the crop (default 0.75,1.5)")
    p.add_argument("--rotation", type=float, default=5.0, help="maximum rotation in degrees (default 5)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--jitter", type=float, default=0.2, help="colour jitter strength (default 0.2)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="default: the official recipe (SGD for ResNet, AdamW for PVTv2)")
    p.add_argument("--lr", type=float, default=None, help="encoder learning rate (default: the recipe's)")
    p.add_argument("--decoder-lr-mult", type=float, default=None, help="decoder lr multiplier (recipe: 10 for AdamW)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the recipe's)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps before poly decay (default: the AdamW recipe's 1500, at most a "
                        "tenth of --steps; none for SGD)")
    p.add_argument("--power", type=float, default=None, help="poly exponent (recipe: 0.9 SGD, 1.0 AdamW)")
    p.add_argument("--reuse-weight", type=float, default=None,
                   help="λ1, the non-keyframe CE weight (default: the paper's per dataset, 0.4; 0.2 for VSPW)")
    p.add_argument("--consistency-weight", type=float, default=None,
                   help="λ2, the consistency loss weight (default: the paper's per dataset, 10; 5 for VSPW)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between loss/throughput lines")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up (default 3)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def config_from_args(args: argparse.Namespace):
    from dcfm.losses import LossWeights
    from dcfm.train.config import TrainJobConfig
    from dcfm.training import AugmentConfig, OptimConfig

    loss = None
    if args.reuse_weight is not None or args.consistency_weight is not None:
        if args.reuse_weight is None or args.consistency_weight is None:
            raise ValueError("give both --reuse-weight and --consistency-weight, or neither (the paper's values)")
        loss = LossWeights(args.reuse_weight, args.consistency_weight)
    warmup = args.warmup_steps
    if warmup is None:  # the official MiT recipe warms up for 1500 of 160k iterations; the ResNet one does not
        adamw = OptimConfig(name=args.optimizer).resolved(args.backbone).name == "adamw"
        warmup = min(1500, args.steps // 10) if adamw else 0
    return TrainJobConfig(
        data=args.data, output=args.output, layout=args.layout, split=args.split, delta=args.delta,
        max_delta=args.max_delta,
        backbone=args.backbone, pretrained_backbone=args.pretrained, nonkey_scale=args.nonkey_scale,
        steps=args.steps, batch_size=args.batch_size,
        augment=AugmentConfig(crop=args.crop, scale=args.scale, max_rotation_deg=args.rotation,
                              flip=not args.no_flip, colour_jitter=args.jitter),
        optim=OptimConfig(name=args.optimizer, lr=args.lr, decoder_lr_mult=args.decoder_lr_mult,
                          weight_decay=args.weight_decay, power=args.power, warmup_steps=warmup),
        loss=loss, seed=args.seed, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, max_failures=args.max_failures,
        ray_address=args.address,
    )


def run(args: argparse.Namespace) -> int:
    """Run `dcfm train` from parsed arguments; returns the exit status."""
    from dcfm.train.job import run_train_job

    return run_job("train", args, config_from_args, run_train_job,
                   "rerun the same command to resume from the latest checkpoint")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description="Train DCFM on symmetric frame pairs with Ray Train")
    add_arguments(parser)
    return run(parser.parse_args(argv))
