"""Memory and speed of `dcfm export cvat` and `dcfm render` against video length.

    python benchmarks/bench_labels.py [--short 200 --long 5000 --size 360x640]

Makes a synthetic video of each length (dcfm synth, every frame labelled) and commits its label maps as the
masks of a segment output (the exact rows, files and marker the job writes; no model has to run for 5,000
frames), then runs each command in a fresh process and prints its wall time and its resident memory before
and at the peak while it ran. Memory that does not grow from the short to the long video is what streaming
promises. frames/s is frames of the video over seconds (`--review 50` encodes 50 of them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dcfm import storage
from dcfm.checkpoint import ModelCard, save_checkpoint
from dcfm.model import DCFM, DCFMConfig
from dcfm.schemas import output_schema
from dcfm.segment.outputs import OutputLayout, parquet_bytes, table_for
from dcfm.synth import CLASSES, PALETTE, SynthConfig, generate_corpus, load_manifest

RUN_ID = "bench-run"
CHUNK = 256

# Imports first; then the command runs while a thread samples the process's resident memory (VmRSS) every
# 10 ms. ru_maxrss cannot be used: importing torch peaks higher than anything the commands do afterwards.
_CHILD = """
import sys, threading, time
import dcfm.labels.cvat, dcfm.labels.render, dcfm.decode, matplotlib.figure
from dcfm.cli import main

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

peak, done = [0.0], threading.Event()
def sample():
    while not done.wait(0.01):
        peak[0] = max(peak[0], rss_mib())
before = rss_mib()
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
done.set()
print("RESULT", code, seconds, before, max(peak[0], rss_mib()))
"""


def commit_labels_as_masks(corpus: Path, output: str, checkpoint: str, digest: str) -> list[str]:
    """Commit every synth video's label maps as its masks, chunk by chunk (memory: one chunk)."""
    manifest = load_manifest(corpus)
    layout = OutputLayout(output)
    names = output_schema("frames").file_schema.names
    ids = []
    for video in manifest.videos:
        chunks = []
        for chunk, start in enumerate(range(0, video.frames, CHUNK)):
            rows: dict[str, list] = {n: [] for n in names}
            for index in range(start, min(start + CHUNK, video.frames)):
                png = (corpus / video.labels / f"{index:06d}.png").read_bytes()
                mask = np.asarray(Image.open(corpus / video.labels / f"{index:06d}.png"))
                counts = np.bincount(mask.ravel())
                row = {"video_id": video.id, "video_uri": str((corpus / video.video).resolve()),
                       "frame_index": index, "timestamp_s": index / manifest.fps, "is_keyframe": index % 4 == 0,
                       "keyframes": [index - index % 4], "height": mask.shape[0], "width": mask.shape[1],
                       "mask_height": mask.shape[0], "mask_width": mask.shape[1], "mask_png": png,
                       "class_pixels": [{"class_id": int(c), "pixels": int(counts[c])} for c in np.flatnonzero(counts)],
                       # Stand-ins with structure, so the review queue and timeline have something to rank.
                       "confidence": float(0.8 + 0.15 * np.sin(index / 37.0)),
                       "label_change_rate": None if index == 0 else float(0.05 + 0.04 * np.cos(index / 11.0)),
                       "keyframe_agreement": float(0.9 + 0.08 * np.sin(index / 23.0)), "run_id": RUN_ID,
                       "model_digest": digest}
                for name in names:
                    rows[name].append(row[name])
            storage.write_bytes_atomic(layout.staging_file(RUN_ID, video.id, chunk), parquet_bytes(table_for("frames", rows)))
            chunks.append(chunk)
        video_row = {"video_id": video.id, "video_uri": str((corpus / video.video).resolve()), "status": "ok",
                     "error": None, "frame_count": video.frames, "fps": float(manifest.fps), "codec": "h264",
                     "width": mask.shape[1], "height": mask.shape[0], "duration_s": video.frames / manifest.fps,
                     "chunks": len(chunks), "keyframes": (video.frames + 3) // 4, "mean_confidence": 0.8,
                     "mean_label_change_rate": 0.05, "mean_keyframe_agreement": 0.9, "seconds": 0.0,
                     "run_id": RUN_ID, "model_digest": digest, "warning": None}
        layout.commit_video(video.id, RUN_ID, chunks, video_row, [])
        ids.append(video.id)
    storage.write_bytes_atomic(layout.run_manifest(RUN_ID, "bench"), json.dumps(
        {"run_id": RUN_ID, "config": {"checkpoint": checkpoint}, "counts": {}, "timings": {}}).encode())
    return ids


def run(args: list[str]) -> tuple[float, float, float]:
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    _, code, seconds, imported, peak = line.split()
    if code != "0":
        raise RuntimeError(f"dcfm {' '.join(args)} exited {code}: {done.stderr}")
    return float(seconds), float(imported), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--long", type=int, default=5000)
    parser.add_argument("--size", default="360x640")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-labels-") as tmp:
        root = Path(tmp)
        config = DCFMConfig("pvt_v2_b0", num_classes=len(CLASSES))
        checkpoint = str(root / "model")
        digest = save_checkpoint(checkpoint, DCFM(config), ModelCard(config, list(CLASSES), list(PALETTE), (height, width)))
        print("| command | frames | size | seconds | frames/s | RSS before MiB | peak RSS during MiB | added MiB |\n"
              "|---|---|---|---|---|---|---|---|")
        for frames in (args.short, args.long):
            t0 = time.perf_counter()
            corpus = root / f"corpus-{frames}"
            generate_corpus(corpus, SynthConfig(videos=1, frames=frames, height=height, width=width, seed=1))
            output = str(root / f"out-{frames}")
            (video_id,) = commit_labels_as_masks(corpus, output, checkpoint, digest)
            print(f"(made {frames} frames and committed them in {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
            for name, command in (
                ("export cvat", ["export", "cvat", output, "--to", str(root / f"cvat-{frames}")]),
                ("export cvat --review 50", ["export", "cvat", output, "--to", str(root / f"review-{frames}"),
                                             "--review", "50"]),
                ("render", ["render", output, video_id, "--to", str(root / f"render-{frames}")]),
            ):
                seconds, imported, peak = run(command)
                print(f"| {name} | {frames} | {height}x{width} | {seconds:.1f} | {frames / seconds:.1f} | "
                      f"{imported:.0f} | {peak:.0f} | {peak - imported:.0f} |", flush=True)


if __name__ == "__main__":
    main()
