"""Per-frame cost of DCFM's keyframe path vs its non-keyframe (reuse) path.

    python benchmarks/bench_paths.py [--backbones resnet18,resnet50,pvt_v2_b0] [--sizes 256x512,512x1024] \
        [--nonkey-scales 1.0,0.5]

Times, for batch 1 under torch.inference_mode():
  key     = shallow + deep + FFM + head          (model.forward_keyframe)
  nonkey  = shallow + FFM(cached keyframe term) + head   (what ClipSegmenter runs on a non-keyframe);
            at a non-key scale s < 1 (a model trained for it): resizing the frame by s + shallow on it + the
            cross-resolution correction + FFM(keyframe term aligned to the low-res grid, cached per keyframe)
            + head, the non-key logits being coarser
  post    = bilinear upsampling of the logits to the input size + softmax/argmax (paid by every frame)
and prints the ratio nonkey/key and the paper's average per-frame cost (T_key + (k-1) T_nonkey) / k.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dcfm.devices import describe_host
from dcfm.model import DCFM, DCFMConfig, upsample_logits


def median_seconds(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: allocator, oneDNN/cuDNN kernel selection
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()  # CUDA runs asynchronously: time the work, not the launch
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(backbone: str, size: tuple[int, int], repeats: int, classes: int, scale: float = 1.0,
          device: torch.device = torch.device("cpu")) -> dict[str, float]:
    model = DCFM(DCFMConfig(backbone=backbone, num_classes=classes, nonkey_scale=scale)).eval().to(device)
    image = torch.randn(1, 3, *size, device=device)
    with torch.inference_mode():
        key = model.forward_keyframe(image)
        term = model.fusion.keyframe_term(key.common)
        t_key = median_seconds(lambda: model.forward_keyframe(image), repeats, device)
        if scale == 1:
            t_nonkey = median_seconds(lambda: model.logits_from_term(term, model.independent(image)), repeats, device)
        else:
            aligned = model.align_term(term, model.independent_lowres(image))  # once per keyframe, as inference
            t_nonkey = median_seconds(lambda: model.logits_from_term(aligned, model.independent_lowres(image)),
                                      repeats, device)
        t_post = median_seconds(lambda: upsample_logits(key.logits, size)[0].softmax(0).max(0), repeats, device)
    return {"key": t_key, "nonkey": t_nonkey, "post": t_post}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,resnet50,pvt_v2_b0")
    parser.add_argument("--sizes", default="256x512,512x1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--nonkey-scales", default="1.0,0.5", help="non-keyframe resolution scales (default 1.0,0.5)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"host: {describe_host()}")
    print(f"threads {torch.get_num_threads()}, device {device}, batch 1, {args.classes} classes")
    header = ("| backbone | size | non-key scale | key ms | non-key ms | non-key/key | post ms "
              "| avg ms/frame k=2 (incl. post) | k=6 |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for backbone in args.backbones.split(","):
        for text in args.sizes.split(","):
            h, w = (int(v) for v in text.split("x"))
            for scale in (float(v) for v in args.nonkey_scales.split(",")):
                t = bench(backbone, (h, w), args.repeats, args.classes, scale, device)
                avg = {k: (t["key"] + (k - 1) * t["nonkey"]) / k + t["post"] for k in (2, 6)}
                print(
                    f"| {backbone} | {h}x{w} | {scale:g} | {t['key'] * 1e3:.1f} | {t['nonkey'] * 1e3:.1f} | "
                    f"{t['nonkey'] / t['key']:.1%} | {t['post'] * 1e3:.1f} | {avg[2] * 1e3:.1f} | {avg[6] * 1e3:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
