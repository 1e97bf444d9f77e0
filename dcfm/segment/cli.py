"""Command line of the segment job: `dcfm segment ...` and `python jobs/segment.py ...` share it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcfm.jobcli import add_reuse_arguments, defaults_of, keyframe_policy, parse_size, positive_int, run_job

EPILOG = """\
exit status:
  0  every input was segmented (or was already committed) with status ok or empty
  1  the job finished but some inputs failed; their rows are in OUTPUT/errors/ and OUTPUT/videos/
  2  bad command line, or settings that differ from the run already committed in OUTPUT
  3  the job itself failed (cluster, checkpoint, output not writable); rerun the same command to resume

Rerunning a command resumes: committed videos are skipped and nothing is rewritten; of a video that was
interrupted, the chunks already staged are reused and only the missing ones computed. S3 credentials and
endpoint come from the standard AWS chain (AWS_* environment variables, profiles, instance roles).
"""


def _actors(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors takes MIN or MIN,MAX, got {text!r}") from None
    if len(values) not in (1, 2) or not 1 <= values[0] <= values[-1]:
        raise argparse.ArgumentTypeError(f"--actors takes MIN or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[-1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dcfm.segment.config import SegmentJobConfig

    default = defaults_of(SegmentJobConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, directories, globs, s3:// prefixes, or a manifest (.txt, or .parquet with a uri column)")
    p.add_argument("--output", required=True, metavar="URI", help="local directory or s3:// prefix for the outputs")
    p.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint directory (local or s3://)")
    add_reuse_arguments(p, default("mode"))
    p.add_argument("--chunk-frames", type=positive_int, default=default("chunk_frames"),
                   help="frames per chunk, rounded up to a multiple of K (default %(default)s)")
    p.add_argument("--resolution", type=parse_size, metavar="HxW",
                   help="resolution the model runs at (default: the checkpoint's training size)")
    p.add_argument("--mask-resolution", choices=["source", "model"], default=default("mask_resolution"),
                   help="write masks at the video's resolution (source) or the model's (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=default("batch_size"),
                   help="frames per model batch within a chunk (default %(default)s)")
    p.add_argument("--actors", type=_actors, default=None, metavar="MIN[,MAX]",
                   help="actor pool size; autoscales between MIN and MAX (default: what the cluster holds: "
                        "one per GPU, or CPUs / --cpus-per-actor without GPUs)")
    p.add_argument("--gpus-per-actor", type=float, default=default("gpus_per_actor"),
                   help="GPUs per actor (default 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=float, default=default("cpus_per_actor"),
                   help="CPUs per actor, also its torch threads (default: with GPUs, the CPUs divided among "
                        "the GPU actors less one for probes; without, 1, or 2 from 8 CPUs up)")
    p.add_argument("--probe-concurrency", type=positive_int, default=default("probe_concurrency"), metavar="N",
                   help="videos probed at once, ahead of the actors (default %(default)s)")
    p.add_argument("--device", default=default("device"),
                   help="auto (CUDA if the actor has a GPU), cpu or cuda (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo committed videos")
    p.add_argument("--retry-failed", action="store_true", help="redo videos committed as failed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (videos, chunks, frames, actors and their resources) and stop")
    p.add_argument("--fps-per-gpu", type=float, default=default("fps_per_gpu"), metavar="F",
                   help="with --dry-run: frames/s one GPU sustains for this model and settings (the frames/s of "
                        "benchmarks/bench_segment.py --gpus-per-actor 1); prints GPU-hours and the wall time at "
                        "the pool's max size")
    p.add_argument("--actor-start-timeout", type=float, default=default("actor_start_timeout_s"), metavar="S",
                   dest="actor_start_timeout_s",
                   help="when no node fits an actor yet and the autoscaler's node types are not known, fail if "
                        "the first actors have not started after S seconds (default %(default)g)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def config_from_args(args: argparse.Namespace):
    from dcfm.segment.config import SegmentJobConfig

    # Options named after their config fields carry over by name.
    same_name = ("output", "checkpoint", "mode", "nonkey_scale", "chunk_frames", "resolution", "mask_resolution",
                 "batch_size", "gpus_per_actor", "cpus_per_actor", "probe_concurrency", "device", "overwrite",
                 "retry_failed", "dry_run", "fps_per_gpu", "actor_start_timeout_s")
    return SegmentJobConfig(
        inputs=list(args.inputs),
        keyframes=keyframe_policy(args),
        min_actors=args.actors[0] if args.actors else None,
        max_actors=args.actors[1] if args.actors else None,
        ray_address=args.address,
        **{name: getattr(args, name) for name in same_name},
    )


def run(args: argparse.Namespace) -> int:
    """Run `dcfm segment` from parsed arguments; returns the exit status EPILOG documents."""
    from dcfm.segment.job import run_segment_job

    return run_job("segment", args, config_from_args, run_segment_job)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segment", description="Segment every frame of a video corpus with DCFM")
    add_arguments(parser)
    return run(parser.parse_args(argv))
