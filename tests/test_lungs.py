"""Lung segmenter (core.lungs): shipped weights' held-out Dice, mask resolution, lung views,
lung focus, contours, and the segmenter-hash refusal."""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core import lungs, lungs_train
from core.config import PreprocessConfig
from core.errors import CheckpointError
from core.pixels import load_gray

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXR_LUNG_MASKS_DIR") or ROOT.parent / "shared" / "data" / "lung-masks")
HOLDOUT = ROOT / "assets" / "lung_segmenter_holdout.txt"
HAS_DATA = (DATA / "images").is_dir() and (DATA / "masks").is_dir()
needs_data = pytest.mark.skipif(
    not HAS_DATA,
    reason=f"lung-mask data set not found at {DATA} (set $CXR_LUNG_MASKS_DIR to a folder "
    "with images/ and masks/)",
)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Single small images run fastest on one thread, and several OpenMP threads crawl when
    other processes share the cores (the held-out test took minutes instead of seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_payload(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    params = {"base": 4, "depth": 3, "decoder_convs": 1}
    model = lungs.build_segmenter_model(params)
    return {
        "format": lungs.SEGMENTER_FORMAT,
        "version": lungs.SEGMENTER_VERSION,
        "arch": lungs.ARCH_NAME,
        "arch_params": params,
        "state_dict": model.state_dict(),
        "img_size": 64,
        "preprocess": dict(lungs.DEFAULT_PREPROCESS),
        "threshold": 0.5,
    }


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, tiny segmenter file (fast; for shapes and the hash check)."""
    path = tmp_path_factory.mktemp("seg") / "tiny.pt"
    torch.save(_tiny_payload(), path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> lungs.LungSegmenter:
    return lungs.LungSegmenter.load(tiny_path)


@pytest.fixture(scope="module")
def shipped() -> lungs.LungSegmenter:
    assert lungs.DEFAULT_SEGMENTER_PATH.is_file(), (
        f"shipped weights missing: {lungs.DEFAULT_SEGMENTER_PATH} (python -m core.lungs train)"
    )
    return lungs.default_segmenter()


def _rect_mask(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top:bottom, left:right] = True
    return m


# ---------------------------------------------------------------- (1) shipped weights' Dice


def test_shipped_weights_file() -> None:
    """The shipped file loads with weights_only into the segmenter, and its held-out list
    is the one beside it."""
    path = lungs.DEFAULT_SEGMENTER_PATH
    assert path.stat().st_size < 10 * 1024 * 1024
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    seg = lungs.LungSegmenter.load(path)
    assert seg.img_size == ckpt["img_size"] and seg.preprocess == ckpt["preprocess"]
    held = lungs_train.read_holdout(HOLDOUT)
    assert len(held) == ckpt["holdout"]["n"] and len(set(held)) == len(held)


@needs_data
def test_shipped_segmenter_heldout_dice(shipped: lungs.LungSegmenter) -> None:
    """Measured now on the held-out masks: Dice >= 0.95, and equal to the figure the
    weights file (and assets/lung_segmenter.md) states."""
    held = lungs_train.read_holdout(HOLDOUT)
    assert len(held) >= 50
    metrics = lungs_train.evaluate_dir(shipped, DATA, held, progress=False)
    assert metrics["dice"] >= 0.95, metrics
    assert metrics["iou"] >= 0.90, metrics
    assert metrics["dice"] == pytest.approx(shipped.meta["holdout_dice"], abs=2e-3)


def test_default_segmenter_is_cached(shipped: lungs.LungSegmenter) -> None:
    assert lungs.default_segmenter() is shipped
    assert shipped.sha256 == lungs.file_sha256(lungs.DEFAULT_SEGMENTER_PATH)


def test_segment_is_thread_safe(tiny: lungs.LungSegmenter) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    images = [rng.random((96 + 8 * i, 80), dtype=np.float32) for i in range(6)]
    expected = [tiny.segment(im) for im in images]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(tiny.segment, images * 2))
    for i, mask in enumerate(got):
        np.testing.assert_array_equal(mask, expected[i % len(images)])
    with ThreadPoolExecutor(max_workers=3) as pool:
        loaded = list(pool.map(lambda _: lungs.default_segmenter(), range(6)))
    assert all(seg is loaded[0] for seg in loaded)


# --------------------------------------------------- (2) resolution and connected components


@pytest.mark.parametrize("shape", [(300, 200), (190, 410), (1500, 1100)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mask_has_input_resolution(tiny: lungs.LungSegmenter, shape, dtype) -> None:
    rng = np.random.default_rng(0)
    img = rng.random(shape, dtype=np.float32)
    if dtype == np.uint8:
        img = (img * 255).astype(np.uint8)
    mask = tiny.segment(img)
    assert mask.shape == shape and mask.dtype == bool
    n_components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
    assert n_components <= 2
    assert tiny.probabilities(img).shape == shape


@needs_data
def test_shipped_segmenter_on_large_non_square_image(shipped: lungs.LungSegmenter) -> None:
    name = lungs_train.read_holdout(HOLDOUT)[0]
    gray = load_gray(DATA / "images" / name)
    target = lungs.load_mask(DATA / "masks" / name)
    big = cv2.resize(gray, (1100, 1400), interpolation=cv2.INTER_LINEAR)  # W x H
    big_target = cv2.resize(target.astype(np.uint8), (1100, 1400), interpolation=cv2.INTER_NEAREST)
    mask = shipped.segment(big)
    assert mask.shape == (1400, 1100) and mask.dtype == bool
    assert lungs_train.dice_iou(mask, big_target)[0] > 0.85


def test_keep_two_largest_components() -> None:
    m = np.zeros((100, 100), bool)
    m[5:15, 5:15] = True  # 100 px
    m[30:50, 5:25] = True  # 400 px
    m[60:90, 50:80] = True  # 900 px
    m[5:8, 90:93] = True  # 9 px
    out = lungs.keep_largest_components(m, 2)
    assert out.dtype == bool and out.shape == m.shape
    assert out.sum() == 1300
    assert out[40, 15] and out[75, 65] and not out[10, 10] and not out[6, 91]
    assert lungs.keep_largest_components(np.zeros((8, 8), bool)).sum() == 0


def test_dice_iou() -> None:
    a = _rect_mask((10, 10), 0, 0, 10, 5)
    b = _rect_mask((10, 10), 0, 0, 10, 10)
    d, j = lungs_train.dice_iou(a, b)
    assert d == pytest.approx(2 * 50 / 150) and j == pytest.approx(0.5)
    assert lungs_train.dice_iou(np.zeros((4, 4)), np.zeros((4, 4))) == (1.0, 1.0)


# ------------------------------------------------------------------------ (3) lung focus


def test_lung_energy_share_and_focus_ratio() -> None:
    mask = _rect_mask((100, 100), 20, 10, 80, 60)  # 60 x 50 = 30 % of the image
    area = mask.mean()
    equal = mask.astype(np.float32)
    outside = (~mask).astype(np.float32)
    uniform = np.full((100, 100), 0.7, np.float32)

    assert lungs.lung_energy_share(equal, mask) == pytest.approx(1.0)
    assert lungs.lung_energy_share(outside, mask) == pytest.approx(0.0)
    assert lungs.lung_energy_share(uniform, mask) == pytest.approx(area)

    assert lungs.lung_focus_ratio(uniform, mask) == pytest.approx(1.0)
    assert lungs.lung_focus_ratio(equal, mask) == pytest.approx(1.0 / area)
    assert lungs.lung_focus_ratio(outside, mask) == pytest.approx(0.0)


def test_lung_focus_resizes_mask_and_handles_degenerate_inputs() -> None:
    mask = _rect_mask((256, 256), 64, 0, 192, 128)
    heat = np.zeros((16, 16), np.float32)
    heat[4:12, 0:8] = 1.0  # the mask at the heatmap's resolution
    assert lungs.lung_energy_share(heat, mask) == pytest.approx(1.0)
    assert lungs.lung_focus_ratio(heat, mask) == pytest.approx(4.0)
    assert math.isnan(lungs.lung_energy_share(np.zeros((16, 16)), mask))
    assert math.isnan(lungs.lung_focus_ratio(np.zeros((16, 16)), mask))
    assert math.isnan(lungs.lung_focus_ratio(heat, np.zeros((16, 16), bool)))
    with pytest.raises(ValueError):
        lungs.lung_energy_share(np.full((4, 4), np.nan), np.ones((4, 4), bool))


def test_lung_energy_share_counts_only_the_region_the_model_saw() -> None:
    mask = _rect_mask((10, 10), 0, 0, 10, 5)  # left half
    heat = np.zeros((10, 10), np.float32)
    heat[:, 2] = 1.0  # on the lungs
    heat[:, 8] = 3.0  # off the lungs, but in letterbox padding
    padding = _rect_mask((10, 10), 0, 7, 10, 10)
    assert lungs.lung_energy_share(heat, mask) == pytest.approx(0.25)
    assert lungs.lung_energy_share(heat, mask, region=~padding) == pytest.approx(1.0)


def test_lung_view_full_mask_and_plausibility() -> None:
    g = np.zeros((100, 80), np.float32)
    lung = _rect_mask((100, 80), 20, 10, 70, 60)
    view = lungs.apply_lung_view(g, PreprocessConfig(lung_view="crop", lung_margin=0.0), mask=lung)
    assert np.array_equal(view.full_mask(g.shape), lung)
    fallback = lungs.apply_lung_view(g, PreprocessConfig(lung_view="crop"),
                                     mask=np.zeros((100, 80), bool))
    assert fallback.fallback and fallback.full_mask(g.shape) is None
    assert lungs.implausible(lung) == ""
    assert lungs.implausible(np.zeros((10, 10), bool)) == "no lung found"
    assert "small" in lungs.implausible(_rect_mask((100, 100), 0, 0, 2, 2))
    assert "large" in lungs.implausible(np.ones((10, 10), bool))


def test_draw_lung_contour() -> None:
    rgb = np.zeros((120, 100, 3), np.uint8)
    mask = _rect_mask((60, 50), 10, 10, 50, 40)  # drawn at double resolution
    out = lungs.draw_lung_contour(rgb, mask, color=(0, 255, 0), thickness=2)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert rgb.sum() == 0  # input untouched
    assert out[:, :, 1].max() == 255 and out[:, :, 0].max() == 0
    assert out[60, 50].sum() == 0  # interior stays
    assert lungs.draw_lung_contour(np.zeros((20, 20), np.uint8), np.zeros((20, 20))).shape == (20, 20, 3)


# ------------------------------------------------------------------------ (4) lung views


def test_apply_lung_view_crop_and_mask_shapes() -> None:
    h, w = 200, 300
    gray = np.random.default_rng(1).random((h, w), dtype=np.float32) * 0.5 + 0.5
    lung = _rect_mask((h, w), 50, 60, 150, 240)  # 100 x 180 = 30 %
    cfg = PreprocessConfig(lung_view="crop", lung_margin=0.05)
    view = lungs.apply_lung_view(gray, cfg, mask=lung)
    assert not view.fallback
    assert view.box == (50 - 10, 60 - 15, 150 + 10, 240 + 15)
    top, left, bottom, right = view.box
    assert view.image.shape == (bottom - top, right - left) and view.image.dtype == np.float32
    assert view.mask.shape == view.image.shape and view.mask.dtype == bool
    np.testing.assert_array_equal(view.image, gray[top:bottom, left:right])
    assert view.mask.sum() == lung.sum()

    mview = lungs.apply_lung_view(gray, PreprocessConfig(lung_view="mask"), mask=lung)
    assert mview.image.shape == view.image.shape and mview.box == view.box
    assert (mview.image[0, 0] == 0.0) and (mview.image[mview.mask] > 0).all()
    # Inside the dilated field (3 % of 300 px = 9 px) the image is kept.
    assert mview.image[10 - 5, 35] > 0 and mview.image[0, 35] == 0  # 5 px vs 10 px away

    # Margin clipping at the borders, and a mask given at another resolution.
    edge = _rect_mask((100, 150), 0, 0, 60, 100)
    v = lungs.apply_lung_view(gray, cfg, mask=edge)
    assert v.box[0] == 0 and v.box[1] == 0 and v.box[2] == 130 and v.box[3] == 215


def test_soft_lung_view_keeps_the_lungs_and_blurs_and_dims_the_rest() -> None:
    h, w = 200, 300
    rng = np.random.default_rng(2)
    gray = (rng.random((h, w)) * 0.4 + 0.5).astype(np.float32)  # texture everywhere
    lung = _rect_mask((h, w), 50, 60, 150, 130) | _rect_mask((h, w), 50, 170, 150, 240)
    crop = lungs.apply_lung_view(gray, PreprocessConfig(lung_view="crop"), mask=lung)
    soft = lungs.apply_lung_view(gray, PreprocessConfig(lung_view="soft"), mask=lung)
    assert soft.box == crop.box and soft.image.shape == crop.image.shape
    assert soft.image.dtype == np.float32 and not soft.fallback and "blurred" in soft.reason
    inner = soft.mask.copy()  # well inside the lungs: unchanged
    inner[:20], inner[-20:], inner[:, :20], inner[:, -20:] = False, False, False, False
    np.testing.assert_allclose(soft.image[inner], crop.image[inner], atol=1e-3)
    # between the lungs, outside the field dilated by 9 px (columns 139-161 of the image,
    # 94-116 of the crop that starts at column 45): dimmed and blurred
    band_soft, band_crop = soft.image[20:-20, 100:111], crop.image[20:-20, 100:111]
    assert band_soft.mean() < 0.5 * band_crop.mean()  # dimmed (to about 35 %)
    assert band_soft.mean() > 0.1 * band_crop.mean()  # not blanked, as "mask" does
    assert band_soft.std() < 0.3 * band_crop.std()  # the fine texture is gone


def test_apply_lung_view_fallbacks() -> None:
    gray = np.zeros((120, 160), np.float32)
    cfg = PreprocessConfig(lung_view="mask")
    v = lungs.apply_lung_view(gray, cfg, mask=np.zeros((120, 160), bool))
    assert v.fallback and "no lung" in v.reason
    assert v.image.shape == gray.shape and v.box == (0, 0, 120, 160) and not v.mask.any()
    small = _rect_mask((120, 160), 10, 10, 20, 20)
    v = lungs.apply_lung_view(gray, cfg, mask=small)
    assert v.fallback and "small" in v.reason
    v = lungs.apply_lung_view(gray, cfg, mask=np.ones((120, 160), bool))
    assert v.fallback and "large" in v.reason
    none = lungs.apply_lung_view(gray, PreprocessConfig(lung_view="none"))
    assert not none.fallback and none.image.shape == gray.shape


def test_shipped_segmenter_falls_back_on_blank_image(shipped: lungs.LungSegmenter) -> None:
    for value in (0.0, 1.0):
        gray = np.full((240, 200), value, np.float32)
        v = lungs.apply_lung_view(gray, PreprocessConfig(lung_view="crop"), segmenter=shipped)
        assert v.fallback, v.reason
        assert v.image.shape == gray.shape


@needs_data
def test_prepare_with_lung_view_uses_the_shipped_segmenter() -> None:
    from core.preprocess import prepare

    name = lungs_train.read_holdout(HOLDOUT)[1]
    gray = load_gray(DATA / "images" / name)
    cfg = PreprocessConfig(img_size=64, lung_view="crop",
                           segmenter_sha256=lungs.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))
    view = lungs.apply_lung_view(gray, cfg)
    assert not view.fallback, view.reason
    assert view.image.shape[0] < gray.shape[0] or view.image.shape[1] < gray.shape[1]
    assert prepare(gray, cfg).shape == (64, 64)


# ----------------------------------------------------------------- (5) segmenter hash check


def test_segmenter_hash_refusal(tiny: lungs.LungSegmenter, tiny_path: Path) -> None:
    gray = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    assert tiny.sha256 == lungs.file_sha256(tiny_path)
    other = PreprocessConfig(lung_view="crop", segmenter_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="another lung segmenter"):
        lungs.apply_lung_view(gray, other, segmenter=tiny)
    same = PreprocessConfig(lung_view="crop", segmenter_sha256=tiny.sha256.upper())
    lungs.apply_lung_view(gray, same, segmenter=tiny)  # no error
    unset = PreprocessConfig(lung_view="crop")
    lungs.apply_lung_view(gray, unset, segmenter=tiny)  # no hash pinned: no check
    # A precomputed mask needs no segmenter, so nothing is loaded or checked.
    v = lungs.apply_lung_view(gray, other, mask=_rect_mask((64, 64), 10, 10, 50, 50))
    assert not v.fallback


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        lungs.LungSegmenter.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(CheckpointError, match="not a CXR Insight lung segmenter"):
        lungs.LungSegmenter.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        lungs.LungSegmenter.load(junk)
    wrong = _tiny_payload()
    wrong["arch_params"] = {"base": 8, "depth": 3, "decoder_convs": 1}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        lungs.LungSegmenter.load(tmp_path / "wrong.pt")


def test_file_sha256(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    assert lungs.file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ------------------------------------------------------------------- module boundaries


def test_the_runtime_does_not_import_preprocess_or_training() -> None:
    """core.lungs (runtime) depends on core.pixels, not on core.preprocess (which applies the
    lung view) nor on core.lungs_train: the dependencies run one way."""
    import subprocess
    import sys

    code = ("import sys, core.lungs; bad = [m for m in ('core.preprocess', 'core.lungs_train') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_trains_a_segmenter_that_the_runtime_loads(tmp_path: Path) -> None:
    """``python -m core.lungs train`` (forwarded to core.lungs_train) on 12 synthetic pairs,
    1 epoch at 32 px: the weights file loads, and the held-out list is written beside it."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for i in range(12):
        mask = np.zeros((48, 40), np.uint8)
        mask[8 + i % 4: 40, 4:18] = 255
        mask[8:40, 22:36] = 255
        img = np.clip(rng.normal(90, 20, mask.shape) + (mask > 0) * 80, 0, 255).astype(np.uint8)
        for sub, arr in (("images", img), ("masks", mask)):
            (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "data" / sub / f"p{i:02d}.png"), arr)
    out = tmp_path / "seg.pt"
    res = subprocess.run(
        [sys.executable, "-m", "core.lungs", "train", "--data-dir", str(tmp_path / "data"),
         "--output", str(out), "--img-size", "32", "--depth", "3", "--base", "4",
         "--epochs", "1", "--batch-size", "4", "--threads", "1", "--eval-every", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    seg = lungs.LungSegmenter.load(out)
    held = lungs_train.read_holdout(tmp_path / "seg_holdout.txt")
    assert held == ["p00.png", "p10.png"]  # every 10th sorted file
    assert seg.img_size == 32 and seg.meta["holdout"]["n"] == 2
    assert seg.segment(np.zeros((48, 40), np.float32)).shape == (48, 40)
