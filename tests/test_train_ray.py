"""The train job end to end on a real local Ray (2 CPU workers, gloo DDP) with data and checkpoints in a
real S3 (SeaweedFS): training, a killed worker, reruns, and `dcfm segment` loading the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcfm import storage
from dcfm.checkpoint import load_checkpoint, read_card
from dcfm.errors import ExitCode
from dcfm.segment.config import SegmentJobConfig
from dcfm.segment.job import run_segment_job
from dcfm.synth import SynthConfig, generate_corpus
from dcfm.train.config import TrainJobConfig
from dcfm.train.job import RECORD_FILE, checkpoint_steps, run_train_job
from dcfm.train.recipe import AugmentConfig, OptimConfig
from tests.s3server import s3_bucket

pytestmark = pytest.mark.slow

H, W = 32, 64
STEPS, EVERY, FAIL_AT = 8, 3, 5


@pytest.fixture(scope="module")
def bucket(s3_server, ray_local):
    """A bucket and the AWS environment for the whole module (the raylet got the same from ``ray_local``)."""
    with pytest.MonkeyPatch.context() as patch, s3_bucket(s3_server, patch, "dcfm-train") as uri:
        yield uri


@pytest.fixture(scope="module")
def corpus(bucket: str, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, SynthConfig(videos=2, frames=10, height=H, width=W, seed=5))
    fs, _ = storage.filesystem(bucket)
    fs.put(str(root) + "/", bucket.removeprefix("s3://") + "/corpus/", recursive=True)
    return root, f"{bucket}/corpus"


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("staged"))


def job(data: str, output: str, **kwargs) -> TrainJobConfig:
    return TrainJobConfig(
        data=data, output=output, backbone="pvt_v2_b0", steps=STEPS, batch_size=2,
        augment=AugmentConfig(crop=(H, W), scale=(1.0, 1.25)),
        optim=OptimConfig(name="adamw", lr=1e-3, decoder_lr_mult=1.0, weight_decay=1e-4),
        workers=2, checkpoint_every=EVERY, keep_checkpoints=2, log_every=1, max_failures=1, **kwargs)


@pytest.fixture(scope="module")
def train(corpus, data_cache):
    """Run the job on the S3 corpus; workers stage it into this module's temporary directory."""
    return lambda output, **kwargs: run_train_job(job(corpus[1], output, data_cache=data_cache, **kwargs),
                                                  log=lambda _: None)


@pytest.fixture(scope="module")
def reference(train, bucket):
    """An uninterrupted two-worker run, data and output in S3."""
    return train(f"{bucket}/runs/reference")


def test_two_workers_train_into_s3_and_segment_loads_the_model(reference, corpus, bucket, tmp_path) -> None:
    summary = reference
    assert (summary.start_step, summary.final_step, summary.attempt_starts) == (0, STEPS, [0])
    losses = [row["loss"] for row in summary.history]
    assert [row["step"] for row in summary.history] == list(range(1, STEPS + 1))
    assert sum(losses[-2:]) / 2 < 0.97 * sum(losses[:2]) / 2, losses  # the loss falls
    assert all(row["pairs_per_s"] > 0 for row in summary.history)

    run = f"{bucket}/runs/reference"
    assert summary.latest_checkpoint == f"{run}/checkpoint_{STEPS:06d}" and summary.final_checkpoint == f"{run}/final"
    assert checkpoint_steps(run) == [6, 8]  # every 3 steps and the last; keep_checkpoints=2 dropped step 3
    fs, path = storage.filesystem(summary.latest_checkpoint)
    assert {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.find(path)} - {path.rsplit("/", 1)[-1]} == {
        "model.safetensors", "dcfm.json", "train_state.json", "train_state.safetensors"}
    card, digest = read_card(summary.latest_checkpoint)
    assert card.metadata["step"] == STEPS and card.train_size == (H, W) and card.config.backbone == "pvt_v2_b0"
    assert read_card(summary.final_checkpoint)[1] == digest
    record = json.loads(storage.read_bytes(f"{run}/{RECORD_FILE}"))
    assert record["status"] == "finished" and record["final_checkpoint"] == summary.final_checkpoint

    video = corpus[0] / "videos" / "synth_0000.mp4"
    result = run_segment_job(SegmentJobConfig([str(video)], str(tmp_path / "seg"), summary.final_checkpoint,
                                              progress_interval_s=3600), log=lambda _: None)
    assert result.exit_code == ExitCode.OK and result.ok == 1 and result.frames == 10


def test_killed_worker_resumes_from_its_last_checkpoint(reference, train, tmp_path) -> None:
    output = str(tmp_path / "crash")
    summary = train(output, fail_at_step=FAIL_AT)
    # The last worker was SIGKILLed at step 5; the group restarted from the step-3 checkpoint and finished.
    assert summary.attempt_starts == [0, EVERY] and summary.final_step == STEPS
    assert [row["step"] for row in summary.history] == list(range(1, STEPS + 1))
    # Same batches, dropout and optimiser state after the restart: the losses are the uninterrupted run's.
    assert [r["loss"] for r in summary.history] == pytest.approx([r["loss"] for r in reference.history], rel=1e-5)
    assert load_checkpoint(summary.final_checkpoint).card.metadata["step"] == STEPS

    # Rerunning the finished command trains nothing; the run record says it is done.
    latest = Path(summary.latest_checkpoint) / "model.safetensors"
    stamp = latest.stat().st_mtime_ns
    again = train(output, fail_at_step=FAIL_AT)
    assert again.already_finished and again.steps_trained == 0 and again.final_step == STEPS

    # Without the record, Ray Train restores its snapshot: the workers find step 8 of 8 and train nothing.
    (Path(output) / RECORD_FILE).unlink()
    restored = train(output, fail_at_step=FAIL_AT)
    assert not restored.already_finished and restored.steps_trained == 0
    assert restored.attempt_starts == [0, EVERY] and restored.latest_checkpoint == summary.latest_checkpoint
    assert latest.stat().st_mtime_ns == stamp and checkpoint_steps(output) == [6, 8]
