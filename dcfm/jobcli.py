"""Command-line plumbing the jobs share: argument types, config defaults for argparse, and one
error-handling wrapper, so `dcfm segment`, `dcfm train` and `dcfm evaluate` (and their `jobs/*.py` twins)
fail the same way (exit codes: dcfm.errors)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import traceback
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

from dcfm.errors import ConfigError, ExitCode, InputError, JobFailure, SettingsConflict

ConfigT = TypeVar("ConfigT")


def config_default(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config`` (an enum's as its command-line spelling).
    The configs are the one place defaults are written; argparse takes them from here, and help texts show
    them with ``%(default)s``."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise ValueError(f"{config.__name__}.{name} has no default")
            return value.value if isinstance(value, Enum) else value
    raise ValueError(f"{config.__name__} has no field {name!r}")


def defaults_of(config: type) -> Callable[[str], Any]:
    """``config_default`` bound to one config class: ``default = defaults_of(JobConfig); default("steps")``."""
    return functools.partial(config_default, config)


def add_config_options(p: argparse.ArgumentParser,
                       options: Sequence[tuple[type, str, Callable[[str], Any] | None, str]]) -> None:
    """Options named after config fields (``--chunk-frames`` sets ``chunk_frames``), each defaulting to its
    field's default: ``options`` are (config class, flag, argparse type, help)."""
    for config, flag, kind, text in options:
        p.add_argument(flag, type=kind, default=config_default(config, flag[2:].replace("-", "_")), help=text)


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


def add_reuse_arguments(p: argparse.ArgumentParser, mode_default: str) -> None:
    """The keyframe schedule and reuse mode options, the same for `segment` and `evaluate`."""
    from dcfm.inference import KeyframePolicy

    default = defaults_of(KeyframePolicy)
    p.add_argument("--keyframe-interval", "-k", type=positive_int, default=default("interval"), metavar="K",
                   help="one keyframe every K frames (default %(default)s, the paper's)")
    p.add_argument("--mode", choices=["causal", "bidirectional"], default=mode_default,
                   help="reuse the previous keyframe only, or sum previous and next (default %(default)s)")
    p.add_argument("--adaptive", action="store_true", help="adaptive keyframe scheduling instead of a fixed K")
    p.add_argument("--codec-keyframes", action="store_true",
                   help="keyframes on the stream's own I-frames/seek points (chunks aligned to them), at least "
                        "--min-interval apart, at most --max-interval")
    add_config_options(p, [
        (KeyframePolicy, "--min-interval", positive_int, "adaptive/codec: minimum keyframe gap"),
        (KeyframePolicy, "--max-interval", positive_int, "adaptive/codec: maximum keyframe gap"),
        (KeyframePolicy, "--threshold", float, "adaptive: distance that triggers a keyframe"),
    ])
    p.add_argument("--score", choices=["rgb", "feature"], default=default("score"),
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
    usage errors; known failures (checkpoint, data, storage, ``JobFailure``) print one line; anything else prints its
    traceback, since it is a bug or a cluster failure someone has to read.
    """
    from dcfm.checkpoint import CheckpointError  # keeps `dcfm --help` free of torch
    from dcfm.storage import redact  # messages name inputs: no credentials or signatures on the terminal

    try:
        config = build_config(args)
    except ConfigError as err:
        print(f"dcfm {name}: error: {err.for_command_line()}", file=sys.stderr)
        return ExitCode.USAGE
    except ValueError as err:
        print(f"dcfm {name}: error: {redact(str(err))}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        result = run(config)
    except ConfigError as err:  # a setting only the job can check (e.g. against what is stored)
        print(f"dcfm {name}: error: {redact(err.for_command_line())}", file=sys.stderr)
        return ExitCode.USAGE
    except (SettingsConflict, InputError) as err:
        print(f"dcfm {name}: error: {redact(str(err))}", file=sys.stderr)
        return ExitCode.USAGE
    except JobFailure as err:  # storage, output or cluster: the message names it and the fix
        print(f"dcfm {name}: job failed: {redact(str(err))}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    except (CheckpointError, ValueError, FileNotFoundError, PermissionError) as err:
        print(f"dcfm {name}: job failed: {redact(str(err))}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    except Exception:  # e.g. Ray's TrainingFailedError, which wraps the worker's traceback
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(f"dcfm {name}: job failed; {resume_hint}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    return int(getattr(result, "exit_code", ExitCode.OK))
