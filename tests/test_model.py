"""Model construction, weights options and checkpoints."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from core.errors import CheckpointError, WeightsUnavailableError
from core.model import (
    CHECKPOINT_FORMAT,
    build_model,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def test_resnet50_head_is_dropout_plus_linear_over_the_classes():
    m = build_model(3, weights="none", arch="resnet50", dropout=0.25)
    assert isinstance(m, torchvision.models.ResNet)
    assert isinstance(m.fc[0], torch.nn.Dropout) and m.fc[0].p == 0.25
    assert m.fc[1].out_features == 3 and m.fc[1].in_features == 2048


def test_local_weights_file_is_loaded(tmp_path):
    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    m = build_model(4, weights=str(tmp_path / "r18.pth"), arch="resnet18")
    assert torch.equal(m.conv1.weight, src.conv1.weight)
    assert m.fc[1].out_features == 4  # ImageNet's 1000-way fc is ignored


def test_failed_download_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="--weights none") as exc:
        build_model(3, weights="imagenet", arch="resnet18")
    assert "--weights /path/to" in str(exc.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_model(3, weights=str(tmp_path / "nope.pth"), arch="resnet18")


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    m = build_model(3, weights="none", arch="resnet18")
    payload = {
        "format": CHECKPOINT_FORMAT, "version": 1, "arch": "resnet18", "dropout": 0.3,
        "classes": ["A", "B", "C"], "preprocess": {"img_size": 64},
        "state_dict": m.state_dict(), "val_metrics": {"macro_f1": 0.5},
        "history": [{"epoch": 1, "phase": "finetune"}], "rng": torch.get_rng_state(),
    }
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(payload, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temp file left
    ckpt = torch.load(path, weights_only=True)  # the safe loader accepts it as is
    assert ckpt["classes"] == ["A", "B", "C"]
    m2 = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(1, 3, 64, 64)
    m.eval()
    assert torch.allclose(m(x), m2(x))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot load"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CXR Insight checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import collections

    torch.save({"format": CHECKPOINT_FORMAT, "obj": collections.Counter(a=1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "x.pt")
