"""Command line of the train job: `dcfm train ...` and `python jobs/train.py ...` share it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcfm.jobcli import add_config_options, defaults_of, parse_size, positive_int, run_job

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
    from dcfm.data import LAYOUTS
    from dcfm.train.config import TrainJobConfig as Job
    from dcfm.train.recipe import AugmentConfig, OptimConfig as Optim

    default, augment = defaults_of(Job), defaults_of(AugmentConfig)
    crop, scale = augment("crop"), augment("scale")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--data", required=True, metavar="URI",
                   help="dataset root, local or s3://: a dcfm synth corpus, Cityscapes (leftImg8bit_sequence + "
                        "gtFine), VSPW (data/<video>/origin|mask) or CamVid (<split>/ + <split>annot/ + frames/)")
    p.add_argument("--output", required=True, metavar="URI", help="run directory (local or s3://bucket/path/run)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default=default("layout"),
                   help="dataset layout (default: detect)")
    p.add_argument("--max-delta", type=positive_int, default=default("max_delta"),
                   help="draw the neighbour distance from DELTA..MAX_DELTA for every pair visit, so reuse is also "
                        "trained over the gaps k-1 frames wide that inference at interval k has (default: DELTA)")
    p.add_argument("--pretrained", action="store_true", help="ImageNet backbone weights from the timm hub")
    p.add_argument("--crop", type=parse_size, default=crop, metavar="HxW",
                   help=f"training crop (default {crop[0]}x{crop[1]})")
    p.add_argument("--scale", type=_float_pair, default=scale, metavar="MIN,MAX",
                   help=f"random scale range relative to the size that fits the crop (default {scale[0]},{scale[1]})")
    p.add_argument("--rotation", type=float, default=augment("max_rotation_deg"),
                   help="maximum rotation in degrees (default %(default)s)")
    p.add_argument("--nonkey-scale", type=float, default=default("nonkey_scale"), metavar="S",
                   help="run non-keyframes at S times the resolution (AR-Seg with DCFM; 0.5 its setting): adds the "
                        "cross-resolution fusion and the feature-similarity loss; recorded in the checkpoint "
                        "(default %(default)s: plain DCFM)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--jitter", type=float, default=augment("colour_jitter"),
                   help="colour jitter strength (default %(default)s)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="default: the official recipe (SGD for ResNet, AdamW for PVTv2)")
    # The options named after config fields; OptimConfig's None is "the recipe's value", resolved for the
    # backbone (and, for the warm-up, the run's length).
    add_config_options(p, [
        (Job, "--split", None, "dataset split (default %(default)s)"),
        (Job, "--delta", positive_int, "neighbour distance U = L ± delta (default %(default)s)"),
        (Job, "--backbone", None, "resnet18/50/101 or pvt_v2_b0..b5 (default %(default)s)"),
        (Job, "--workers", positive_int, "Ray Train workers (DDP ranks; default %(default)s)"),
        (Job, "--gpus-per-worker", float, "GPUs per worker (1 on a GPU cluster; default %(default)s)"),
        (Job, "--cpus-per-worker", float, "CPUs per worker, also its torch threads (default %(default)s)"),
        (Job, "--steps", positive_int, "optimisation steps (default %(default)s)"),
        (Job, "--batch-size", positive_int, "pairs per worker per step (default %(default)s)"),
        (Optim, "--lr", float, "encoder learning rate (default: the recipe's)"),
        (Optim, "--decoder-lr-mult", float, "decoder lr multiplier (recipe: 10 for AdamW)"),
        (Optim, "--weight-decay", float, "weight decay (default: the recipe's)"),
        (Optim, "--power", float, "poly exponent (recipe: 0.9 SGD, 1.0 AdamW)"),
        (Job, "--seed", int, "random seed (default %(default)s)"),
        (Job, "--checkpoint-every", positive_int, "steps between checkpoints (default %(default)s)"),
        (Job, "--keep-checkpoints", positive_int, "checkpoints kept (default %(default)s)"),
        (Job, "--log-every", positive_int, "steps between loss/throughput lines (default %(default)s)"),
        (Job, "--max-failures", int, "worker-group restarts before giving up (default %(default)s)"),
        (Optim, "--warmup-steps", int, "linear warm-up steps before poly decay (default: the AdamW recipe's 1500, "
                                       "at most a tenth of --steps; none for SGD)"),
    ])
    p.add_argument("--reuse-weight", type=float, default=None,
                   help="λ1, the non-keyframe CE weight (default: the paper's per dataset, 0.4; 0.2 for VSPW)")
    p.add_argument("--consistency-weight", type=float, default=None,
                   help="λ2, the consistency loss weight (default: the paper's per dataset, 10; 5 for VSPW)")
    p.add_argument("--address", default=default("ray_address"),
                   help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def config_from_args(args: argparse.Namespace):
    from dcfm.losses import LossWeights
    from dcfm.train.config import TrainJobConfig
    from dcfm.train.recipe import AugmentConfig, OptimConfig

    loss = None
    if args.reuse_weight is not None or args.consistency_weight is not None:
        if args.reuse_weight is None or args.consistency_weight is None:
            raise ValueError("give both --reuse-weight and --consistency-weight, or neither (the paper's values)")
        loss = LossWeights(args.reuse_weight, args.consistency_weight)
    return TrainJobConfig(
        data=args.data, output=args.output, layout=args.layout, split=args.split, delta=args.delta,
        max_delta=args.max_delta,
        backbone=args.backbone, pretrained_backbone=args.pretrained, nonkey_scale=args.nonkey_scale,
        steps=args.steps, batch_size=args.batch_size,
        augment=AugmentConfig(crop=args.crop, scale=args.scale, max_rotation_deg=args.rotation,
                              flip=not args.no_flip, colour_jitter=args.jitter),
        optim=OptimConfig(name=args.optimizer, lr=args.lr, decoder_lr_mult=args.decoder_lr_mult,
                          weight_decay=args.weight_decay, power=args.power, warmup_steps=args.warmup_steps),
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
