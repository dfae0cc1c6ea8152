"""The shipped demo model (``core.demo``): int8 weights dequantised at load, the build, the
files beside the weights matching them, the run selection and the serving graph's place.

The build is tested on the seconds-fast ``small_run`` (``--from-run``). The shipped demo
itself (``assets/demo``, built once from the chosen recipe) is checked where it is present:
its size, its non-pickle loading and its sidecars' hashes always; that its report is what
``core.evaluate`` gives for its weights on ``../shared/data/cxr-real`` in the full suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core import demo, runs
from core.errors import CheckpointError
from core.files import file_sha256
from core.model import (
    INT8_WEIGHT_FORMAT,
    build_model,
    dequantize_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    quantize_state_dict,
    quantized_checkpoint,
    save_checkpoint,
)
from tests.conftest import REAL_DIR, ROOT, SMALL_CLASSES, require_real

SHIPPED = ROOT / "assets" / "demo"
PROB_TOL = 1e-6


# ---------------------------------------------------------------- int8 weights


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(3, weights="none", arch="resnet18")
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def test_dequantised_weights_lie_within_half_an_int8_step_of_the_originals():
    state = _state()
    q, scales = quantize_state_dict(state)
    deq = dequantize_state_dict(q, scales)
    assert set(deq) == set(state)
    weights = [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]
    assert set(scales) == set(weights) and "fc.1.weight" in scales and "conv1.weight" in scales
    for name, w in state.items():
        if name in scales:
            assert q[name].dtype == torch.int8 and int(q[name].abs().max()) <= 127
            step = scales[name].view((-1,) + (1,) * (w.dim() - 1))
            # per output channel: the largest weight maps to +-127, each within half a step
            amax = w.abs().reshape(w.shape[0], -1).amax(1)
            torch.testing.assert_close(scales[name], amax / 127, rtol=0, atol=0)
            assert bool(((deq[name] - w).abs() <= step / 2 + 1e-7).all()), name
        else:  # biases, BatchNorm and counters are kept exactly
            assert torch.equal(deq[name], w), name


def test_an_int8_checkpoint_loads_without_pickle_and_predicts_like_its_dequantised_weights(
        tmp_path):
    state = _state(1)
    ckpt = {"format": "cxr-insight-checkpoint", "version": 1, "arch": "resnet18",
            "classes": list(SMALL_CLASSES), "preprocess": {"img_size": 64}, "dropout": 0.0,
            "state_dict": state}
    path = tmp_path / "best.pt"
    save_checkpoint(quantized_checkpoint(ckpt), path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types
    assert raw["weight_format"] == INT8_WEIGHT_FORMAT
    assert raw["state_dict"]["layer1.0.conv1.weight"].dtype == torch.int8
    # 1 byte per conv/linear weight: well under half the fp32 file
    fp32 = tmp_path / "fp32.pt"
    save_checkpoint(ckpt, fp32)
    assert path.stat().st_size < 0.3 * fp32.stat().st_size

    loaded = load_checkpoint(path)
    assert loaded["state_dict"]["layer1.0.conv1.weight"].dtype == torch.float32
    assert "weight_scales" not in loaded
    by_hand = build_model(3, weights="none", arch="resnet18", dropout=0.0)
    by_hand.load_state_dict(dequantize_state_dict(raw["state_dict"], raw["weight_scales"]))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(loaded)(x), by_hand.eval()(x))


def test_a_checkpoint_in_an_unknown_weight_format_is_refused(tmp_path):
    ckpt = {"format": "cxr-insight-checkpoint", "version": 1, "arch": "resnet18",
            "classes": ["a", "b"], "preprocess": {}, "state_dict": {},
            "weight_format": "int4-magic"}
    save_checkpoint(ckpt, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="int4-magic"):
        load_checkpoint(tmp_path / "best.pt")


# ---------------------------------------------------------------- a built demo


def check_shipped(folder: Path) -> None:
    """What every shipped demo must satisfy: at most 30 MB, weights that load with
    ``weights_only`` (no code unpickled), and every file fitted on them stamped with the
    SHA-256 of that ``best.pt``."""
    from safetensors import safe_open

    best = folder / "best.pt"
    assert demo.folder_bytes(folder) <= demo.MAX_BYTES
    raw = torch.load(best, map_location="cpu", weights_only=True)
    assert raw["weight_format"] == INT8_WEIGHT_FORMAT
    sha = file_sha256(best)
    assert json.loads((folder / "best.calibration.json").read_text())["weights_sha256"] == sha
    with safe_open(str(folder / "best.ood.safetensors"), "pt") as f:
        assert f.metadata()["weights_sha256"] == sha
    report = json.loads((folder / "report" / "metrics.json").read_text())
    assert report["run"]["checkpoint_sha256"] == sha
    assert json.loads((folder / "run.json").read_text())["weights_sha256"] == sha
    for name in ("config.json", "history.json", "dataset.json", "manifest.csv", "demo.json",
                 "MODEL_CARD.md", "report/predictions.csv"):
        assert (folder / name).is_file(), name
    for name in ("best.onnx", "best.int8.onnx", "segmenter.onnx", "last.pt", "serving.json"):
        assert not (folder / name).exists(), name


def check_report_reproduced(folder: Path, data_dir: Path, out: Path) -> None:
    """The stored report against a fresh ``core.evaluate`` of the shipped weights on the
    test split: same accuracy, confusion matrix and per-image probabilities (1e-6)."""
    from core.evaluate import evaluate

    fresh_path = evaluate(folder / "best.pt", data_dir, "test", out, progress=False)
    stored = json.loads((folder / "report" / "metrics.json").read_text())
    fresh = json.loads(Path(fresh_path).read_text())
    assert fresh["n"] == stored["n"]
    assert fresh["overall"]["accuracy"]["value"] == stored["overall"]["accuracy"]["value"]
    assert (fresh["at_argmax"]["confusion_matrix"]["counts"]
            == stored["at_argmax"]["confusion_matrix"]["counts"])
    a = pd.read_csv(folder / "report" / "predictions.csv").set_index("path").sort_index()
    b = pd.read_csv(out / "predictions.csv").set_index("path").sort_index()
    assert list(a.index) == list(b.index)
    assert (a["predicted_class"] == b["predicted_class"]).all()
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert probs and np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max() <= PROB_TOL


def test_the_build_ships_int8_weights_and_files_that_match_them(small_demo, small_run):
    check_shipped(small_demo)
    doc = json.loads((small_demo / "demo.json").read_text())
    assert doc["weight_format"] == INT8_WEIGHT_FORMAT and doc["recipe"] == "small-run"
    assert 0 < doc["max_weight_error_steps"] <= 0.5 + 1e-4  # fp32 rounding at the half
    assert doc["fp32_weights_sha256"] == file_sha256(small_run / "best.pt")
    # the shipped weights against the fp32 ones they came from, on the same test images
    theirs = pd.read_csv(small_run / "report" / "predictions.csv").set_index("path")
    ours = pd.read_csv(small_demo / "report" / "predictions.csv").set_index("path")
    same = int((theirs["predicted_class"] == ours.loc[theirs.index, "predicted_class"]).sum())
    assert doc["fp32_agreement"] == {"n": len(theirs), "same": same}
    # the data folder is recorded relative to the repository's root, as on every clone
    data = Path(runs.load_run(small_run).data_dir)
    rel = Path(json.loads((small_demo / "config.json").read_text())["data"]["data_dir"])
    assert not rel.is_absolute() and (ROOT / rel).resolve() == data.resolve()
    report = json.loads((small_demo / "report" / "metrics.json").read_text())
    assert Path(report["run"]["data_dir"]) == rel
    assert load_checkpoint(small_demo / "best.pt")["data_config"]["data_dir"] == rel.as_posix()


def test_the_stored_report_is_what_evaluate_gives_for_the_shipped_weights(small_demo,
                                                                          small_run, tmp_path):
    check_report_reproduced(small_demo, Path(runs.load_run(small_run).data_dir),
                            tmp_path / "fresh")


def test_the_build_is_deterministic(small_demo, small_run, tmp_path):
    again = demo.build(tmp_path / "demo", runs.load_run(small_run).data_dir, from_run=small_run,
                       recipe="small-run", progress=False)
    first, second = (torch.load(f / "best.pt", map_location="cpu", weights_only=True)
                     for f in (small_demo, again))
    assert set(first) == set(second)
    for key in ("state_dict", "weight_scales"):
        assert all(torch.equal(first[key][k], second[key][k]) for k in first[key]), key
    # the same but for where each was built (the checkpoint records its output folder)
    assert second["train_config"].pop("output") != first["train_config"].pop("output")
    assert {k: v for k, v in first.items() if k not in ("state_dict", "weight_scales")} == {
        k: v for k, v in second.items() if k not in ("state_dict", "weight_scales")}
    for name in ("report/predictions.csv", "manifest.csv", "dataset.json"):
        assert (again / name).read_bytes() == (small_demo / name).read_bytes(), name
    configs = [json.loads((f / "config.json").read_text()) for f in (small_demo, again)]
    for c in configs:
        c["train"].pop("output")
    assert configs[0] == configs[1]
    a, b = (json.loads((f / "report" / "metrics.json").read_text()) for f in (small_demo, again))
    assert a["overall"] == b["overall"] and a["at_argmax"] == b["at_argmax"]


def test_the_demo_is_labelled_with_its_counts_and_test_figures(small_demo):
    run = runs.load_run(small_demo)
    assert run.is_demo and run.name == runs.DEMO_NAME
    assert not any("serving.json" in m for m in run.missing)  # fp32 serves, no check needed
    counts = json.loads((small_demo / "dataset.json").read_text())["counts"]
    report = json.loads((small_demo / "report" / "metrics.json").read_text())
    acc = report["overall"]["accuracy"]
    text = demo.label(run)
    assert text.startswith(f"Demo model: trained on {sum(counts['train'].values())} images of "
                           f"3 classes (no Lung Opacity), tested on {report['n']}; research "
                           "use only.")
    assert (f"Test accuracy {100 * acc['value']:.1f}% (95% CI {100 * acc['ci95'][0]:.1f}%–"
            f"{100 * acc['ci95'][1]:.1f}%)") in text
    card = (small_demo / "MODEL_CARD.md").read_text()
    for needle in ("Chowdhury", "arXiv:2012.02238", "states no licence", "Shortcut probe",
                   f"{100 * acc['value']:.1f}%", "no Lung Opacity", "Not a medical device",
                   "int8"):
        assert needle in card, needle


def test_the_demo_comes_after_the_users_runs_and_can_be_hidden(small_demo, small_run, tmp_path,
                                                               monkeypatch):
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("CXR_DEMO", "1")
    only = runs.selectable_runs(empty, small_demo)
    assert [r.name for r in only] == [runs.DEMO_NAME] and only[0].path == small_demo
    both = runs.selectable_runs(small_run.parent, small_demo)
    assert [r.name for r in both] == ["small", runs.DEMO_NAME]  # the user's run is the default
    monkeypatch.setenv("CXR_DEMO", "0")
    assert runs.selectable_runs(empty, small_demo) == []
    assert [r.name for r in runs.selectable_runs(small_run.parent, small_demo)] == ["small"]


def test_serving_the_demo_exports_into_the_cache_never_into_its_folder(small_demo, tmp_path,
                                                                        monkeypatch):
    from core.inference import Predictor

    monkeypatch.setenv("CXR_DATA_HOME", str(tmp_path / "home"))
    before = sorted(p.name for p in small_demo.rglob("*"))
    predictor = Predictor.from_checkpoint(small_demo / "best.pt")
    assert predictor.network == "onnx-fp32"
    sha = file_sha256(small_demo / "best.pt")
    assert (tmp_path / "home" / "cache" / f"demo-{sha[:12]}" / "best.onnx").is_file()
    assert sorted(p.name for p in small_demo.rglob("*")) == before
    # the served answer is the report's for a test image
    records = pd.read_csv(small_demo / "report" / "predictions.csv")
    row = records.iloc[0]
    data = Path(runs.load_run(small_demo).data_dir)
    pred = predictor.predict((data / row["path"]).read_bytes(), name="x.png")
    assert pred.label == row["predicted_class"]
    for cls in predictor.classes:
        assert pred.probabilities[cls] == pytest.approx(row[f"prob_{cls}"], abs=1e-4)


def test_the_build_refuses_to_empty_a_folder_that_is_not_a_demo(small_run, tmp_path):
    from core.errors import ConfigError

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier demo build"):
        demo.build(target, runs.load_run(small_run).data_dir, from_run=small_run,
                   progress=False)
    assert (target / "notes.txt").read_text() == "keep me"


def test_the_build_command_line_documents_its_options():
    help_text = demo.build_parser()._subparsers._group_actions[0].choices["build"].format_help()
    for option in ("--from-run", "--data-dir", "--output", "--max-mb", "--quiet"):
        assert option in help_text


# ---------------------------------------------------------------- the shipped demo


def _require_shipped() -> Path:
    if not (SHIPPED / "best.pt").is_file():
        pytest.skip(f"no shipped demo at {SHIPPED}: build it with `python -m core.demo build`")
    return SHIPPED


def test_the_shipped_demo_fits_30_mb_loads_without_pickle_and_its_files_match_it():
    check_shipped(_require_shipped())


@pytest.mark.slow
def test_the_shipped_demo_report_is_what_evaluate_gives_on_the_real_x_rays(tmp_path):
    folder = _require_shipped()
    require_real()
    check_report_reproduced(folder, REAL_DIR, tmp_path / "fresh")
