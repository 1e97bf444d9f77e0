"""Start-up of a no-op rerun over many committed videos: the driver's fixed cost at archive scale.

    python benchmarks/bench_driver.py [--videos 10000] [--s3]

Makes ``--videos`` tiny inputs (one 3-frame H.264 file, hard-linked under distinct names), commits every
one of them through ``OutputLayout.commit_video`` as this run id (what a finished job leaves: a videos/
row and a marker per video), then times ``run_segment_job`` on the same inputs: it lists the inputs, reads
the checkpoint card and every marker, and finds nothing to do. With ``--s3`` the outputs (and the
checkpoint) live on a local SeaweedFS (tests/s3server.py) instead of local disk; the inputs stay local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcfm.checkpoint import ModelCard, read_card, save_checkpoint  # noqa: E402
from dcfm.model import DCFM, DCFMConfig  # noqa: E402
from dcfm.segment.config import SegmentJobConfig  # noqa: E402
from dcfm.segment.job import run_segment_job  # noqa: E402
from dcfm.segment.outputs import OutputLayout  # noqa: E402
from dcfm.sources import expand_inputs  # noqa: E402
from tests.videos import write_test_video  # noqa: E402


def commit_all(config: SegmentJobConfig, checkpoint: str) -> str:
    card, digest = read_card(checkpoint)
    run_id = config.run_id(digest, tuple(card.train_size))
    layout = OutputLayout(config.output)
    items = expand_inputs(config.inputs)

    def commit(item) -> None:
        row = {
            "video_id": item.video_id, "video_uri": item.uri, "status": "ok", "error": None, "frame_count": 3,
            "fps": 25.0, "codec": "h264", "width": 48, "height": 32, "duration_s": 0.12, "chunks": 0,
            "keyframes": 2, "mean_confidence": 0.5, "mean_label_change_rate": 0.0, "mean_keyframe_agreement": None,
            "seconds": 0.0, "run_id": run_id, "model_digest": digest, "warning": None,
        }
        layout.commit_video(item.video_id, run_id, [], row, [])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(commit, items))
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--s3", action="store_true", help="outputs on a local SeaweedFS instead of local disk")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dcfm-driver-"))
    server = None
    try:
        first = write_test_video(work / "one.mp4", 3, (32, 48))
        inputs = work / "inputs"
        inputs.mkdir()
        for i in range(args.videos):
            os.link(first, inputs / f"v{i:06d}.mp4")
        config = DCFMConfig("pvt_v2_b0", num_classes=4)
        card = ModelCard(config, [f"c{i}" for i in range(4)], [(i, i, i) for i in range(4)], (32, 64))
        save_checkpoint(work / "ckpt", DCFM(config), card)
        checkpoint, output = str(work / "ckpt"), str(work / "out")
        if args.s3:
            from tests.s3server import S3Server

            server = S3Server()
            server.start()
            os.environ.update(server.env_vars())
            import boto3

            server.client().create_bucket(Bucket="bench")
            output = "s3://bench/out"
            del boto3
        job = SegmentJobConfig([str(inputs)], output, checkpoint, progress_interval_s=3600)
        start = time.perf_counter()
        run_id = commit_all(job, checkpoint)
        print(f"committed {args.videos} videos as run {run_id} in {time.perf_counter() - start:.1f}s "
              f"({'SeaweedFS' if args.s3 else 'local disk'})")
        lines: list[str] = []
        start = time.perf_counter()
        summary = run_segment_job(job, log=lines.append)
        seconds = time.perf_counter() - start
        assert summary.skipped == args.videos and summary.chunks == 0, lines
        print(f"no-op rerun over {args.videos} committed videos: {seconds:.2f}s ({lines[0]})")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
