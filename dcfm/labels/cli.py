"""Command lines of `dcfm export cvat`, `dcfm render` and `dcfm report` (registered in dcfm.cli).

Exit status: 0 done; 2 bad command line; 3 the command failed (a video id that is not committed, an
unreadable output or checkpoint, an unwritable destination), with one line saying why.
"""

from __future__ import annotations

import argparse

from dcfm.jobcli import positive_int, run_job

_CHECKPOINT_HELP = ("the model that segmented OUTPUT, for its class names and colours (default: the checkpoint "
                    "its run manifest records)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["cvat"], help="cvat: CVAT 'Segmentation mask 1.1' (Pascal VOC layout) zips")
    p.add_argument("output", help="the --output of a segment run (local or s3://)")
    p.add_argument("--to", required=True, help="directory or s3:// prefix for <video_id>.zip (and .review.csv)")
    p.add_argument("--videos", nargs="+", metavar="ID", help="video ids to export (default: every committed ok video)")
    p.add_argument("--every", type=positive_int, default=1, metavar="N", help="keep frames with index %% N == 0")
    p.add_argument("--review", type=positive_int, metavar="N",
                   help="keep the N frames per video most in need of review (lowest score: mean of confidence, "
                        "1 - label change and keyframe agreement) and write the ranked list as <video_id>.review.csv")
    p.add_argument("--images", action="store_true", help="also write the source frames as JPEGImages/<frame>.jpg")
    p.add_argument("--subset", default="default", help="CVAT subset name: ImageSets/Segmentation/<subset>.txt")
    p.add_argument("--checkpoint", help=_CHECKPOINT_HELP)


def run_export(args: argparse.Namespace) -> int:
    from dcfm.labels.cvat import CvatExportConfig, export_cvat

    def config(a: argparse.Namespace) -> CvatExportConfig:
        return CvatExportConfig(a.output, a.to, a.videos, a.every, a.review, a.images, a.subset, a.checkpoint)

    return run_job("export", args, config, export_cvat, resume_hint="rerun the same command")


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the --output of a segment run (local or s3://)")
    p.add_argument("video_id", help="a committed video's id (see OUTPUT/_commits/)")
    p.add_argument("--to", required=True, help="directory or s3:// prefix for <video_id>.overlay.mp4, "
                                               ".overlay.png, .contact.png and .timeline.png")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the mask colour in the overlay (default 0.5)")
    p.add_argument("--columns", type=positive_int, default=4, help="contact sheet columns (default 4)")
    p.add_argument("--rows", type=positive_int, default=4, help="contact sheet rows (default 4)")
    p.add_argument("--checkpoint", help=_CHECKPOINT_HELP)


def run_render(args: argparse.Namespace) -> int:
    from dcfm.labels.render import RenderConfig, render_video

    def config(a: argparse.Namespace) -> RenderConfig:
        return RenderConfig(a.output, a.video_id, a.to, a.checkpoint, a.alpha, a.columns, a.rows)

    return run_job("render", args, config, render_video, resume_hint="rerun the same command")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the --output of a segment run (local or s3://)")
    p.add_argument("--to", required=True, help="the HTML file to write (local or s3://)")
    p.add_argument("--renders", help="a `dcfm render --to` directory: the page links to the renders it holds")
    p.add_argument("--checkpoint", help=_CHECKPOINT_HELP)


def run_report(args: argparse.Namespace) -> int:
    from dcfm.labels.report import ReportConfig, write_report

    def config(a: argparse.Namespace) -> ReportConfig:
        return ReportConfig(a.output, a.to, a.renders, a.checkpoint)

    return run_job("report", args, config, write_report, resume_hint="rerun the same command")
