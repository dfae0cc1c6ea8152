"""Procedural chest-radiograph phantoms with known lesions (tests and an offline demo).

Each phantom is a frontal (PA) chest radiograph drawn from simple shapes: a dark
background, the soft-tissue outline of the body, two dark lung fields (the one on the
image's right, the patient's left, is smaller because the heart shadow overlaps it), a
brighter mediastinum and spine, clavicles, faint rib arcs, blur and film noise. Position
(up to ``SHIFT``), size (``SCALE``), lung and heart sizes, exposure and noise vary per image,
enough that the default near-duplicate guard of ``core.data`` keeps phantoms apart.

A finding is drawn as a *density field* in [0, 1] inside the lungs and added to the image;
its lesion mask is where that field (smoothed) exceeds a quarter of its peak, so a
heatmap can be scored against where the finding really is (pointing game). Findings are at
least a seventh of the image side across, so the 7x7 map of a ResNet's ``layer4`` at
224 px can resolve them.

* ``COVID``: bilateral, peripheral, lower-zone ground-glass opacity (hazy, soft-edged)
  with a crazy-paving network of thickened septa; one side usually denser than the other.
* ``Lung_Opacity``: one focal consolidation (a dense, irregular blob with air
  bronchograms) in a random lung and zone.
* ``Viral Pneumonia``: a diffuse perihilar interstitial pattern (streaky, reticular density
  radiating from both hila).
* ``Normal``: none (empty mask).

:func:`write_dataset` writes the plain layout ``<root>/<Class>/*.png`` that
:func:`core.data.discover` reads, plus the lesion masks in ``<root>/_masks/<Class>/`` under
the same file names (``discover`` ignores folders whose names start with ``_``).

    python -m core.synthetic --output data/phantoms --n-per-class 50 --size 224 --seed 0
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.errors import ConfigError

log = logging.getLogger(__name__)

CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
MASK_DIR = "_masks"
SHIFT = 0.08  # max shift of the chest, as a fraction of the image side
SCALE = (0.85, 1.08)  # range of the chest's size
MASK_THRESHOLD = 0.25  # fraction of the (smoothed) density peak that counts as lesion


@dataclass(frozen=True)
class Lung:
    """A lung field as an ellipse in unit coordinates (x right, y down)."""

    cx: float
    cy: float
    rx: float
    ry: float
    lateral: int  # -1: lateral side is towards image left; +1: towards image right


@dataclass(frozen=True)
class Anatomy:
    """The randomised geometry of one phantom (unit coordinates)."""

    right: Lung  # patient's right lung = image left
    left: Lung  # patient's left lung = image right (smaller: heart)
    heart: tuple[float, float, float, float]  # cx, cy, rx, ry
    mid_x: float  # mediastinum / spine centre line
    dy: float  # vertical shift of the whole chest
    scale: float  # size of the whole chest

    @property
    def lungs(self) -> tuple[Lung, Lung]:
        return self.right, self.left


# ---------------------------------------------------------------- small field helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) unit coordinates of pixel centres."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             soft: float) -> np.ndarray:
    """Soft ellipse indicator: 1 inside, 0 outside, a smooth edge ``soft`` (unit) wide."""
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    edge = soft / min(rx, ry)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise with correlation length ``scale`` (unit)."""
    sigma = max(0.5, scale * size)
    n = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return (n - n.mean()) / (n.std() + 1e-6)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), max(0.3, sigma_px)) if sigma_px > 0 else a


def _polyline(layer: np.ndarray, pts: np.ndarray, thickness: int, value: float = 1.0) -> None:
    size = layer.shape[0]
    p = np.round(pts * size).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(layer, [p], isClosed=False, color=float(value), thickness=max(1, thickness),
                  lineType=cv2.LINE_AA)


# ---------------------------------------------------------------- anatomy


