"""Inputs and security without Ray: extension matching and skipped files, the protocol allow-list, redaction of
URIs and messages, the short-container warning, tracebacks of unexpected errors, checkpoints that never
download weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import pytest

from dcfm import storage
from dcfm.decode import probe_video
from dcfm.errors import ExitCode, InputError
from dcfm.sources import VIDEO_EXTENSIONS, scan_inputs, video_id_for
from dcfm.storage import redact
from tests.videos import frame_image

SIGNATURE = "f3a9c0ffee5ecre7519"
CREDENTIAL = "AKIAEXAMPLE7Q/20260101/us-east-1/s3/aws4_request"
PRESIGNED_QUERY = (f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CREDENTIAL.replace('/', '%2F')}"
                   f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
                   f"&X-Amz-Signature={SIGNATURE}")


# --- redact ------------------------------------------------------------------------------------------------


def test_redact_strips_user_info_query_strings_and_signatures() -> None:
    assert redact("s3://AKIA:secret@bucket/key.mp4") == "s3://bucket/key.mp4"
    assert redact("https://user:pw@host:9000/b/k") == "https://host:9000/b/k"
    assert redact(f"https://bucket.s3.amazonaws.com/raw/clip.mp4?{PRESIGNED_QUERY}") == \
        "https://bucket.s3.amazonaws.com/raw/clip.mp4"
    assert redact("s3://bucket/clip.mp4?versionId=3#t=1") == "s3://bucket/clip.mp4"
    # Plain paths and URIs pass unchanged, Hive-style folders included.
    for plain in ("/data/x.mp4", "s3://b/raw/sp=2/token=a/x.mp4", "/d/my clip (1).mov", "relative/clip.ts"):
        assert redact(plain) == plain


def test_redact_cleans_uris_inside_messages_and_tracebacks() -> None:
    message = (f"http://127.0.0.1:8333/b/clip.mp4?{PRESIGNED_QUERY}: cannot open: ClientResponseError: 403, "
               f"message='Forbidden', url=URL('http://u:p@127.0.0.1:8333/b/clip.mp4?{PRESIGNED_QUERY}')")
    cleaned = redact(message)
    assert cleaned == ("http://127.0.0.1:8333/b/clip.mp4: cannot open: ClientResponseError: 403, "
                       "message='Forbidden', url=URL('http://127.0.0.1:8333/b/clip.mp4')")
    # A signature in a local file name or a library's message loses its value wherever it is.
    local = f"/data/clip.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}"
    assert SIGNATURE not in redact(local) and "AKIAEXAMPLE" not in redact(local)
    assert redact(local).startswith("/data/clip.mp4?X-Amz-Signature=REDACTED")
    assert redact(f"Traceback ...\n  File x\nOSError: {local} is gone") == \
        "Traceback ...\n  File x\nOSError: /data/clip.mp4?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED is gone"
    assert redact("/x/a.mp4?sig=abc&se=2026&id=7") == "/x/a.mp4?sig=REDACTED&se=REDACTED&id=7"
    assert redact(redact(message)) == redact(message)


def test_every_job_log_goes_through_redact() -> None:
    lines: list[str] = []
    storage.redacting(lines.append)(f"[segment] FAILED s3://k:s@b/x.mp4?{PRESIGNED_QUERY}")
    assert lines == ["[segment] FAILED s3://b/x.mp4"]


# --- extensions and skipped files ----------------------------------------------------------------------------


def test_archive_containers_are_taken_in_any_case_and_the_rest_is_counted(tmp_path: Path) -> None:
    names = [f"v{i}{ext}" for i, ext in enumerate(VIDEO_EXTENSIONS)] + ["UPPER.MXF", "Mixed.M2ts", "tape.VOB"]
    for name in [*names, "notes.txt", "thumb.png", "sub/readme.md", "._v0.mpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0")
    for ext in (".mpg", ".mpeg", ".m2v", ".vob", ".ts", ".m2ts", ".mts", ".mxf", ".mov", ".mp4", ".m4v", ".mkv",
                ".webm", ".avi", ".wmv", ".asf", ".flv", ".3gp", ".ogv"):
        assert ext in VIDEO_EXTENSIONS
    scan = scan_inputs([str(tmp_path)])
    assert sorted(Path(i.uri).name for i in scan.items) == sorted(names)
    assert scan.skipped == 4
    assert scan.skipped_examples == sorted(str(tmp_path / n) for n in ("._v0.mpg", "notes.txt", "thumb.png")) + [
        str(tmp_path / "sub" / "readme.md")]
    assert "skipped 4 file(s)" in scan.skipped_note() and "--extensions" in scan.skipped_note()
    # --extensions replaces the list (with or without dots, any case); globs count what they leave out too.
    only = scan_inputs([str(tmp_path)], extensions=["MXF", ".vob"])
    assert sorted(Path(i.uri).name for i in only.items) == sorted(["UPPER.MXF", "tape.VOB", "v7.mxf", "v3.vob"])
    assert only.skipped == len(names)  # the other videos and the four other files
    glob = scan_inputs([str(tmp_path / "*")], extensions=["txt"])
    assert [Path(i.uri).name for i in glob.items] == ["notes.txt"] and glob.skipped == len(names) + 1
    with pytest.raises(InputError, match="no video files.*--extensions"):
        scan_inputs([str(tmp_path / "sub")])


def test_explicit_inputs_are_always_taken(tmp_path: Path) -> None:
    """A file named on the command line or in a manifest is processed (or fails alone), whatever its name."""
    (tmp_path / "odd.dat").write_bytes(b"\0")
    manifest = tmp_path / "list.txt"
    manifest.write_text("odd.dat\nmissing.bin\n")
    scan = scan_inputs([str(tmp_path / "odd.dat"), str(manifest)], extensions=["mp4"])
    assert [i.uri for i in scan.items] == [str(tmp_path / "odd.dat"), str(tmp_path / "missing.bin")]
    assert scan.skipped == 0


# --- protocols -------------------------------------------------------------------------------------------------


def test_a_manifest_naming_http_is_refused_unless_allowed(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("clip.mp4\nhttp://127.0.0.1:9/x.mp4\n")
    with pytest.raises(InputError) as refused:
        scan_inputs([str(manifest)])
    message = str(refused.value)
    assert "http://127.0.0.1:9/x.mp4" in message and str(manifest) in message
    assert "--allow-protocols http" in message and "local paths or s3://" in message
    for spec in ("https://example.com/x.mp4", "gs://bucket/x.mp4", "ftp://host/x.mp4"):
        with pytest.raises(InputError, match="--allow-protocols"):
            scan_inputs([spec])
    allowed = scan_inputs([str(manifest)], protocols=["http"])  # nothing is fetched while expanding
    assert [i.uri for i in allowed.items] == [str(tmp_path / "clip.mp4"), "http://127.0.0.1:9/x.mp4"]


def test_the_command_line_refuses_it_with_exit_2(tmp_path: Path, capsys) -> None:
    from dcfm.segment.cli import main

    manifest = tmp_path / "list.txt"
    manifest.write_text("http://127.0.0.1:9/x.mp4\n")
    code = main([str(manifest), "--output", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert "http://127.0.0.1:9/x.mp4" in err and "--allow-protocols http" in err
    assert not (tmp_path / "out").exists()


def test_help_documents_the_options(capsys) -> None:
    from dcfm.segment.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--extensions" in text and "mpg,mpeg" in text and "--allow-protocols" in text and "redacted" in text


def test_resigned_urls_keep_their_video_id_and_ids_hold_no_secret() -> None:
    base = "https://bucket.s3.amazonaws.com/raw/clip.mp4"
    first = video_id_for(f"{base}?{PRESIGNED_QUERY}")
    assert first == video_id_for(f"{base}?{PRESIGNED_QUERY.replace(SIGNATURE, 'other')}") == video_id_for(base)
    assert first.startswith("clip-")
    local = video_id_for(f"/d/clip.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}")
    assert local.startswith("clip-") and "AKIA" not in local


# --- short containers ---------------------------------------------------------------------------------------


def write_video(path: Path, fmt: str, codec: str, n: int, options: dict | None = None) -> Path:
    """``n`` frames in container ``fmt`` (PyAV's muxers: mpeg, mpegts, mxf, mov, matroska)."""
    size = (64, 96)
    with av.open(str(path), "w", format=fmt, container_options=options or {}) as container:
        stream = container.add_stream(codec, rate=25, options={"g": "12"})
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i, size), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def cut(path: Path, share: float) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"cut_{path.name}")
    out.write_bytes(data[: int(len(data) * share)])
    return out


