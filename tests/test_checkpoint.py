"""Checkpoints: round trip, completion marker, mismatch and tamper detection, no unpickling."""

import hashlib
import json

import pytest
import torch

from dcfm.checkpoint import CheckpointError, ModelCard, is_checkpoint, load_checkpoint, read_card, save_checkpoint
from dcfm.model import DCFM, DCFMConfig


def card_for(config: DCFMConfig) -> ModelCard:
    n = config.num_classes
    return ModelCard(config, [f"c{i}" for i in range(n)], [(i, i, i) for i in range(n)], train_size=(64, 128))


def test_round_trip(tmp_path) -> None:
    config = DCFMConfig("pvt_v2_b0", num_classes=3)
    model = DCFM(config).eval()
    digest = save_checkpoint(tmp_path / "ckpt", model, card_for(config))
    assert is_checkpoint(tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.digest == digest and loaded.card == card_for(config)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))


def test_incomplete_checkpoint_is_not_one(tmp_path) -> None:
    config = DCFMConfig("resnet18", num_classes=2)
    save_checkpoint(tmp_path / "ckpt", DCFM(config), card_for(config))
    (tmp_path / "ckpt" / "dcfm.json").unlink()
    assert not is_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="save did not finish"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_mismatch_is_a_clear_error(tmp_path) -> None:
    config = DCFMConfig("resnet18", num_classes=2)
    save_checkpoint(tmp_path / "ckpt", DCFM(config), card_for(config))
    card_path = tmp_path / "ckpt" / "dcfm.json"
    card = json.loads(card_path.read_text())
    card["config"]["num_classes"] = 5
    card["class_names"] = list("abcde")
    card["palette"] = [[0, 0, 0]] * 5
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not fit the architecture.*5 classes"):
        load_checkpoint(tmp_path / "ckpt")


def test_tampered_weights_are_rejected(tmp_path) -> None:
    config = DCFMConfig("resnet18", num_classes=2)
    save_checkpoint(tmp_path / "ckpt", DCFM(config), card_for(config))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ckpt")


def test_pickle_is_never_loaded(tmp_path) -> None:
    """A torch.save pickle in place of the weights is refused, not executed."""
    config = DCFMConfig("resnet18", num_classes=2)
    save_checkpoint(tmp_path / "ckpt", DCFM(config), card_for(config))
    weights = tmp_path / "ckpt" / "model.safetensors"
    torch.save(DCFM(config).state_dict(), weights)
    # Make the digest match so the loader really has to look at the payload.
    card_path = tmp_path / "ckpt" / "dcfm.json"
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "ckpt")


def test_card_validation() -> None:
    with pytest.raises(ValueError, match="class names"):
        ModelCard(DCFMConfig("resnet18", 3), ["a"], [(0, 0, 0)], (8, 8))
    with pytest.raises(ValueError, match="unknown DCFM config fields"):
        DCFMConfig.from_dict({"backbone": "resnet18", "colour": "red"})


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        read_card(tmp_path / "nope")
