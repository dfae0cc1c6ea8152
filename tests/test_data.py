"""Dataset discovery, the leakage-guarded split, and the manifest."""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from core.config import DataConfig
from core.data import build_manifest, discover, group_duplicates
from core.errors import DatasetError
from tests.conftest import make_dataset, write_png


def test_discover_plain_layout(tmp_path):
    root = make_dataset(tmp_path / "plain", per_class=5, classes=("Normal", "COVID", "Zeta"))
    (root / "README.txt").write_text("not a class")
    ds = discover(root)
    assert ds.layout == "plain"
    assert ds.classes == ["COVID", "Normal", "Zeta"]  # stable, sorted order
    assert ds.counts() == {"COVID": 5, "Normal": 5, "Zeta": 5}


def test_discover_database_layout_with_masks_and_metadata(tmp_path):
    root = make_dataset(tmp_path / "db", per_class=4, classes=("COVID", "Normal"), layout="database")
    write_png(root / "COVID" / "masks" / "COVID-0.png", np.zeros((64, 64), np.uint8))
    (root / "COVID.metadata.xlsx").write_bytes(b"placeholder")
    ds = discover(root)
    assert ds.layout == "database"
    assert ds.classes == ["COVID", "Normal"]
    assert ds.masks == {"COVID/images/COVID-0.png": "COVID/masks/COVID-0.png"}
    assert set(ds.metadata) == {"COVID"}


def test_discover_real_database(real_dir):
    ds = discover(real_dir)
    assert ds.layout == "database"
    assert ds.classes == ["COVID", "Normal", "Viral Pneumonia"]
    assert ds.counts() == {"COVID": 450, "Normal": 450, "Viral Pneumonia": 450}


def test_split_is_reproducible_and_stratified(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=40)
    a = build_manifest(DataConfig(data_dir=str(root), seed=7), progress=False)
    b = build_manifest(DataConfig(data_dir=str(root), seed=7), progress=False)
    c = build_manifest(DataConfig(data_dir=str(root), seed=8), progress=False)
    assert a.to_csv() == b.to_csv() and a.sha256() == b.sha256()
    assert a.to_csv() != c.to_csv()
    for split, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        for cls, n in a.summary()[split].items():
            assert abs(n - 40 * frac) <= 1, (split, cls, n)


def test_real_split_is_stratified(real_dir):
    m = build_manifest(DataConfig(data_dir=str(real_dir)), progress=False)
    s = m.summary()
    for cls in m.classes:
        assert abs(s["test"][cls] - 0.15 * 450) <= 2 and abs(s["val"][cls] - 0.15 * 450) <= 2


def test_duplicate_guard_keeps_planted_duplicates_together(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=20)
    src = root / "A" / "A-0.png"
    img = Image.open(src)
    shutil.copy(src, root / "A" / "exact-copy.png")  # exact duplicate
    img.resize((50, 50)).save(root / "A" / "resized-copy.png")  # near duplicate
    img.save(root / "A" / "jpeg-copy.jpg", quality=70)  # near duplicate
    arr = np.asarray(img, np.float32)
    Image.fromarray(np.clip(arr * 1.1 + 5, 0, 255).astype(np.uint8)).save(root / "B" / "bright.png")
    for seed in range(5):
        m = build_manifest(DataConfig(data_dir=str(root), seed=seed), progress=False)
        by_path = {r["path"]: r for r in m.rows}
        group = {by_path[p]["dup_group"] for p in ("A/A-0.png", "A/exact-copy.png",
                 "A/resized-copy.png", "A/jpeg-copy.jpg", "B/bright.png")}
        assert len(group) == 1
        splits = {r["split"] for r in m.rows if r["dup_group"] in group}
        assert len(splits) == 1, f"seed {seed}: duplicates spread over {splits}"
        assert m.duplicate_groups >= 1 and m.duplicate_images >= 5


def test_group_duplicates_unions_exact_and_near():
    sha = ["a", "b", "a", "c", "d"]
    far = (1 << 200) - 1  # far from 0 in Hamming distance
    ph = [0, far, 12345 << 100, 1, far ^ 0b111]
    groups = group_duplicates(sha, ph, max_distance=4)
    assert groups[0] == groups[2] == groups[3]  # exact (0,2); near (0,3): 1 bit
    assert groups[1] == groups[4]  # 3 bits apart
    assert groups[0] != groups[1]


def test_real_set_near_duplicate_count_is_reported(real_dir, caplog):
    caplog.set_level("INFO")
    m = build_manifest(DataConfig(data_dir=str(real_dir)), progress=False)
    sizes = Counter(r["dup_group"] for r in m.rows)
    assert m.duplicate_groups == sum(1 for v in sizes.values() if v > 1)
    assert f"{m.duplicate_groups} duplicate groups holding {m.duplicate_images} images" in caplog.text


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found.*--data-dir"):
        discover(tmp_path / "nope")


def test_no_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="No class folders"):
        discover(tmp_path)


def test_empty_class_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=3, classes=("A", "B"))
    (root / "Empty").mkdir()
    with pytest.raises(DatasetError, match="no images.*Empty"):
        discover(root)


def test_too_few_images_for_a_split(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=3, classes=("A", "B"))
    with pytest.raises(DatasetError, match="too few for a train/val/test split"):
        build_manifest(DataConfig(data_dir=str(root)), progress=False)


def test_corrupt_files_are_skipped_and_listed(tmp_path, caplog):
    root = make_dataset(tmp_path / "ds", per_class=12)
    (root / "A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "B" / "empty.jpg").write_bytes(b"")
    m = build_manifest(DataConfig(data_dir=str(root)), progress=False)
    assert sorted(p for p, _ in m.skipped) == ["A/broken.png", "B/empty.jpg"]
    assert len(m.rows) == 36
    assert "Skipping unreadable image A/broken.png" in caplog.text


def test_manifest_round_trip(tmp_path):
    from core.data import load_manifest

    root = make_dataset(tmp_path / "ds", per_class=10)
    m = build_manifest(DataConfig(data_dir=str(root)), progress=False)
    m.save(tmp_path / "run" / "manifest.csv")
    back = load_manifest(tmp_path / "run" / "manifest.csv", root)
    assert back.sha256() == m.sha256() and back.classes == m.classes
    per_split = defaultdict(set)
    for r in back.rows:
        per_split[r["split"]].add(r["path"])
    assert not (per_split["train"] & per_split["test"])
