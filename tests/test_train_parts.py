"""The train job's parts without a Ray cluster: synchronised BatchNorm on gloo, resumable optimiser state,
every dataset layout feeding the same pair batches, S3 staging, and refusing to resume another run."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcfm import storage
from dcfm.checkpoint import ModelCard, load_checkpoint
from dcfm.data.staging import stage_dataset
from dcfm.losses import LossWeights
from dcfm.model import DCFM, DCFMConfig
from dcfm.synth import SynthConfig, generate_corpus
from dcfm.train.cli import config_from_args
from dcfm.train.config import RunMismatchError, TrainJobConfig
from dcfm.train.data import PairStream, open_training_data, open_training_pairs
from dcfm.train.job import RECORD_FILE, run_train_job
from dcfm.train.state import (TrainState, load_optimizer_tensors, read_train_state, restore_optimizer,
                              save_training_checkpoint)
from dcfm.train.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm
from dcfm.train.recipe import AugmentConfig, OptimConfig, PairBatch, build_optimizer, train_step
from tests.test_datasets import make_camvid, make_cityscapes, make_vspw

H, W = 32, 64


# --- synchronised BatchNorm on CPU --------------------------------------------------------------------------

def _syncbn_rank(rank: int, port: int, x: torch.Tensor, g: torch.Tensor, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        reference = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
        reference[0].weight.data.uniform_(0.5, 1.5)
        reference[0].bias.data.uniform_(-0.5, 0.5)
        model = convert_sync_batchnorm(reference, torch.device("cpu"), dist.new_group(backend="gloo"))
        assert isinstance(model[0], GlooSyncBatchNorm)
        local = x[rank * 3 : rank * 3 + 3].clone().requires_grad_(True)
        out = model(local)
        (out * g[rank * 3 : rank * 3 + 3]).sum().backward()
        # As numpy arrays, pickled by value: tensors would travel as file descriptors that this process must
        # outlive, and it exits right after (a race the parent loses as ConnectionResetError).
        tensors = (out.detach(), local.grad, model[0].weight.grad, model[0].running_mean, model[0].running_var)
        queue.put((rank, *(t.numpy().copy() for t in tensors)))
    finally:
        dist.destroy_process_group()


def test_gloo_sync_batchnorm_equals_batchnorm_over_the_global_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 5, 7, generator=gen) * 3 + 1
    g = torch.randn(6, 3, 5, 7, generator=gen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_syncbn_rank, args=(r, port, x, g, queue)) for r in range(2)]
    for p in procs:
        p.start()
    received = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    results = [(r[0], *(torch.from_numpy(a) for a in r[1:])) for r in received]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    xs = x.clone().requires_grad_(True)
    out = bn(xs)
    (out * g).sum().backward()
    torch.testing.assert_close(torch.cat([r[1] for r in results]), out.detach(), rtol=1e-4, atol=1e-5)
    input_grad = torch.cat([r[2] for r in results])
    torch.testing.assert_close(input_grad, xs.grad, rtol=1e-4, atol=1e-5)
    # Each rank holds its share of the weight gradient; DDP's all-reduce sums (and averages) them.
    torch.testing.assert_close(results[0][3] + results[1][3], bn.weight.grad, rtol=1e-4, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r[4], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[5], bn.running_var, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_keeps_state_dict_names() -> None:
    model = DCFM(DCFMConfig("resnet18", num_classes=3))
    names = set(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert set(converted.state_dict()) == names
    assert any(isinstance(m, GlooSyncBatchNorm) for m in converted.modules())
    x = torch.randn(2, 3, H, W)
    converted.eval()
    with torch.no_grad():  # not initialised as distributed: plain BatchNorm behaviour
        converted(x)


# --- resumable training state -------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_training_checkpoint_restores_the_exact_next_step(tmp_path: Path, optimizer_name: str) -> None:
    config = DCFMConfig("pvt_v2_b0", num_classes=3, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batches = [PairBatch(torch.randn(2, 3, H, W, generator=gen), torch.randn(2, 3, H, W, generator=gen),
                         torch.randint(0, 3, (2, H, W), generator=gen)) for _ in range(3)]
    optim = OptimConfig(name=optimizer_name, lr=1e-3, decoder_lr_mult=10.0)
    torch.manual_seed(0)
    model = DCFM(config)
    optimizer = build_optimizer(model, optim)
    for b in batches[:2]:
        train_step(model, optimizer, b, LossWeights())
    card = ModelCard(config, ["a", "b", "c"], [(0, 0, 0), (1, 1, 1), (2, 2, 2)], (H, W), metadata={"step": 2})
    state = TrainState(2, [0], [{"step": 2, "loss": 1.0}])
    save_training_checkpoint(tmp_path / "ckpt", model, card, optimizer, state)
    expected = train_step(model, optimizer, batches[2], LossWeights()).total.item()

    loaded = load_checkpoint(tmp_path / "ckpt")  # the core's format: segment/evaluate load it as is
    restored_state, meta = read_train_state(tmp_path / "ckpt")
    assert restored_state == state and loaded.card.metadata == {"step": 2}
    model2 = loaded.model
    optimizer2 = build_optimizer(model2, optim)
    restore_optimizer(optimizer2, load_optimizer_tensors(tmp_path / "ckpt"), meta)
    got = train_step(model2, optimizer2, batches[2], LossWeights()).total.item()
    assert got == pytest.approx(expected, rel=1e-6)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-7, msg=name)


# --- every layout feeds the same batches -------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_corpus(root, SynthConfig(videos=2, frames=8, height=H, width=W, labeled_every=4, seed=0))
    return root


@pytest.mark.parametrize("layout", ["synth", "cityscapes", "vspw", "camvid"])
def test_every_layout_trains_through_the_same_pair_stream(layout: str, tmp_path: Path, synth_root: Path) -> None:
    builders = {"cityscapes": make_cityscapes, "vspw": make_vspw, "camvid": make_camvid}
    root = synth_root if layout == "synth" else builders[layout](tmp_path / layout)
    dataset = open_training_data(str(root), decoded_cache_mb=16)
    assert dataset.layout == layout
    stream = PairStream(dataset, dataset.refs, AugmentConfig(crop=(H, W)), batch_size=2, seed=0, rank=0)
    batch = stream.batch(0)
    assert batch.labeled.shape == batch.neighbour.shape == (2, 3, H, W) and batch.labeled.dtype == torch.float32
    assert batch.labels.shape == (2, H, W) and batch.labels.dtype == torch.int64
    valid = batch.labels[batch.labels != 255]
    assert valid.numel() and int(valid.max()) < len(dataset.classes)
    model = DCFM(DCFMConfig("pvt_v2_b0", num_classes=len(dataset.classes)))
    terms = train_step(model, build_optimizer(model, OptimConfig()), batch, LossWeights.for_dataset(layout))
    assert np.isfinite(terms.total.item())


def test_max_delta_draws_every_allowed_neighbour_distance_in_both_directions(synth_root: Path) -> None:
    dataset, candidates = open_training_pairs(str(synth_root), delta=1, max_delta=3)
    # Labelled frames 2 and 6 of 8: U = L ± d, an offset outside the clip falling back to the other sign.
    assert [[(r.labeled_index, r.neighbour_index) for r in c] for c in candidates] == [
        [(2, 3), (2, 1), (2, 4), (2, 0), (2, 5)], [(6, 7), (6, 5), (6, 4), (6, 3)]] * 2
    stream = PairStream(dataset, candidates, AugmentConfig(crop=(H, W)), batch_size=2, seed=0, rank=0)
    drawn = {(r.labeled_index, r.neighbour_index) for step in range(40) for r in stream.pairs(step)}
    assert drawn == {(2, 3), (2, 1), (2, 4), (2, 0), (2, 5), (6, 7), (6, 5), (6, 4), (6, 3)}
    assert stream.pairs(5) == PairStream(dataset, candidates, AugmentConfig(), 2, 0, 0).pairs(5)
    with pytest.raises(ValueError, match="max_delta"):
        TrainJobConfig(data=str(synth_root), output="/tmp/x/run", delta=2, max_delta=1)


def test_pairs_look_both_ways_at_the_official_delta(synth_root: Path) -> None:
    """δ = 1: the neighbour is the next or the previous frame, drawn per visit (the reuse path must also see past
    keyframes, which causal inference uses), and about as often each."""
    dataset, candidates = open_training_pairs(str(synth_root), delta=1)
    assert [[r.neighbour_index - r.labeled_index for r in c] for c in candidates] == [[1, -1]] * 4
    stream = PairStream(dataset, candidates, AugmentConfig(crop=(H, W)), batch_size=2, seed=0, rank=0)
    signs = [r.neighbour_index - r.labeled_index for step in range(100) for r in stream.pairs(step)]
    assert set(signs) == {1, -1} and 0.35 < signs.count(-1) / len(signs) < 0.65
    backward = stream.dataset.load(next(r for c in candidates for r in c if r.neighbour_index < r.labeled_index))
    assert backward.neighbour.shape == backward.labeled.shape


def test_synth_decoded_video_cache_returns_the_same_frames(synth_root: Path) -> None:
    plain = open_training_data(str(synth_root))
    cached = open_training_data(str(synth_root), decoded_cache_mb=16)
    for ref in plain.refs:
        a, b = plain.load(ref), cached.load(ref)
        np.testing.assert_array_equal(a.labeled, b.labeled)
        np.testing.assert_array_equal(a.neighbour, b.neighbour)
    assert cached._cache is not None and cached._cache.decodes == 2  # one decode per video


def test_s3_data_is_staged_once_into_the_same_pairs(s3_env: str, synth_root: Path, tmp_path: Path) -> None:
    fs, _ = storage.filesystem(s3_env)
    fs.put(str(synth_root) + "/", s3_env.removeprefix("s3://") + "/corpus/", recursive=True)
    local = stage_dataset(f"{s3_env}/corpus", cache_dir=tmp_path / "cache")
    again = stage_dataset(f"{s3_env}/corpus", cache_dir=tmp_path / "cache")
    assert local == again and len(list((tmp_path / "cache").iterdir())) == 2  # the tree and its lock file
    staged, original = open_training_data(str(local)), open_training_data(str(synth_root))
    strip = lambda ds, root: [(r.video_id, r.labeled_index, r.neighbour_index,  # noqa: E731
                               Path(r.label_path).relative_to(root)) for r in ds.refs]
    assert strip(staged, local) == strip(original, synth_root)
    np.testing.assert_array_equal(staged[0].labeled, original[0].labeled)
    with pytest.raises(FileNotFoundError, match="no objects under this prefix"):
        stage_dataset(f"{s3_env}/missing", cache_dir=tmp_path / "cache")


# --- the driver refuses to mix runs --------------------------------------------------------------------------

def test_rerun_with_other_settings_is_refused(tmp_path: Path, synth_root: Path) -> None:
    config = TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=10)
    Path(config.output).mkdir()
    record = {"format": "dcfm-train-run/1", "status": "running", "settings": config.run_settings()}
    (tmp_path / "run" / RECORD_FILE).write_text(json.dumps(record))
    other = TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=20, workers=3)
    with pytest.raises(RunMismatchError, match=r"steps: 10 -> 20.*new --output"):
        run_train_job(other, log=lambda _: None)
    from dcfm.cli import main

    code = main(["train", "--data", str(synth_root), "--output", str(tmp_path / "run"), "--steps", "20"])
    assert code == 2


def test_cli_builds_the_config() -> None:
    from dcfm.cli import build_parser

    args = build_parser().parse_args([
        "train", "--data", "s3://b/data", "--output", "s3://b/runs/r1", "--backbone", "pvt_v2_b0", "--workers", "2",
        "--steps", "50", "--batch-size", "3", "--crop", "64x128", "--lr", "1e-3", "--optimizer", "adamw",
        "--reuse-weight", "0", "--consistency-weight", "0", "--gpus-per-worker", "1"])
    config = config_from_args(args)
    assert config.storage_path_and_name == ("s3://b/runs", "r1")
    assert (config.workers, config.steps, config.batch_size, config.augment.crop) == (2, 50, 3, (64, 128))
    assert config.loss == LossWeights(0.0, 0.0) and config.optim.name == "adamw" and config.gpus_per_worker == 1
    assert config.optim.warmup_steps == 5  # the AdamW recipe's warm-up, capped at a tenth of the steps
    assert TrainJobConfig.from_json(config.to_json()) == config
    assert config.nonkey_scale == 1.0
    with pytest.raises(ValueError, match="run directory"):
        TrainJobConfig(data="x", output="s3://bucket")
    half = config_from_args(build_parser().parse_args(
        ["train", "--data", "d", "--output", "runs/r", "--nonkey-scale", "0.5"]))
    assert half.nonkey_scale == 0.5 and TrainJobConfig.from_json(half.to_json()) == half
    with pytest.raises(ValueError, match="nonkey_scale"):
        TrainJobConfig(data="d", output="runs/r", nonkey_scale=0.0)


def test_a_run_recorded_before_reduced_resolution_still_resumes(tmp_path: Path, synth_root: Path) -> None:
    """Records written before ``nonkey_scale`` and λ3 existed describe full-resolution training: resuming one
    with today's defaults is the same run, but asking for half-size non-keyframes is not."""
    from dcfm.train.job import _check_same_run

    config = TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=10,
                            loss=LossWeights(0.4, 10.0))
    old_settings = config.run_settings()
    del old_settings["nonkey_scale"]
    del old_settings["loss"]["similarity"]
    record = {"format": "dcfm-train-run/1", "status": "running", "settings": old_settings}
    _check_same_run(config, record)
    with pytest.raises(RunMismatchError, match=r"nonkey_scale: 1.0 -> 0.5"):
        _check_same_run(TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=10,
                                       loss=LossWeights(0.4, 10.0), nonkey_scale=0.5), record)