def _anatomy(rng: np.random.Generator) -> Anatomy:
    dx, dy = rng.uniform(-SHIFT, SHIFT, 2)
    s = rng.uniform(*SCALE)
    mid = 0.5 + dx
    right = Lung(cx=mid - 0.185 * s, cy=0.5 + dy - 0.03 * s, rx=0.135 * s * rng.uniform(0.9, 1.1),
                 ry=0.25 * s * rng.uniform(0.9, 1.1), lateral=-1)
    left = Lung(cx=mid + 0.19 * s, cy=0.5 + dy - 0.02 * s, rx=0.125 * s * rng.uniform(0.9, 1.1),
                ry=0.235 * s * rng.uniform(0.9, 1.1), lateral=1)
    heart = (mid + 0.07 * s, 0.5 + dy + 0.14 * s, 0.135 * s * rng.uniform(0.92, 1.08),
             0.115 * s * rng.uniform(0.92, 1.08))
    return Anatomy(right=right, left=left, heart=heart, mid_x=mid, dy=dy, scale=s)


def _lung_field(yy: np.ndarray, xx: np.ndarray, a: Anatomy) -> np.ndarray:
    """Soft mask of both lungs with the heart shadow cut out."""
    lungs = np.maximum(*(_ellipse(yy, xx, lu.cx, lu.cy, lu.rx, lu.ry, 0.02) for lu in a.lungs))
    heart = _ellipse(yy, xx, *a.heart, 0.03)
    return lungs * (1.0 - heart)


def _ribs(size: int, a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Faint posterior rib arcs across both lungs (a [0, 1] layer)."""
    layer = np.zeros((size, size), np.float32)
    t = np.linspace(0.0, 1.0, 40)
    thick = max(1, round(size / 75))
    for lung in a.lungs:
        top = lung.cy - lung.ry * 1.05
        gap = lung.ry * 2.1 / 9
        for k in range(9):
            y0 = top + k * gap + rng.uniform(-0.004, 0.004)
            width = lung.rx * 2.3
            x = a.mid_x + lung.lateral * (0.02 + t * width)
            y = y0 - 0.035 * np.sin(np.pi * t * 0.9) + 0.06 * t**2
            _polyline(layer, np.stack([x, y], axis=1), thick)
    return _blur(layer, size / 220)


def _clavicles(size: int, a: Anatomy) -> np.ndarray:
    layer = np.zeros((size, size), np.float32)
    t = np.linspace(0.0, 1.0, 30)
    for side in (-1, 1):
        x = a.mid_x + side * (0.03 + 0.27 * t) * a.scale
        y = a.right.cy - a.right.ry * 0.95 - 0.03 * t + 0.025 * np.sin(np.pi * t)
        _polyline(layer, np.stack([x, y], axis=1), round(size / 32))
    return _blur(layer, size / 150)


def _spine(yy: np.ndarray, xx: np.ndarray, a: Anatomy, size: int) -> np.ndarray:
    band = np.clip(1.0 - np.abs(xx - a.mid_x) / (0.028 * a.scale), 0.0, 1.0)
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * yy / 0.045)
    return _blur((band * vertebrae).astype(np.float32), size / 200)


def _mediastinum(yy: np.ndarray, xx: np.ndarray, a: Anatomy) -> np.ndarray:
    return _ellipse(yy, xx, a.mid_x, 0.5 + a.dy - 0.16 * a.scale, 0.06 * a.scale,
                    0.3 * a.scale, 0.03)


def _draw_anatomy(size: int, a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image in grey levels 0..255 float, soft lung mask)."""
    yy, xx = _grid(size)
    img = np.full((size, size), 12.0, np.float32)
    s, cy = a.scale, 0.5 + a.dy
    body = np.maximum(_ellipse(yy, xx, a.mid_x, cy + 0.1 * s, 0.46 * s, 0.55 * s, 0.03),
                      _ellipse(yy, xx, a.mid_x, cy - 0.45 * s, 0.09 * s, 0.2 * s, 0.02))  # + neck
    img += body * (95.0 + 10.0 * _smooth_noise(rng, size, 0.1))
    lungs = _lung_field(yy, xx, a)
    lung_level = 40.0 + 5.0 * _smooth_noise(rng, size, 0.05) + 25.0 * yy  # denser at the bases
    img = img * (1.0 - lungs) + lung_level * lungs
    img += 30.0 * _mediastinum(yy, xx, a) * (1.0 - lungs)
    img += 13.0 * _ribs(size, a, rng) * body
    img += 55.0 * _clavicles(size, a)
    img += 60.0 * _spine(yy, xx, a, size)
    return img, lungs


# ---------------------------------------------------------------- findings


def _side_weights(rng: np.random.Generator) -> tuple[float, float]:
    """Bilateral findings are rarely symmetric: one side at full density, the other less."""
    weaker = float(rng.uniform(0.55, 1.0))
    return (1.0, weaker) if rng.random() < 0.5 else (weaker, 1.0)


def _voronoi_edges(rng: np.random.Generator, size: int, cell: float, width: float) -> np.ndarray:
    """A [0, 1] polygonal line network (edges of random Voronoi cells ``cell`` wide)."""
    from scipy.spatial import cKDTree

    n = max(4, int(round(1.0 / cell**2)))
    seeds = rng.random((n, 2))
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    pts = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1).reshape(-1, 2)
    d, _ = cKDTree(seeds).query(pts, k=2)
    gap = (d[:, 1] - d[:, 0]).reshape(size, size)
    return np.clip(1.0 - gap / width, 0.0, 1.0).astype(np.float32)


