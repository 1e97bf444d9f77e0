"""`dcfm` command line. Each subcommand is an entry in SUBCOMMANDS: (help, add_arguments, run).

To add one, write `_add_<name>(parser)` and `_run_<name>(args) -> int` and register them in SUBCOMMANDS;
keep heavy imports inside the run function so `dcfm --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dcfm.errors import ExitCode
from dcfm.jobcli import non_negative_int, parse_size, positive_int


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output directory (created if missing)")
    p.add_argument("--videos", type=positive_int, default=8, help="number of videos (default 8)")
    p.add_argument("--frames", type=positive_int, default=60, help="frames per video (default 60)")
    p.add_argument("--size", type=parse_size, default=(128, 256), metavar="HxW", help="frame size (default 128x256)")
    p.add_argument("--labeled-every", type=positive_int, default=1, metavar="M",
                   help="label every frame (1) or frames with index %% M == M//2 (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--fps", type=positive_int, default=15, help="frame rate written to the MP4s (default 15)")
    p.add_argument("--motion", type=float, default=1.0,
                   help="how fast camera and objects move per frame, 1 = default street (range (0, 16])")
    p.add_argument("--cuts", type=non_negative_int, default=0,
                   help="scene cuts per video: jumps to an unrelated scene, where the encoder starts a new GOP "
                        "(default 0)")
    p.add_argument("--gop-seconds", type=float, default=None, metavar="S",
                   help="at most S seconds between seek points, as broadcast footage has (default: x264's 250 frames)")


def _run_synth(args: argparse.Namespace) -> int:
    from dcfm.synth import SynthConfig, generate_corpus

    height, width = args.size
    try:
        config = SynthConfig(videos=args.videos, frames=args.frames, height=height, width=width,
                             labeled_every=args.labeled_every, seed=args.seed, fps=args.fps,
                             motion=args.motion, cuts=args.cuts, gop_seconds=args.gop_seconds)
    except ValueError as e:  # option combinations argparse can't check one by one
        print(f"dcfm synth: error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    start = time.perf_counter()
    manifest = generate_corpus(args.out, config)
    print(f"wrote {config.videos} videos x {config.frames} frames at {height}x{width} "
          f"in {time.perf_counter() - start:.1f}s: {manifest}")
    return 0


def _add_segment(p: argparse.ArgumentParser) -> None:
    from dcfm.segment.cli import add_arguments

    add_arguments(p)


def _run_segment(args: argparse.Namespace) -> int:
    from dcfm.segment.cli import run

    return run(args)


def _add_train(p: argparse.ArgumentParser) -> None:
    from dcfm.train.cli import add_arguments

    add_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    from dcfm.train.cli import run

    return run(args)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    from dcfm.evaluate.cli import add_arguments

    add_arguments(p)


def _run_evaluate(args: argparse.Namespace) -> int:
    from dcfm.evaluate.cli import run

    return run(args)


def _labels(name: str) -> Callable:
    """Lazy hook into dcfm.labels.cli (export, render, report), so `dcfm --help` imports nothing heavy."""
    def call(arg: argparse.Namespace | argparse.ArgumentParser):
        from dcfm.labels import cli

        return getattr(cli, name)(arg)
    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "synth": Subcommand("generate a procedural labelled video corpus", _add_synth, _run_synth),
    "segment": Subcommand("segment every frame of a video corpus on Ray (Parquet outputs)", _add_segment, _run_segment),
    "train": Subcommand("train DCFM on symmetric frame pairs with Ray Train (checkpoints local or s3://)", _add_train, _run_train),
    "evaluate": Subcommand("score a checkpoint on labelled videos: mIoU, wIoU, VC8/16, ms per key/non-key frame", _add_evaluate, _run_evaluate),
    "export": Subcommand("export committed masks for labelling tools (cvat: Segmentation mask 1.1 zips)",
                         _labels("add_export_arguments"), _labels("run_export")),
    "render": Subcommand("overlay MP4, contact sheet and timeline of one segmented video",
                         _labels("add_render_arguments"), _labels("run_render")),
    "report": Subcommand("one self-contained HTML page about a segment output", _labels("add_report_arguments"),
                         _labels("run_report")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcfm", description="DCFM video semantic segmentation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dcfm` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
