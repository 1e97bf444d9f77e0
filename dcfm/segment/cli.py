"""Command line of the segment job: `dcfm segment ...` and `python jobs/segment.py ...` share it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dcfm.jobcli import add_reuse_arguments, defaults_of, keyframe_policy, parse_size, positive_int, run_job

EPILOG = """\
exit status:
  0  every input was segmented (or was already committed) with status ok or empty
  1  the job finished but some inputs failed; their rows are in OUTPUT/errors/ and OUTPUT/videos/
  2  bad command line, a refused input (a protocol not allowed, a folder without videos), settings that
     differ from the run already committed in OUTPUT, or another run is writing to OUTPUT (its lease names
     it; see --wait-for-lease)
  3  the job itself failed and committed nothing of the videos it was working on: the output is not
     writable or the checkpoint not readable (checked before any model work), storage, the network or the
     cluster stayed unavailable through every retry (see --retries), or this run lost its lease on OUTPUT;
     rerun the same command to resume

Failures are told apart: a bad input (cannot be opened, not a video, corrupt) is committed as failed
(exit 1); connection errors, timeouts, throttling (S3 SlowDown, HTTP 429), server errors (5xx), a full,
read-only or forbidden output, and killed actors are retried with exponential backoff (2 s doubling up to
30 s between attempts) and never become a failed row.

Rerunning a command resumes: committed videos are skipped and nothing is rewritten; of a video that was
interrupted, the chunks already staged are reused and only the missing ones computed. A commit marker
counts only while the files it lists exist; a video missing any is redone.

One run writes to an output at a time: it holds OUTPUT/_lease.json (run id, host, pid, expiry) and
renews it while it runs. A second run on the same OUTPUT exits with status 2 naming the holder, or waits
with --wait-for-lease. The lease of a run that was killed is taken over at once on the same machine, and
after it expires (--lease-ttl) from any other.

S3 credentials and endpoint come from the standard AWS chain (AWS_* environment variables, profiles,
instance roles).

Inputs may be local paths and s3:// URIs (a manifest too); other protocols only with --allow-protocols. Every
URI and message the job logs or writes (rows, errors, run manifest) is redacted: no user:password@, no query
string, no signature. A video that looks cut short (fewer frames than its container declares) is committed
ok with a note in the videos row's `warning` column.
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


def _names(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated list (``mp4,mkv`` or ``http,https``)."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dcfm.faults import RetryPolicy
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.lease import LeaseSettings

    default = defaults_of(SegmentJobConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, directories, globs, s3:// prefixes, or a manifest (.txt, or .parquet with a uri column)")
    p.add_argument("--extensions", type=_names, default=default("extensions"), metavar="EXT,EXT",
                   help="file extensions taken from directories, prefixes and globs, any case (default: "
                        + ",".join(e.lstrip(".") for e in default("extensions"))
                        + "); files named on the command line or in a manifest are always taken; the log, summary "
                          "and run manifest count the files left out")
    p.add_argument("--allow-protocols", type=_names, default=(), metavar="PROTO,PROTO",
                   help="input protocols allowed besides local paths and s3://, e.g. http,https,gs (default: none; "
                        "an input or manifest entry of another protocol is refused)")
    p.add_argument("--output", required=True, metavar="URI", help="local directory or s3:// prefix for the outputs")
    p.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint directory (local or s3://)")
    add_reuse_arguments(p, default("mode"))
    p.add_argument("--chunk-frames", type=positive_int, default=default("chunk_frames"),
                   help="frames per chunk, rounded up to a multiple of K; boundaries move to nearby seek points, "
                        "and with several actors the job's last videos end in half chunks (default %(default)s)")
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
                   help="CPUs per actor, also its torch and video decoder threads (default: with GPUs, the CPUs divided among "
                        "the GPU actors less one for probes; without, 1, or 2 from 8 CPUs up)")
    p.add_argument("--probe-concurrency", type=positive_int, default=default("probe_concurrency"), metavar="N",
                   help="videos probed at once, ahead of the actors (default %(default)s)")
    p.add_argument("--device", default=default("device"),
                   help="auto (CUDA if the actor has a GPU), cpu or cuda (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo committed videos")
    p.add_argument("--retry-failed", action="store_true", help="redo videos committed as failed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (videos, chunks, frames, actors and their resources) and stop")
    p.add_argument("--retries", type=positive_int, default=RetryPolicy().attempts, metavar="N",
                   help="attempts at each storage operation, probe and chunk before a transient failure stops "
                        "the job with exit 3 (default %(default)s: rides out about a minute's outage)")
    p.add_argument("--wait-for-lease", type=float, nargs="?", const=None, default=0.0, metavar="SECONDS",
                   help="when another run is writing to OUTPUT, wait for it to finish (up to SECONDS if given) "
                        "instead of exiting with status 2")
    p.add_argument("--lease-ttl", type=float, default=LeaseSettings.ttl_s, metavar="SECONDS",
                   help="the output's lease expires this long after its holder's last heartbeat; a run killed on "
                        "another machine blocks OUTPUT that long (default %(default)s)")
    p.add_argument("--fps-per-gpu", type=float, default=default("fps_per_gpu"), metavar="F",
                   help="with --dry-run: frames/s one GPU sustains for this model and settings (the frames/s of "
                        "benchmarks/bench_segment.py --gpus-per-actor 1); prints GPU-hours and the wall time at "
                        "the pool's max size")
    p.add_argument("--actor-start-timeout", type=float, default=default("actor_start_timeout_s"), metavar="S",
                   dest="actor_start_timeout_s",
                   help="the pool starts once its first actors (the MIN of --actors) have loaded the model; fail if "
                        "they have not after S seconds, e.g. when no node fits an actor and the autoscaler's node "
                        "types are not known (default %(default)g)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def config_from_args(args: argparse.Namespace):
    from dcfm.faults import RetryPolicy
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.segment.lease import LeaseSettings

    # Options named after their config fields carry over by name.
    same_name = ("output", "checkpoint", "mode", "nonkey_scale", "chunk_frames", "resolution", "mask_resolution",
                 "batch_size", "gpus_per_actor", "cpus_per_actor", "probe_concurrency", "device", "overwrite",
                 "retry_failed", "dry_run", "extensions", "allow_protocols", "fps_per_gpu", "actor_start_timeout_s")
    return SegmentJobConfig(
        inputs=list(args.inputs),
        keyframes=keyframe_policy(args),
        min_actors=args.actors[0] if args.actors else None,
        max_actors=args.actors[1] if args.actors else None,
        ray_address=args.address,
        retry=RetryPolicy(attempts=args.retries),
        lease=LeaseSettings(ttl_s=args.lease_ttl, wait_s=args.wait_for_lease),
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
