"""Post-processing at source resolution, before/after, and the segment actor's ceiling with a zero-cost model.

    python benchmarks/bench_postprocess.py [--sizes 720x1280,1080x1920 --frames 24 --device cpu]

Sources: synthetic street footage (dcfm.synth) rendered at each size and encoded as H.264 (CRF 18).

1. Post-processing, one thread, per frame, 19 classes, for a model run at 512x1024:
   * before: ``upsample_logits`` of each keyframe's logits, sum, softmax, max/argmax (what ClipSegmenter did);
   * after:  ``dcfm.postprocess.frame_labels`` on the summed logits (what it does now).
   Two kinds of logits: "labels" = the synthetic ground truth at 128x256 (stride 4, as PVTv2/SegFormer heads
   give) as one-hot x 4 plus noise, smoothed (shaped like a trained model's output: regions with soft
   borders); "random" = a random-weights ResNet-18 DCFM on the decoded frames (stride 8: 64x128; what an
   untrained model gives, few classes). Reported: ms
   per frame, pixels that differ from the before masks, |confidence difference|.
2. Ceiling: ``ChunkSegmenter.run`` on one chunk of each source with a model that costs nothing (logits are
   a fixed projection of the average-pooled frame), masks at source size, everything else real: decode in
   a thread, resize, post-processing, PNG masks, Parquet write. frames/s per actor with 1 and 2 torch
   threads says how many CPU cores one GPU needs to stay fed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcfm.devices import describe_host
from dcfm.postprocess import frame_labels
from dcfm.model import DCFM, DCFMConfig, upsample_logits
from dcfm.synth import SynthConfig, render_video
from dcfm.encode import write_video

CLASSES = 19
MODEL_SIZE = (512, 1024)
THREADS = (1, 2)


def before(per_ref: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The previous ClipSegmenter post-processing (one or two keyframes' logits)."""
    upsampled = upsample_logits(per_ref, size)
    total = upsampled.sum(dim=0)
    if len(per_ref) == 2:
        (upsampled[0].argmax(0) == upsampled[1].argmax(0)).float().mean().item()
    confidence, labels = total.softmax(dim=0).max(dim=0)
    return labels.to(torch.int32).numpy().astype(np.uint8), confidence.mean().item()