def test_a_half_scale_run_resumes_with_the_shallow_layers_it_started_with(tmp_path: Path, synth_root: Path) -> None:
    """A reduced-resolution run begun before the half-size pass had its own shallow layers resumes as it began
    (shared layers), not with today's default, and its later checkpoints say so."""
    from dcfm.model import LowresShallow
    from dcfm.train.loop import _setup

    config = TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=10, nonkey_scale=0.5,
                            augment=AugmentConfig(crop=(H, W)))
    fresh = _setup(config, 0, 1, torch.device("cpu"), None)
    assert fresh.model.config.lowres_shallow is LowresShallow.OWN
    old_config = replace(fresh.card.config, lowres_shallow=LowresShallow.SHARED)
    old_model = DCFM(old_config)
    save_training_checkpoint(tmp_path / "ckpt", old_model, replace(fresh.card, config=old_config),
                             build_optimizer(old_model, config.optim), TrainState(3, [0], []))
    resumed = _setup(config, 0, 1, torch.device("cpu"), (str(tmp_path / "ckpt"), "its storage"))
    assert resumed.model.shallow_lowres is None and resumed.state.step == 3
    assert resumed.card.config.lowres_shallow is LowresShallow.SHARED
    for name, tensor in old_model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_logged_rows_carry_the_similarity_term_of_reduced_resolution_models(tmp_path: Path, synth_root: Path,
                                                                            scale: float, capsys) -> None:
    from dcfm.train.loop import train_locally

    run = train_locally(TrainJobConfig(data=str(synth_root), output=str(tmp_path / "run"), steps=2, batch_size=2,
                                       log_every=1, checkpoint_every=2, augment=AugmentConfig(crop=(H, W)),
                                       nonkey_scale=scale), device="cpu")
    rows = run.state.history
    assert [row["step"] for row in rows] == [1, 2]
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] step")]
    assert len(logged) == 2
    if scale == 1.0:
        assert all("similarity" not in row for row in rows) and not any(" sim " in line for line in logged)
    else:
        assert all(row["similarity"] > 0 for row in rows) and all(" sim " in line for line in logged)
