"""The evaluate job's outputs: one JSON row per setting, a Markdown table, and an accuracy-vs-speed plot."""

from __future__ import annotations

import io
import math
from typing import Any

from dcfm.evaluate.config import Setting
from dcfm.evaluate.score import EvaluationReport

CONVENTIONS = {
    "miou": "confusion matrix over every labelled frame of every clip; classes absent from both ground truth "
            "and prediction are NaN and left out of the mean (mmsegmentation's convention); ignore label 255",
    "miou_non_key": "the same over the labelled frames that were non-keyframes in this setting",
    "phases": "sparsely labelled clips (Cityscapes, CamVid) at a fixed k > 1 are run once per keyframe phase "
              "0..k-1 (keyframes where index % k == phase; frames before the first keyframe use the next one "
              "only) and the confusion matrices of all phases are pooled, so the labelled frame takes every "
              "position relative to the keyframes; frames, keyframes and time count every pass",
    "wiou": "frequency-weighted IoU: sum over classes of (GT pixels of c / valid GT pixels) x IoU_c",
    "vc": "VSPW VC_perclip.py: windows starting at 0..T-n-1 of fully labelled clips, pooled over all windows of "
          "all clips, nanmean; null when no clip is fully labelled and longer than n",
    "speed": "inference wall time, decoding and resizing excluded; split into keyframes and non-keyframes by "
             "timing the model stages inside the run (shallow layers and per-frame overhead shared by all frames, "
             "deep layers by keyframes, fusion + head per reference keyframe), so K*ms_key + (N-K)*ms_non_key is "
             "the measured total; fps = frames / total",
}


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def result_row(setting: Setting, report: EvaluationReport, nonkey_scale: float) -> dict[str, Any]:
    """One setting's numbers as JSON values (NaN -> null)."""
    policy = setting.keyframes
    non_key = report.scores_non_key
    return {
        "setting": setting.name,
        "mode": setting.mode.value,
        "nonkey_scale": nonkey_scale,
        "keyframe_interval": None if not policy.fixed else policy.interval,
        "adaptive": policy.adaptive,
        "codec": policy.codec,
        "phase_averaged_clips": report.phase_averaged_clips,
        "keyframe_policy": {"interval": policy.interval, "adaptive": policy.adaptive,
                            "min_interval": policy.min_interval, "max_interval": policy.max_interval,
                            "threshold": policy.threshold, "score": policy.score.value, "codec": policy.codec},
        "miou": _finite(report.scores.miou),
        "miou_non_key": _finite(non_key.miou) if non_key else None,
        "wiou": _finite(report.scores.fwiou),
        "pixel_accuracy": _finite(report.scores.pixel_accuracy),
        "vc8": _finite(report.vc.get(8)),
        "vc16": _finite(report.vc.get(16)),
        "per_class_iou": {name: _finite(v) for name, v in report.scores.per_class_iou.items()},
        "frames": report.frames,
        "keyframes": report.keyframes,
        "ms_per_keyframe": _finite(report.ms_per_keyframe),
        "ms_per_non_keyframe": _finite(report.ms_per_non_keyframe),
        "ms_per_frame": _finite(1000 * report.seconds / report.frames) if report.frames else None,
        "fps": _finite(report.fps),
        "seconds": report.seconds,
        "stage_seconds": report.stage_seconds,
        "label_change_rate": _finite(report.label_change_rate),
        "mean_agreement": _finite(report.mean_agreement),
        "keyframes_by_video": report.per_video_keyframes,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _scale(row: dict[str, Any]) -> float:
    return row.get("nonkey_scale", 1.0)  # rows written before reduced-resolution models were all full size


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The summary table, then per-class IoU (classes x settings)."""
    lines = [
        f"# DCFM evaluation: {header['checkpoint']} on {header['data']}",
        "",
        f"{header['videos']} clips, {header['frames_per_setting']} frames per setting, model input "
        f"{header['resolution']}, device {header['device']} ({header['threads']} threads).",
        "",
        "| setting | k | mode | non-key scale | mIoU | mIoU non-key | wIoU | VC8 | VC16 | ms/keyframe "
        "| ms/non-keyframe | FPS | keyframes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = "adaptive" if r["adaptive"] else "codec" if r.get("codec") else str(r["keyframe_interval"])
        lines.append(
            f"| {r['setting']} | {k} | {r['mode']} | {_scale(r):g} | {_fmt(r['miou'])} | {_fmt(r['miou_non_key'])} | "
            f"{_fmt(r['wiou'])} | "
            f"{_fmt(r['vc8'])} | {_fmt(r['vc16'])} | {_fmt(r['ms_per_keyframe'], 2)} | "
            f"{_fmt(r['ms_per_non_keyframe'], 2)} | {_fmt(r['fps'], 1)} | {r['keyframes']}/{r['frames']} |")
    several_scales = len({_scale(r) for r in rows}) > 1
    names = [f"{r['setting']} s={_scale(r):g}" if several_scales else r["setting"] for r in rows]
    lines += ["", "Per-class IoU:", "", "| class | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(rows)]
    for name in rows[0]["per_class_iou"]:
        lines.append(f"| {name} | " + " | ".join(_fmt(r["per_class_iou"].get(name)) for r in rows) + " |")
    lines += ["", "Conventions:", ""] + [f"- **{k}**: {v}" for k, v in CONVENTIONS.items()]
    return "\n".join(lines) + "\n"


def accuracy_vs_speed_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """mIoU (and VC8 where defined) against frames per second, one line per reuse mode and non-key scale,
    points labelled by k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("miou", "mIoU")] + ([("vc8", "VC8")] if any(r["vc8"] is not None for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    scales = sorted({_scale(r) for r in rows}, reverse=True)
    for ax, (key, label) in zip(axes[0], panels):
        for scale in scales:
            for mode, marker in (("causal", "o"), ("bidirectional", "s")):
                # k = 1 is the same run for both modes: it starts both lines, which then follow k.
                points = sorted((r["adaptive"], r["keyframe_interval"] or 0, r["fps"], r[key]) for r in rows
                                if _scale(r) == scale and (r["mode"] == mode or r["keyframe_interval"] == 1)
                                and r["fps"] and r[key] is not None)
                if not points:
                    continue
                name = f"{mode}, non-key scale {scale:g}" if len(scales) > 1 else mode
                ax.plot([p[2] for p in points], [p[3] for p in points], marker=marker, label=name)
                for adaptive, k, fps, value in points:
                    ax.annotate("AKS" if adaptive else f"k={k}", (fps, value), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        ax.set_xlabel("frames per second")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
