"""Command line of the evaluate job: `dcfm evaluate ...` and `python jobs/evaluate.py ...` share it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcfm.jobcli import add_reuse_arguments, defaults_of, keyframe_policy, parse_size, positive_int, run_job

EPILOG = """\
outputs (OUTPUT is local or s3://):
  OUTPUT/evaluation.json        one row per setting: mIoU, mIoU over non-keyframes, wIoU, per-class IoU, VC8,
                                VC16, ms per keyframe and per non-keyframe, FPS, keyframes per clip
  OUTPUT/evaluation.md          the same as Markdown tables (with the metric conventions)
  OUTPUT/accuracy_vs_speed.png  mIoU (and VC8) against FPS, with --sweep (or --compare): one line per mode
                                and non-key scale
  OUTPUT/masks/<setting>/<clip>/<frame>.png   the predicted masks, with --save-masks

exit status: 0 evaluated; 2 bad command line; 3 the job failed (checkpoint, data, storage)
"""


def _resolution(text: str) -> str | tuple[int, int]:
    """--resolution: "native" or HxW."""
    return "native" if text == "native" else parse_size(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `dcfm evaluate` (shared with jobs/evaluate.py)."""
    from dcfm.data import LAYOUTS
    from dcfm.evaluate.config import EvaluateJobConfig

    default = defaults_of(EvaluateJobConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint directory (local or s3://)")
    p.add_argument("--data", required=True, metavar="URI",
                   help="labelled clips, local or s3://: a dcfm synth corpus, VSPW, Cityscapes sequences or CamVid")
    p.add_argument("--output", required=True, metavar="URI", help="directory for the reports (local or s3://)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default=default("layout"),
                   help="dataset layout (default: detect)")
    p.add_argument("--split", default=default("split"),
                   help="dataset split (default %(default)s; synth corpora without splits: all)")
    p.add_argument("--videos", default=None, metavar="ID,ID", help="only these clip ids")
    add_reuse_arguments(p, default("mode"))
    p.add_argument("--sweep", action="store_true",
                   help="score k = 1, 2, 4, 6 in both modes (k = 1 once) and plot accuracy against speed")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="HxW|native",
                   help="model input size (default: the checkpoint's training size; native: the frames' own)")
    p.add_argument("--batch-size", type=positive_int, default=default("batch_size"),
                   help="frames per model batch (default %(default)s)")
    p.add_argument("--device", default=default("device"),
                   help="auto (CUDA if available), cpu or cuda (default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=default("threads"),
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--save-masks", action="store_true", help="also write every predicted mask as a PNG")
    p.add_argument("--compare", nargs="+", default=[], metavar="URI",
                   help="earlier evaluate outputs on the same clips (e.g. checkpoints trained at other "
                        "--nonkey-scale values): their rows join this run's table and plot, one line per "
                        "mode and non-key scale")


def config_from_args(args: argparse.Namespace):
    from dcfm.evaluate.config import EvaluateJobConfig

    native = args.resolution == "native"
    return EvaluateJobConfig(
        checkpoint=args.checkpoint, data=args.data, output=args.output, layout=args.layout, split=args.split,
        video_ids=[v for v in args.videos.split(",") if v] if args.videos else None,
        keyframes=keyframe_policy(args),
        mode=args.mode, nonkey_scale=args.nonkey_scale, sweep=args.sweep, resolution=None if native else args.resolution, native_resolution=native,
        batch_size=args.batch_size, device=args.device, threads=args.threads, save_masks=args.save_masks,
        compare=list(args.compare),
    )


def run(args: argparse.Namespace) -> int:
    """Run `dcfm evaluate` from parsed arguments; returns the exit status."""
    from dcfm.evaluate.job import run_evaluate_job

    return run_job("evaluate", args, config_from_args, run_evaluate_job, "rerun the same command")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description="Score a DCFM checkpoint on labelled video clips")
    add_arguments(parser)
    return run(parser.parse_args(argv))
