"""The preprocessing contract: decoding, resizing, CLAHE, normalisation, augmentation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import AugmentConfig, PreprocessConfig
from core.preprocess import build_transform, clahe, load_gray, prepare, resize, to_gray


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 30000, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    gray = load_gray(path)
    np.testing.assert_allclose(gray[0], arr[0] / 65535.0, rtol=1e-6)
    # Pillow's convert("L") would clip every value above 255 to white:
    assert (np.asarray(Image.open(path).convert("L"))[0] == 255).sum() >= 3


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_every_8bit_mode_becomes_the_same_gray(mode):
    base = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    img = Image.fromarray(base).convert(mode)
    gray = to_gray(Image.open(io.BytesIO(png_bytes(img))))
    assert gray.dtype == np.float32 and gray.shape == base.shape
    np.testing.assert_allclose(gray, base / 255.0, atol=1.5 / 255)


def test_arrays_are_accepted():
    u16 = np.full((8, 8), 65535, np.uint16)
    assert to_gray(u16).max() == pytest.approx(1.0)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    assert to_gray(rgb)[0, 0] == pytest.approx(0.587, abs=1e-3)


def test_letterbox_keeps_aspect_ratio_and_centres(tmp_path):
    wide = np.ones((100, 200), np.float32)  # 2:1
    out = resize(wide, 64, "letterbox")
    assert out.shape == (64, 64)
    rows = np.nonzero(out.max(axis=1) > 0.5)[0]
    assert rows.min() == 16 and rows.max() == 47  # 32 rows of content, centred
    assert out[:16].max() == 0 and out[48:].max() == 0  # black padding
    stretched = resize(wide, 64, "stretch")
    assert stretched.min() == pytest.approx(1.0)


def test_clahe_is_applied_after_resize_and_is_deterministic():
    rng = np.random.default_rng(0)
    big = (rng.random((512, 512)) * 0.3 + 0.2).astype(np.float32)
    cfg = PreprocessConfig(img_size=64)
    a, b = prepare(big, cfg), prepare(big, cfg)
    assert a.shape == (64, 64) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    u8 = (resize(big, 64) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(a, clahe(u8, 2.0, 8))
    # CLAHE spreads a low-contrast image's histogram:
    assert a.std() > u8.std()


def test_transform_output_is_normalised_three_identical_channels():
    cfg = PreprocessConfig(img_size=32, clahe=False)
    gray = np.full((50, 50), 102 / 255, np.float32)
    x = build_transform(cfg)(gray)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # each channel is the same image, normalised with its own ImageNet mean/std
    for c in range(3):
        v = (x[c] * cfg.std[c] + cfg.mean[c])
        assert torch.allclose(v, torch.full_like(v, 102 / 255), atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_normalisation_is_bit_identical_to_the_torch_formula(channels):
    """core.preprocess.normalize runs in NumPy (single-threaded); its output must be exactly
    ``(u8 / 255 - mean) / std`` as torch computes it in float32, for every uint8 value."""
    from core.preprocess import normalize

    cfg = PreprocessConfig(channels=channels)
    u8 = np.concatenate([np.arange(256, dtype=np.uint8),
                         np.random.default_rng(0).integers(0, 256, 256 * 255, dtype=np.uint8)])
    u8 = u8.reshape(256, 256)
    x = torch.from_numpy(u8).float().div_(255.0)
    mean = torch.tensor(cfg.mean[:channels]).view(channels, 1, 1)
    std = torch.tensor(cfg.std[:channels]).view(channels, 1, 1)
    expected = (x.unsqueeze(0) - mean) / std
    out = normalize(u8, cfg)
    assert out.dtype == torch.float32 and out.shape == (channels, 256, 256)
    assert out.is_contiguous()
    assert torch.equal(out, expected)


def test_training_augmentation_is_seeded_and_off_for_eval():
    gray = np.random.default_rng(1).random((80, 80)).astype(np.float32)
    cfg = PreprocessConfig(img_size=48)
    aug = AugmentConfig(p=1.0)
    a = build_transform(cfg, train=True, augment=aug, seed=3)(gray)
    b = build_transform(cfg, train=True, augment=aug, seed=3)(gray)
    plain = build_transform(cfg)(gray)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert torch.equal(plain, build_transform(cfg, train=False, augment=aug)(gray))


def test_hflip_is_off_by_default():
    assert AugmentConfig().hflip is False


def test_shift_augmentation_moves_the_image_and_is_validated():
    """``translate`` shifts the anatomy (a bright square's centre moves); zero keeps the
    random draws of a seed unchanged; out-of-range values are refused."""
    from core.errors import ConfigError
    from core.preprocess import build_augment

    img = np.zeros((64, 64), np.uint8)
    img[24:40, 24:40] = 255
    still = dict(rotate_deg=0.0, brightness=0.0, contrast=0.0, p=1.0)

    def centre(a: np.ndarray) -> np.ndarray:
        return np.argwhere(a > 127).mean(axis=0)

    shifted = [centre(build_augment(AugmentConfig(translate=0.2, **still), seed=s)(img))
               for s in range(6)]
    assert max(float(np.abs(c - 31.5).max()) for c in shifted) >= 3  # moved by pixels
    same = build_augment(AugmentConfig(translate=0.0, **still), seed=0)(img)
    assert np.array_equal(same, img)
    default, explicit = AugmentConfig(), AugmentConfig(translate=0.0, scale=0.0)
    assert np.array_equal(build_augment(default, seed=4)(img), build_augment(explicit, seed=4)(img))
    for bad in (dict(translate=0.6), dict(scale=-0.1), dict(p=1.5)):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad)


def test_stronger_augmentation_is_seeded_off_by_default_and_erases_only_border_bands():
    from core.errors import ConfigError
    from core.preprocess import ERASE_MAX_BAND, build_augment

    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 200 + 40).astype(np.uint8)  # no zero pixel anywhere
    strong = AugmentConfig(crop_scale=0.6, gamma=0.3, blur=0.5, noise=0.05, erase_periphery=1.0)
    f1, f2 = (build_augment(strong, seed=3, img_size=64) for _ in range(2))
    a = [f1(img), f1(img)]
    assert np.array_equal(a[0], f2(img)) and np.array_equal(a[1], f2(img))  # a seed fixes them
    assert not np.array_equal(a[0], a[1])
    assert all(x.shape == img.shape for x in a)
    assert not np.array_equal(a[0], build_augment(AugmentConfig(), seed=3, img_size=64)(img))
    # off (the default): the same draws as a config that never heard of these options
    plain = AugmentConfig(crop_scale=0.0, gamma=0.0, blur=0.0, noise=0.0, erase_periphery=0.0)
    assert np.array_equal(build_augment(AugmentConfig(), seed=5)(img),
                          build_augment(plain, seed=5, img_size=64)(img))
    # border erasing alone: zeros only in bands along the borders, never the centre
    erase = AugmentConfig(rotate_deg=0.0, brightness=0.0, contrast=0.0, erase_periphery=1.0)
    band = round(ERASE_MAX_BAND * 64)
    f = build_augment(erase, seed=0, img_size=64)
    erased_any = False
    for _ in range(20):
        out = f(img)
        zero = out == 0
        assert not zero[band:-band, band:-band].any()
        np.testing.assert_array_equal(out[~zero], img[~zero])  # the rest untouched
        rows, cols = np.nonzero(zero)
        erased_any |= bool(zero.any())
        for r, c in zip(rows, cols, strict=True):  # each zero lies in a full-length band
            assert zero[r, :].all() or zero[:, c].all()
    assert erased_any
    for bad in (dict(crop_scale=0.1), dict(gamma=1.5), dict(blur=2.0), dict(erase_periphery=-1)):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad)
