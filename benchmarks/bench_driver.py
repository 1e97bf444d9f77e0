"""Start-up of a no-op rerun over many committed videos: the driver's fixed cost at archive scale.

    python benchmarks/bench_driver.py [--videos 10000] [--s3] [--reruns 2] [--keep DIR [--drop-index]] [--profile FILE]

Makes ``--videos`` tiny inputs (one 3-frame H.264 file, hard-linked under distinct names) and commits every
one of them as this run id: what a finished job leaves, written directly (frame file, videos/ row, marker
built by ``OutputLayout.marker_record``; 32 writers) rather than through staging, which would only slow the
set-up. Then times ``run_segment_job`` on the same inputs ``--reruns`` times: it lists the inputs, reads the
checkpoint card, takes the lease, finds what is committed and that its files exist, and finds nothing to do.
The first rerun after the set-up finds no commit index (the set-up wrote none) and reads every marker; later
ones find the index the first wrote (on S3: on local disk listings carry no content hash and every rerun reads
the markers). With ``--s3`` the outputs live on a local SeaweedFS (tests/s3server.py) instead of local disk;
the inputs and the checkpoint stay local.

``--keep DIR`` keeps the inputs, the outputs and SeaweedFS's data in DIR and reuses a set-up of the same size
found there (the commit index a rerun wrote stays; ``--drop-index`` removes it, to time a first rerun again).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcfm import storage  # noqa: E402
from dcfm.checkpoint import ModelCard, read_card, save_checkpoint  # noqa: E402
from dcfm.model import DCFM, DCFMConfig  # noqa: E402
from dcfm.segment.config import SegmentJobConfig  # noqa: E402
from dcfm.segment.job import run_segment_job  # noqa: E402
from dcfm.schemas import output_schema  # noqa: E402
from dcfm.segment.outputs import OutputLayout, marker_bytes, parquet_bytes, table_for  # noqa: E402
from dcfm.sources import expand_inputs  # noqa: E402
from tests.videos import write_test_video  # noqa: E402


def commit_all(config: SegmentJobConfig, checkpoint: str) -> str:
    card, digest = read_card(checkpoint)
    run_id = config.run_id(digest, tuple(card.train_size))
    layout = OutputLayout(config.output)
    items = expand_inputs(config.inputs)
    frames = parquet_bytes(table_for("frames", {name: [] for name in output_schema("frames").file_schema.names}))

    def commit(item) -> None:
        row = {
            "video_id": item.video_id, "video_uri": item.uri, "status": "ok", "error": None, "frame_count": 3,
            "fps": 25.0, "codec": "h264", "width": 48, "height": 32, "duration_s": 0.12, "chunks": 1,
            "keyframes": 2, "mean_confidence": 0.5, "mean_label_change_rate": 0.0, "mean_keyframe_agreement": None,
            "seconds": 0.0, "run_id": run_id, "model_digest": digest, "warning": None,
        }
        storage.write_bytes_atomic(layout.frames_file(item.video_id, 0), frames)
        storage.write_bytes_atomic(storage.join(layout.videos_dir(item.video_id), "part-0.parquet"),
                                   parquet_bytes(table_for("videos", {k: [v] for k, v in row.items()})))
        marker = layout.marker_record(item.video_id, run_id, [0], row)
        storage.write_bytes_atomic(layout.marker(item.video_id), marker_bytes(marker))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(commit, items))
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--s3", action="store_true", help="outputs on a local SeaweedFS instead of local disk")
    parser.add_argument("--reruns", type=int, default=2, help="no-op reruns to time, one after the other")
    parser.add_argument("--keep", type=Path, help="keep inputs, outputs and SeaweedFS data here; reuse a set-up found there")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of the reruns here")
    parser.add_argument("--drop-index", action="store_true",
                        help="remove the commit index a kept set-up holds, so the first rerun reads every marker")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="dcfm-driver-"))
    work.mkdir(parents=True, exist_ok=True)
    setup = {"videos": args.videos, "s3": args.s3}
    reuse = (work / "setup.json").exists() and json.loads((work / "setup.json").read_text()) == setup
    server = None
    try:
        inputs = work / "inputs"
        if not reuse:
            (work / "setup.json").unlink(missing_ok=True)
            for old in ("inputs", "out", "weed"):
                shutil.rmtree(work / old, ignore_errors=True)
            first = write_test_video(work / "one.mp4", 3, (32, 48))
            inputs.mkdir()
            for i in range(args.videos):
                os.link(first, inputs / f"v{i:06d}.mp4")
            config = DCFMConfig("pvt_v2_b0", num_classes=4)
            card = ModelCard(config, [f"c{i}" for i in range(4)], [(i, i, i) for i in range(4)], (32, 64))
            save_checkpoint(work / "ckpt", DCFM(config), card)
        checkpoint, output = str(work / "ckpt"), str(work / "out")
        if args.s3:
            from tests.s3server import S3Server

            server = S3Server(base_dir=work / "weed")
            server.start()
            os.environ.update(server.env_vars())
            if not reuse:
                server.client().create_bucket(Bucket="bench")
            output = "s3://bench/out"
        job = SegmentJobConfig([str(inputs)], output, checkpoint, progress_interval_s=3600)
        where = "SeaweedFS" if args.s3 else "local disk"
        if reuse:
            print(f"reusing the set-up of {args.videos} committed videos in {work} ({where})")
        else:
            start = time.perf_counter()
            run_id = commit_all(job, checkpoint)
            (work / "setup.json").write_text(json.dumps(setup))
            print(f"committed {args.videos} videos as run {run_id} in {time.perf_counter() - start:.1f}s ({where})")
        index = OutputLayout(output).commit_index()
        if args.drop_index and storage.exists(index):
            fs, path = storage.filesystem(index)
            fs.rm(path)
        profiler = cProfile.Profile() if args.profile else None
        for attempt in range(args.reruns):
            lines: list[str] = []
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            summary = run_segment_job(job, log=lines.append)
            if profiler:
                profiler.disable()
            seconds = time.perf_counter() - start
            assert summary.skipped == args.videos and summary.chunks == 0, lines
            print(f"no-op rerun {attempt + 1} over {args.videos} committed videos: {seconds:.2f}s ({where}; "
                  f"{len(lines)} log lines, first: {lines[0]})")
        if profiler:
            profiler.dump_stats(args.profile)
    finally:
        if server is not None:
            server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
