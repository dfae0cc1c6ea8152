"""One reader for a run's splits (``core.data.run_split_rows``): a manifest that differs from
the one the checkpoint was trained on stops evaluation, OOD and int8 calibration with an
error that says what changed, unless the caller explicitly goes on."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from core import data as D
from core.errors import ManifestChangedError
from core.model import load_checkpoint


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def move_one_image(manifest: Path, src: str, dst: str) -> str:
    """Move the first ``src`` image of the manifest to ``dst``; returns its path."""
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    row = next(r for r in rows if r["split"] == src)
    row["split"] = dst
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return row["path"]


def test_a_changed_manifest_stops_every_reader_and_says_what_changed(small_run: Path,
                                                                     tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path / "run")
    import json

    data = json.loads((run / "config.json").read_text())["data"]["data_dir"]
    ckpt = load_checkpoint(run / "best.pt")
    rows, notes = D.run_split_rows(run, data, ckpt, ("train", "val", "test"))
    assert notes == [] and {len(rows[s]) for s in rows} and all(rows.values())
    n_train, n_test = len(rows["train"]), len(rows["test"])

    moved = move_one_image(run / "manifest.csv", "train", "test")
    with pytest.raises(ManifestChangedError) as err:
        D.run_split_rows(run, data, ckpt, ("test",))
    msg = str(err.value)
    assert f"train: {n_train} -> {n_train - 1} images" in msg
    assert f"test: {n_test} -> {n_test + 1} images" in msg
    assert "val" not in msg.split("changed:")[1].split(".")[0]  # val is unchanged
    assert "--allow-manifest-change" in msg
    # the same reader serves the OOD statistics and the reduced-precision check
    from core import export, ood

    with pytest.raises(ManifestChangedError):
        ood.calibrate_run_ood(run, data, progress=False)
    with pytest.raises(ManifestChangedError):
        export.check_reduced_precisions(run, data)
    # going on is explicit, and the warning says the same
    rows, notes = D.run_split_rows(run, data, ckpt, ("test",), allow_manifest_change=True)
    assert moved in {r["path"] for r in rows["test"]}
    assert len(notes) == 1 and f"test: {n_test} -> {n_test + 1} images" in notes[0]


def test_the_evaluate_cli_needs_the_flag_to_go_on(small_run: Path, tmp_path: Path) -> None:
    import json

    from core import evaluate as E

    run = copy_run(small_run, tmp_path / "run")
    data = json.loads((run / "config.json").read_text())["data"]["data_dir"]
    move_one_image(run / "manifest.csv", "val", "test")
    args = ["--checkpoint", str(run / "best.pt"), "--data-dir", data, "--bootstrap", "0",
            "--no-occlusion", "--no-lung-focus", "--no-progress", "--output", str(tmp_path / "r")]
    assert E.main(args) == 2 and not (tmp_path / "r" / "metrics.json").exists()
    assert E.main([*args, "--allow-manifest-change"]) == 0
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert any("val: " in w and "test: " in w for w in doc["run"]["warnings"])