@pytest.mark.parametrize("name,fmt,codec,options", [
    ("a.mkv", "matroska", "libx264", None),
    ("b.ts", "mpegts", "libx264", None),
    ("c.m2ts", "mpegts", "libx264", {"mpegts_m2ts_mode": "1"}),
    ("d.mxf", "mxf", "mpeg2video", None),
])
def test_a_container_cut_short_carries_a_warning(tmp_path: Path, name, fmt, codec, options) -> None:
    whole = write_video(tmp_path / name, fmt, codec, 60, options)
    probe = probe_video(str(whole))
    assert probe.frame_count == 60 and probe.warning is None
    short = probe_video(str(cut(whole, 0.6)))
    assert 20 < short.frame_count < 60
    assert short.warning is not None and short.warning.startswith("cut short") and "re-upload" in short.warning


# --- unexpected errors --------------------------------------------------------------------------------------


def test_an_unexpected_actor_error_keeps_its_traceback_for_the_errors_row(tmp_path: Path) -> None:
    """A bug (here: a chunk planned past the end of the video) is not bad input: its traceback, redacted, goes to
    the errors/ row's detail column and to the log, so a bug report is possible."""
    import torch

    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.inference import KeyframePolicy, ReuseMode
    from dcfm.model import DCFM, DCFMConfig
    from dcfm.segment.actor import ActorSettings, ChunkSegmenter, ChunkSummary
    from dcfm.segment.config import MaskResolution
    from dcfm.segment.job import VideoState, report_chunk, video_row
    from dcfm.segment.outputs import OutputLayout
    from dcfm.segment.plan import plan_tasks
    from dcfm.sources import InputItem

    torch.manual_seed(0)
    config = DCFMConfig("resnet18", num_classes=2)
    save_checkpoint(tmp_path / "ckpt", DCFM(config), ModelCard(config, ["a", "b"], [(0, 0, 0), (9, 9, 9)], (32, 64)))
    _, digest = __import__("dcfm.checkpoint", fromlist=["read_card"]).read_card(tmp_path / "ckpt")
    video = write_video(tmp_path / f"clip.mp4?X-Amz-Signature={SIGNATURE}", "mp4", "libx264", 6)
    uri = str(video)
    item = InputItem(uri, video_id_for(uri))
    [task] = plan_tasks(item.video_id, uri, probe_video(uri), chunk_frames=8, lead_in=0)
    broken = replace(task, decode_stop=task.decode_stop + 5)  # what a planner bug would send
    settings = ActorSettings(str(tmp_path / "ckpt"), digest, str(tmp_path / "out"), "run", KeyframePolicy(interval=2),
                             ReuseMode.CAUSAL, (32, 64), MaskResolution.MODEL, 2, "cpu", 1)
    summary = ChunkSegmenter(settings).run(broken)
    assert summary.status == "failed" and summary.error["error_type"] == "ValueError"
    detail = summary.error["detail"]
    assert "Traceback" in detail and "decode_range" in detail and "bad range" in detail
    assert SIGNATURE not in json.dumps(summary.error) and SIGNATURE not in summary.uri
    lines: list[str] = []
    report_chunk(ChunkSummary(**json.loads(summary.to_json())), storage.redacting(lines.append))
    assert any("Traceback" in line and "decode_range" in line for line in lines)
    assert not any(SIGNATURE in line for line in lines)
    state = VideoState(item)
    assert state.add(summary) and state.complete()
    row, errors, publish = video_row(state, "run", digest)
    assert row["status"] == "failed" and not publish and SIGNATURE not in json.dumps(row)
    layout = OutputLayout(str(tmp_path / "out"))
    layout.commit_video(item.video_id, "run", publish, row, errors)
    import pyarrow.parquet as pq

    [stored] = pq.read_table(os.path.join(layout.errors_dir(item.video_id), "part-0.parquet")).to_pylist()
    assert stored["detail"] == detail and SIGNATURE not in json.dumps(stored)


