"""Dataset discovery, the leakage-guarded split, and the manifest."""

from __future__ import annotations

import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DataConfig
from core.data import build_manifest, discover, group_duplicates
from core.errors import DatasetError
from tests.conftest import blob_image, make_dataset, write_png


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


def test_real_x_rays_group_only_with_their_planted_copies(real_dir, tmp_path):
    """Real X-rays (12 per class, copied to a temporary folder) plus planted copies of one of
    them: a 16-bit version, a resized one and a JPEG. The copies join the original's group,
    in one split, and no two different real X-rays are merged."""
    root = tmp_path / "real"
    originals = []
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        for src in sorted((real_dir / cls / "images").glob("*.png"))[:12]:
            dst = root / cls / "images" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            originals.append(dst.relative_to(root).as_posix())
    src = root / originals[0]
    gray = np.asarray(Image.open(src).convert("L"))
    planted = {"COVID/images/copy-16bit.png": gray.astype(np.uint16) * 257,
               "COVID/images/copy-small.png": np.asarray(Image.fromarray(gray).resize((150, 150)))}
    for rel, arr in planted.items():
        write_png(root / rel, arr)
    Image.fromarray(gray).save(root / "COVID" / "images" / "copy.jpg", quality=75)
    m = build_manifest(DataConfig(data_dir=str(root)), progress=False)
    by_path = {r["path"]: r for r in m.rows}
    copies = [originals[0], *planted, "COVID/images/copy.jpg"]
    assert len({by_path[p]["dup_group"] for p in copies}) == 1
    assert len({by_path[p]["split"] for p in copies}) == 1
    assert m.duplicate_groups == 1 and m.duplicate_images == len(copies)
    assert len({by_path[p]["dup_group"] for p in originals}) == len(originals)


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


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_16bit_images_hash_as_the_8bit_image_the_model_sees(tmp_path):
    """Distinct 16-bit X-rays get distinct perceptual hashes (Pillow's ``convert("L")``
    clipped them all to white: identical hashes), and a 16-bit copy of an 8-bit image
    (scaled by bit depth, x257) hashes like the 8-bit original and joins its group."""
    from core.data import file_hashes

    rng = np.random.default_rng(0)
    eight = [blob_image(rng, k, 96) for k in range(3)]
    paths8 = [write_png(tmp_path / f"img{k}.png", a) for k, a in enumerate(eight)]
    paths16 = [write_png(tmp_path / f"img{k}-16.png", a.astype(np.uint16) * 257)
               for k, a in enumerate(eight)]
    assert Image.open(paths16[0]).mode.startswith("I")  # really stored as 16-bit
    dist = DataConfig().near_dup_distance
    h8 = [file_hashes(p)[1] for p in paths8]
    h16 = [file_hashes(p)[1] for p in paths16]
    for i in range(3):
        assert h16[i] == h8[i]
        for j in range(i + 1, 3):
            assert _hamming(h16[i], h16[j]) > dist, (i, j)
    groups = group_duplicates([file_hashes(p)[0] for p in paths8 + paths16], h8 + h16, dist)
    assert groups[:3] == groups[3:] and len(set(groups)) == 3


def test_an_image_unreadable_after_the_manifest_fails_with_its_name(tmp_path):
    """A file that became unreadable after the split was written is an error naming it,
    never a blank image that would be trained on or scored."""
    from core.config import PreprocessConfig
    from core.data import CXRDataset
    from core.preprocess import build_transform

    root = make_dataset(tmp_path / "ds", per_class=12)
    m = build_manifest(DataConfig(data_dir=str(root)), progress=False)
    rows = m.split("test")
    ds = CXRDataset(root, rows, m.classes, build_transform(PreprocessConfig(img_size=32)))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == m.classes.index(rows[0]["class"])
    (root / rows[1]["path"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=f"{rows[1]['path']}.*Restore the file"):
        ds[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    with pytest.raises(DatasetError, match=rows[1]["path"]):
        list(loader)


def test_image_cache_gives_the_same_inputs_and_reads_each_file_once(tmp_path, monkeypatch):
    """Training's cache keeps each image's deterministic preparation; the augmented inputs
    are those of the uncached dataset under the same seeds, and files are read once."""
    import core.data as data_mod
    from core.config import AugmentConfig, PreprocessConfig
    from core.data import CXRDataset
    from core.preprocess import build_transform
    from tests.conftest import make_dataset

    root = make_dataset(tmp_path / "ds", per_class=4)
    rows = [{"path": f"{c}/{c}-{i}.png", "class": c} for c in "ABC" for i in range(4)]
    pp = PreprocessConfig(img_size=32)
    aug = AugmentConfig(crop_scale=0.7, gamma=0.2, erase_periphery=0.5)
    reads = []
    real = data_mod.load_gray
    monkeypatch.setattr(data_mod, "load_gray", lambda p: reads.append(p) or real(p))
    plain = CXRDataset(root, rows, "ABC", build_transform(pp, train=True, augment=aug, seed=1))
    cached = CXRDataset(root, rows, "ABC", build_transform(pp, train=True, augment=aug, seed=1),
                        cache={})
    for epoch in range(3):
        plain.transform.reseed(epoch)
        cached.transform.reseed(epoch)
        for i in range(len(rows)):
            a, b = plain[i], cached[i]
            assert a[1] == b[1] and torch.equal(a[0], b[0])
    assert len(reads) == 3 * len(rows) + len(rows)  # the cached dataset read each file once
