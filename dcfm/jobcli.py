"""Command-line plumbing the jobs share: exit codes, argument types, and one error-handling wrapper,
so `dcfm segment`, `dcfm train` and `dcfm evaluate` (and their `jobs/*.py` twins) fail the same way."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum
from typing import TypeVar

ConfigT = TypeVar("ConfigT")


class ExitCode(IntEnum):
    """Process exit status of every job; documented in each job's --help."""

    OK = 0  # finished; for segment, every input committed with status ok or empty
    INPUTS_FAILED = 1  # segment only: the job finished, but some inputs failed (see errors/)
    USAGE = 2  # bad command line, or settings that contradict what --output already holds
    JOB_FAILED = 3  # the job itself failed (cluster, checkpoint, data, storage); rerunning resumes


class SettingsConflict(ValueError):
    """The command contradicts the run already recorded in its output; the fix is a new --output."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0, "a non-negative integer")


def _bounded_int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """argparse type: 'HxW' (e.g. 128x256) as (height, width); both even and >= 16 (H.264 4:2:0)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HxW, e.g. 128x256; got {text!r}")
    h, w = int(parts[0]), int(parts[1])
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"height and width must be even and >= 16 (H.264 4:2:0); got {text!r}")
    return h, w


def add_reuse_arguments(p: argparse.ArgumentParser) -> None:
    """The keyframe schedule and reuse mode options, the same for `segment` and `evaluate`."""
    p.add_argument("--keyframe-interval", "-k", type=positive_int, default=2, metavar="K",
                   help="one keyframe every K frames (default 2, the paper's)")
    p.add_argument("--mode", choices=["causal", "bidirectional"], default="bidirectional",
                   help="reuse the previous keyframe only, or sum previous and next (default)")
    p.add_argument("--adaptive", action="store_true", help="adaptive keyframe scheduling instead of a fixed K")
    p.add_argument("--codec-keyframes", action="store_true",
                   help="keyframes on the stream's own I-frames/seek points (chunks aligned to them), at least "
                        "--min-interval apart, at most --max-interval")
    p.add_argument("--min-interval", type=positive_int, default=1, help="adaptive/codec: minimum keyframe gap")
    p.add_argument("--max-interval", type=positive_int, default=6, help="adaptive/codec: maximum keyframe gap")
    p.add_argument("--threshold", type=float, default=0.1, help="adaptive: distance that triggers a keyframe")
    p.add_argument("--score", choices=["rgb", "feature"], default="rgb",
                   help="adaptive: mean |dRGB| (the authors') or shallow-feature cosine distance (TFC-style)")
    p.add_argument("--nonkey-scale", type=float, default=None, metavar="S",
                   help="non-keyframe resolution scale; only the one the checkpoint was trained for is accepted "
                        "(default: the checkpoint's, recorded in its card)")


def keyframe_policy(args: argparse.Namespace):
    """The KeyframePolicy the options of `add_reuse_arguments` describe (ValueError if they contradict)."""
    from dcfm.inference import KeyframePolicy  # keeps `dcfm --help` free of torch

    return KeyframePolicy(interval=args.keyframe_interval, adaptive=args.adaptive, min_interval=args.min_interval,
                          max_interval=args.max_interval, threshold=args.threshold, score=args.score,
                          codec=getattr(args, "codec_keyframes", False))


def run_job(
    name: str,
    args: argparse.Namespace,
    build_config: Callable[[argparse.Namespace], ConfigT],
    run: Callable[[ConfigT], object],
    resume_hint: str = "rerun the same command to resume",
) -> int:
    """Build a job's config from parsed arguments and run it, turning failures into an exit code.

    The exit code of a finished job is its summary's ``exit_code`` when it has one (segment's tells
    some-inputs-failed apart), else OK.

    Settings argparse can't check one by one (ValueError from the config) and SettingsConflict are
    usage errors; known failures (checkpoint, data, storage) print one line; anything else prints its
    traceback, since it is a bug or a cluster failure someone has to read.
    """
    from dcfm.checkpoint import CheckpointError  # keeps `dcfm --help` free of torch

    try:
        config = build_config(args)
    except ValueError as err:
        print(f"dcfm {name}: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        result = run(config)
    except SettingsConflict as err:
        print(f"dcfm {name}: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    except (CheckpointError, ValueError, FileNotFoundError, PermissionError) as err:
        print(f"dcfm {name}: job failed: {err}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    except Exception:  # e.g. Ray's TrainingFailedError, which wraps the worker's traceback
        traceback.print_exc()
        print(f"dcfm {name}: job failed; {resume_hint}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    return int(getattr(result, "exit_code", ExitCode.OK))