def _covid(size: int, a: Anatomy, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bilateral peripheral lower-zone ground glass with a crazy-paving pattern: hazy blobs
    at both lateral bases, crossed by a fine polygonal network of thickened septa."""
    yy, xx = _grid(size)
    f = np.zeros((size, size), np.float32)
    for lung, weight in zip(a.lungs, _side_weights(rng), strict=True):
        cx = lung.cx + lung.lateral * lung.rx * rng.uniform(0.3, 0.45)
        cy = lung.cy + lung.ry * rng.uniform(0.35, 0.5)
        sx, sy = rng.uniform(0.055, 0.07) * a.scale, rng.uniform(0.07, 0.09) * a.scale
        blob = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        f = np.maximum(f, weight * blob)
    haze = 0.75 + 0.25 * _smooth_noise(rng, size, 0.015)
    septa = _blur(_voronoi_edges(rng, size, 0.05 * a.scale, 0.012), size / 300)
    return np.clip(f * (0.6 * haze + 0.8 * septa), 0, None) * lungs


def _opacity(size: int, a: Anatomy, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One focal consolidation: a dense, irregular-edged blob in one lung and zone, with
    air bronchograms (dark branching airways) inside it."""
    yy, xx = _grid(size)
    lung = a.lungs[int(rng.integers(2))]
    zone = rng.choice([-0.5, 0.0, 0.45])
    cx = lung.cx + lung.rx * rng.uniform(-0.3, 0.3)
    cy = lung.cy + lung.ry * zone
    r0 = rng.uniform(0.08, 0.1) * a.scale
    r = np.sqrt(((xx - cx) / r0) ** 2 + ((yy - cy) / (r0 * rng.uniform(0.85, 1.2))) ** 2)
    r = r * (1.0 + 0.18 * _smooth_noise(rng, size, 0.02))  # irregular border
    f = np.exp(-(r**4))  # flat, dense core with a fairly sharp edge
    airways = np.zeros((size, size), np.float32)
    hx, hy = lung.cx - lung.lateral * lung.rx * 0.6, lung.cy  # airways come from the hilum
    base = np.arctan2(cy - hy, cx - hx)
    for ang in base + rng.uniform(-0.35, 0.35, 4):
        t = np.linspace(0.0, 1.0, 16)[:, None]
        length = np.hypot(cx - hx, cy - hy) + r0 * rng.uniform(0.3, 0.9)
        pts = np.array([hx, hy]) + t * length * np.array([np.cos(ang), np.sin(ang)])
        _polyline(airways, pts + rng.normal(0, 0.003, pts.shape).cumsum(axis=0),
                  max(1, round(size / 110)))
    return np.clip(f * (1.0 - 0.55 * _blur(airways, size / 300)), 0, None) * lungs


def _viral(size: int, a: Anatomy, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perihilar interstitial pattern: streaks radiating from both hila, reticular texture."""
    yy, xx = _grid(size)
    streaks = np.zeros((size, size), np.float32)
    envelope = np.zeros((size, size), np.float32)
    thick = max(1, round(size / 150))
    for lung, weight in zip(a.lungs, _side_weights(rng), strict=True):
        hx = lung.cx - lung.lateral * lung.rx * 0.55
        hy = lung.cy + rng.uniform(-0.03, 0.03)
        base = 0.0 if lung.lateral > 0 else np.pi  # pointing laterally
        for ang in base + rng.uniform(-1.3, 1.3, 16):
            length = rng.uniform(0.12, 0.2) * a.scale
            t = np.linspace(0.0, 1.0, 12)[:, None]
            wobble = rng.normal(0, 0.008, (12, 2)).cumsum(axis=0)
            pts = np.array([hx, hy]) + t * length * np.array([np.cos(ang), np.sin(ang)]) + wobble
            _polyline(streaks, pts, thick)
        d2 = ((xx - hx) ** 2 + (yy - hy) ** 2) / (0.1 * a.scale) ** 2
        envelope = np.maximum(envelope, weight * np.exp(-0.5 * d2))
    reticular = np.clip(_smooth_noise(rng, size, 0.008), 0, None) * 0.35
    f = (_blur(streaks, size / 200) + reticular + 0.35) * envelope
    return f / max(float(f.max()), 1e-6) * lungs


FINDINGS: dict[str, tuple[Callable[..., np.ndarray] | None, float]] = {
    # class: (density field, added grey levels at density 1)
    "COVID": (_covid, 55.0),
    "Lung_Opacity": (_opacity, 85.0),
    "Normal": (None, 0.0),
    "Viral Pneumonia": (_viral, 85.0),
}


def lesion_mask(density: np.ndarray) -> np.ndarray:
    """Where a finding is: its density field, smoothed, above a quarter of its peak."""
    size = density.shape[0]
    smooth = _blur(density.astype(np.float32), size / 90)
    peak = float(smooth.max())
    if peak <= 0:
        return np.zeros(density.shape, bool)
    return smooth > MASK_THRESHOLD * peak


# ---------------------------------------------------------------- public API


def make_phantom(cls: str, rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """One phantom of class ``cls``: (uint8 grey image HxW, bool lesion mask HxW)."""
    if cls not in FINDINGS:
        raise ConfigError(f"class {cls!r} has no phantom; choose one of: {', '.join(FINDINGS)}")
    if size < 32:
        raise ConfigError(f"size={size} is too small; use 32 or more")
    a = _anatomy(rng)
    img, lungs = _draw_anatomy(size, a, rng)
    draw, amp = FINDINGS[cls]
    if draw is None:
        mask = np.zeros((size, size), bool)
    else:
        density = draw(size, a, lungs, rng)
        img += amp * rng.uniform(0.85, 1.15) * density
        mask = lesion_mask(density)
    img = _blur(img, size / 250)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-8.0, 8.0)
    img = img * gain + offset + rng.normal(0.0, rng.uniform(2.5, 5.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def write_dataset(root: str | Path, n_per_class: int, classes: Sequence[str] = CLASSES,
                  size: int = 224, seed: int = 0) -> Path:
    """Write ``<root>/<Class>/<Class>-<i>.png`` and ``<root>/_masks/<Class>/<same>.png``.

    Masks are 8-bit PNGs (255 = lesion). The same ``seed`` gives the same files.
    """
    root = Path(root)
    if n_per_class < 1:
        raise ConfigError("n_per_class must be at least 1")
    rng = np.random.default_rng(seed)
    for cls in classes:
        img_dir, mask_dir = root / cls, root / MASK_DIR / cls
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, mask = make_phantom(cls, rng, size)
            name = f"{cls.replace(' ', '_')}-{i:04d}.png"
            Image.fromarray(img).save(img_dir / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / name)
    log.info("Wrote %d phantoms per class (%s) at %d px to %s", n_per_class,
             ", ".join(classes), size, root)
    return root


def mask_path(root: str | Path, rel: str) -> Path:
    """The lesion mask of an image ``<Class>/<name>.png`` (a path relative to ``root``)."""
    return Path(root) / MASK_DIR / rel


def load_mask(root: str | Path, rel: str) -> np.ndarray:
    """The bool lesion mask written beside image ``rel`` by :func:`write_dataset`."""
    with Image.open(mask_path(root, rel)) as m:
        return np.asarray(m.convert("L")) > 127


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m core.synthetic",
        description="Write a folder of synthetic chest-radiograph phantoms with lesion masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--output", required=True, help="dataset root to write")
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        write_dataset(args.output, args.n_per_class, args.classes, args.size, args.seed)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
