"""The recipe search (``python -m core.bench recipes``) on a tiny synthetic set: it screens on
the validation split, never reads the test split while screening, reuses what it screened,
and trains and tests only the recipe chosen by ``core.compare.recommend``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core import bench, compare, recipes
from core.errors import ConfigError
from tests.conftest import SMALL_CLASSES, make_dataset


def test_every_recipe_is_a_valid_training_config():
    from core import train

    for name in recipes.RECIPES:
        settings = recipes.recipe_settings(name)
        cfg = train.config_from_args(train.parse_args([], overrides=settings))
        assert cfg.train.weights == "none" and cfg.train.backbone_lr_mult == 1.0
        assert cfg.preprocess.lung_view == settings["lung_view"]
    views = {recipes.recipe_settings(n)["lung_view"] for n in recipes.RECIPES}
    assert views == {"none", "crop", "mask", "soft"}
    assert {recipes.recipe_settings(n)["img_size"] for n in recipes.RECIPES} == {128, 224}
    assert {recipes.recipe_settings(n)["arch"] for n in recipes.RECIPES} >= {"resnet50", "resnet18"}
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipes.recipe_settings("nope")


@pytest.mark.slow  # trains three small runs, one with every finishing step (about a minute)
def test_screen_on_validation_then_train_and_test_the_choice(tmp_path: Path, monkeypatch,
                                                             capsys):
    data = make_dataset(tmp_path / "data", per_class=20, classes=SMALL_CLASSES,
                        layout="database", size=64)
    out = tmp_path / "recipes"
    monkeypatch.setattr(recipes, "BASE", {**recipes.BASE, "arch": "resnet18", "img_size": 32,
                                          "epochs": 2, "precision": "fp32"})
    monkeypatch.setattr(recipes, "RECIPES", {"plain": {}, "long": {"epochs": 4}})
    argv = ["recipes", "--data-dir", str(data), "--output", str(out), "--screen-epochs", "1",
            "--resamples", "50", "--quiet"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    rows = {}
    for name, epochs in (("plain", 1), ("long", 2)):  # screening epochs in proportion
        run = out / "screen" / name / "seed0"
        doc = json.loads((run / "report" / "metrics.json").read_text())
        assert doc["run"]["split"] == "val"
        assert not (run / "best.calibration.json").exists()  # not finished: no test report
        hist = json.loads((run / "history.json").read_text())
        assert len(hist["epochs"] if isinstance(hist, dict) else hist) == epochs
        rows[name] = compare.summarise(doc, name)
        assert f"| {name} | none | resnet18 | 32 | {epochs} | light | val (1) | " \
               f"{rows[name]['accuracy']:.3f}" in printed
    rec = compare.recommend(list(rows.values()))
    assert f"Recommended: **{rec['run']}**" in printed

    # a second call reuses the screened runs: nothing is retrained
    stamp = {p: os.stat(p).st_mtime_ns for p in out.glob("screen/*/seed0/best.pt")}
    assert bench.main(argv) == 0
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp

    # the final stage trains the recommended recipe in full and reads the test split once
    assert bench.main([*argv, "--final", "auto"]) == 0
    final = out / "final" / rec["run"]
    doc = json.loads((final / "report" / "metrics.json").read_text())
    assert doc["run"]["split"] == "test"
    assert (final / "best.calibration.json").is_file() and (final / "run.json").is_file()
    printed = capsys.readouterr().out
    assert f"final: {rec['run']} trained in full" in printed
    acc = doc["at_argmax"]["overall"]["accuracy"]["value"]
    full = recipes.recipe_settings(rec["run"])["epochs"]  # full length, not the screen's
    assert f"| {rec['run']} | none | resnet18 | 32 | {full} | light | test (1) | {acc:.3f}" in printed


def test_the_cpu_lungs_preset_is_the_chosen_recipe():
    from core.config import DEFAULT_PRESET, PRESETS

    chosen = recipes.recipe_settings(recipes.CHOSEN)
    preset = PRESETS["cpu-lungs"]
    assert DEFAULT_PRESET == "cpu-lungs"
    assert {k: preset[k] for k in chosen} == chosen
    assert set(preset) - set(chosen) <= {"early_stop_patience"}
    assert preset.get("early_stop_patience", chosen["epochs"]) >= chosen["epochs"]  # no early stop