def after(per_ref: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    pair = (per_ref[0], per_ref[1]) if len(per_ref) == 2 else None
    out = frame_labels(per_ref.sum(dim=0), size, np.dtype(np.uint8), pair=pair)
    return out.labels, out.confidence


def label_logits(label: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    small = torch.from_numpy(label.astype(np.int64))[None, None].float()
    small = F.interpolate(small, size=(MODEL_SIZE[0] // 4, MODEL_SIZE[1] // 4), mode="nearest")[0, 0].long()
    one_hot = F.one_hot(small.clamp(max=CLASSES - 1), CLASSES).permute(2, 0, 1).float()
    noise = torch.from_numpy(rng.normal(0, 0.7, one_hot.shape).astype(np.float32))
    return F.avg_pool2d((one_hot * 4 + noise)[None], 3, 1, 1)[0]


def timed(fn, logits: list[torch.Tensor], size) -> tuple[float, list]:
    fn(logits[0], size)
    times, outs = [], []
    for one in logits:
        start = time.perf_counter()
        outs.append(fn(one, size))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), outs


def postprocess_table(sources: dict[str, tuple[Path, list[np.ndarray]]], frames: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DCFM(DCFMConfig("resnet18", num_classes=CLASSES)).eval()
    rng = np.random.default_rng(0)
    print("\n## post-processing per frame, 1 thread, 19 classes, model at 512x1024")
    print("| source | logits | keyframes summed | before ms | after ms | speed-up | pixels differing | max abs confidence diff |")
    print("|---|---|---|---|---|---|---|---|")
    import av

    for name, (path, labels) in sources.items():
        size = labels[0].shape
        with av.open(str(path)) as container:
            rgb = [f.to_ndarray(width=MODEL_SIZE[1], height=MODEL_SIZE[0], format="rgb24")
                   for _, f in zip(range(frames), container.decode(video=0))]
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255
            random = [model.forward_keyframe(x[i:i + 1]).logits[0] for i in range(len(x))]
        kinds = {"labels": [label_logits(lab, rng) for lab in labels[:frames]], "random": random}
        for kind, per_frame in kinds.items():
            for refs in (1, 2):
                stacks = [torch.stack([per_frame[i], per_frame[(i + 3) % len(per_frame)]][:refs])
                          for i in range(len(per_frame))]
                with torch.inference_mode():
                    t_before, ref = timed(before, stacks, size)
                    t_after, new = timed(after, stacks, size)
                differing = sum(int((a[0] != b[0]).sum()) for a, b in zip(ref, new))
                conf = max(abs(a[1] - b[1]) for a, b in zip(ref, new))
                print(f"| {name} | {kind} | {refs} | {t_before:.1f} | {t_after:.1f} | {t_before / t_after:.1f}x | "
                      f"{differing} of {len(ref) * size[0] * size[1]} | {conf:.1e} |", flush=True)


class ZeroCostDCFM(DCFM):
    """A DCFM whose layers cost (almost) nothing: logits are a fixed projection of the frame pooled to
    stride 4 and smoothed over 9x9 of those cells, so they have regions like a trained model's output
    (a projection of raw pixels would follow every texture)."""

    def __init__(self, config: DCFMConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(config.num_classes, 3, generator=generator) * 3)
        self.fusion = _ZeroFusion()

    def independent(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4)

    def common(self, independent: torch.Tensor) -> torch.Tensor:
        return independent

    def logits_from_term(self, term: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
        smooth = F.avg_pool2d(independent + 0 * term, 9, 1, 4, count_include_pad=False)
        return torch.einsum("kc,nchw->nkhw", self.projection, smooth)


class _ZeroFusion(nn.Module):
    def keyframe_term(self, common: torch.Tensor) -> torch.Tensor:
        return common


def ceiling_table(sources: dict[str, tuple[Path, list[np.ndarray]]], work: Path, frames: int, device: str,
                  model_size: tuple[int, int] = MODEL_SIZE) -> None:
    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.inference import KeyframePolicy, ReuseMode
    from dcfm.segment.actor import ActorSettings, ChunkSegmenter
    from dcfm.segment.config import MaskResolution
    from dcfm.segment.plan import plan_tasks
    from dcfm.decode import probe_video

    config = DCFMConfig("resnet18", num_classes=CLASSES)
    card = ModelCard(config, [f"c{i}" for i in range(CLASSES)], [(i, i, i) for i in range(CLASSES)], model_size)
    save_checkpoint(work / "ckpt", DCFM(config).eval(), card)
    from dcfm.checkpoint import read_card

    _, digest = read_card(str(work / "ckpt"))
    print(f"\n## pipeline ceiling: zero-cost model, one actor, masks at source size, model input {model_size[0]}x"
          f"{model_size[1]}, device {device}, k = 6, {frames} frames")
    print("| source | torch threads | frames/s | ms/frame | decode wait | post-processing (model stage) | PNG + metrics | Parquet |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (path, _) in sources.items():
        probe = probe_video(str(path))
        (task,) = plan_tasks("v", str(path), probe, chunk_frames=10**6, lead_in=6)
        for threads in THREADS:
            settings = ActorSettings(
                checkpoint=str(work / "ckpt"), model_digest=digest, output=str(work / "out"), run_id="bench",
                keyframes=KeyframePolicy(interval=6), mode=ReuseMode.BIDIRECTIONAL, resolution=model_size,
                mask_resolution=MaskResolution.SOURCE, batch_size=8, device=device, threads=threads,
                reuse_staged=False,
            )
            actor = ChunkSegmenter(settings)
            actor.model = ZeroCostDCFM(config).to(actor.device).eval()
            actor.run(task)  # warm-up: first Parquet write, allocator, kernel selection
            s = actor.run(task)
            assert s.status == "ok", s.error
            print(f"| {name} | {threads} | {s.frames / s.seconds:.1f} | {1000 * s.seconds / s.frames:.1f} | "
                  f"{1000 * s.decode_wait_s / s.frames:.1f} ms | {1000 * s.model_s / s.frames:.1f} ms | "
                  f"{1000 * s.rows_s / s.frames:.1f} ms | {1000 * s.write_s / s.frames:.1f} ms |", flush=True)


def make_source(work: Path, size: tuple[int, int], frames: int) -> tuple[Path, list[np.ndarray]]:
    config = SynthConfig(videos=1, frames=frames, height=size[0], width=size[1], seed=5)
    rgb, labels = [], []
    for image, label in render_video(config, 0):
        rgb.append(image)
        labels.append(label)
    path = work / f"{size[0]}p.mp4"
    write_video(path, rgb, fps=config.fps)
    return path, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="720x1280,1080x1920")
    parser.add_argument("--frames", type=int, default=24, help="frames per source (default 24)")
    parser.add_argument("--device", default="cpu", help="device of the ceiling run (cpu or cuda)")
    parser.add_argument("--skip-postprocess", action="store_true")
    parser.add_argument("--model-size", default=f"{MODEL_SIZE[0]}x{MODEL_SIZE[1]}",
                        help="model input HxW of the ceiling run (default %(default)s; smaller for a smoke test)")
    args = parser.parse_args()
    print(f"host: {describe_host()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dcfm-post-"))
    try:
        sources = {}
        for text in args.sizes.split(","):
            h, w = (int(v) for v in text.split("x"))
            sources[f"{h}p"] = make_source(work, (h, w), args.frames)
        if not args.skip_postprocess:
            postprocess_table(sources, args.frames)
        model_h, model_w = (int(v) for v in args.model_size.split("x"))
        ceiling_table(sources, work, args.frames, args.device, (model_h, model_w))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