# --- checkpoints never download -----------------------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter importing torch and timm
def test_a_checkpoint_trained_from_pretrained_weights_loads_offline(tmp_path: Path) -> None:
    """The card of a model trained with --pretrained says so; loading it must not reach for the timm hub. Run
    offline (HF_HUB_OFFLINE, an empty cache) in a fresh process, where any download attempt fails at once."""
    import torch

    from dcfm.checkpoint import ModelCard, save_checkpoint
    from dcfm.model import DCFM, DCFMConfig

    config = DCFMConfig("pvt_v2_b0", num_classes=3)
    torch.manual_seed(0)
    model = DCFM(config).eval()
    save_checkpoint(tmp_path / "ckpt", model, ModelCard(config, ["a", "b", "c"], [(0, 0, 0)] * 3, (32, 64)))
    card_path = tmp_path / "ckpt" / "dcfm.json"
    card = json.loads(card_path.read_text())
    card["config"]["pretrained_backbone"] = True  # what `dcfm train --pretrained` records
    card_path.write_text(json.dumps(card))
    x = torch.rand(1, 3, 32, 64)
    with torch.inference_mode():
        expected = model(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from dcfm.checkpoint import load_checkpoint\n"
        f"loaded = load_checkpoint({str(tmp_path / 'ckpt')!r})\n"
        "assert loaded.card.config.pretrained_backbone  # the card still records how training started\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.inference_mode():\n"
        "    assert torch.allclose(loaded.model(io['x']), io['y'], atol=1e-5)\n"
        "print('loaded offline')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded offline" in result.stdout
    assert not any((tmp_path / "hf").rglob("*.safetensors")) and not (tmp_path / "th").exists()
