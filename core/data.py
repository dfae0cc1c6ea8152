"""Dataset discovery, leakage-guarded stratified splitting, the split manifest, and a torch Dataset.

Two folder layouts are understood:

* the COVID-19 Radiography Database: ``<root>/<Class>/images/*.png`` (optional
  ``<Class>/masks/*.png`` lung masks and ``<root>/<Class>.metadata.xlsx``);
* the plain layout: ``<root>/<Class>/*.{png,jpg,jpeg}``.

Classes are the class folders, sorted by name: that order is stored in the manifest and the
checkpoint and never changes for the same data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.config import DataConfig
from core.errors import CheckpointError, DatasetError, InvalidImageError, ManifestChangedError
from core.preprocess import Transform, load_gray, load_gray_bytes, to_uint8

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "class", "split", "sha1", "phash", "dup_group")


@dataclass
class Dataset:
    """What :func:`discover` found."""

    root: Path
    layout: str  # "database" or "plain"
    classes: list[str]
    items: list[tuple[str, str]]  # (path relative to root, class)
    masks: dict[str, str] = field(default_factory=dict)  # image rel path -> mask rel path
    metadata: dict[str, Path] = field(default_factory=dict)  # class -> metadata.xlsx

    def counts(self) -> dict[str, int]:
        c = Counter(cls for _, cls in self.items)
        return {k: c[k] for k in self.classes}


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
    )


def discover(root: str | Path) -> Dataset:
    """Find classes and images under ``root`` (either layout); raise DatasetError if unusable."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(
            f"Dataset folder not found: {root}. Pass --data-dir or set $CXR_DATA_DIR to a "
            "folder with one sub-folder per class (e.g. the COVID-19 Radiography Database)."
        )
    if not root.is_dir():
        raise DatasetError(f"Dataset path is not a folder: {root}")
    class_dirs = sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )
    if not class_dirs:
        raise DatasetError(
            f"No class folders in {root}. Expected <root>/<Class>/images/*.png "
            "(COVID-19 Radiography Database layout) or <root>/<Class>/*.png."
        )
    layout = "database" if any((d / "images").is_dir() for d in class_dirs) else "plain"
    items: list[tuple[str, str]] = []
    masks: dict[str, str] = {}
    metadata: dict[str, Path] = {}
    classes: list[str] = []
    empty: list[str] = []
    for d in class_dirs:
        img_dir = d / "images" if layout == "database" else d
        if layout == "database" and not img_dir.is_dir():
            log.warning("Skipping %s: no images/ folder inside it", d)
            continue
        files = _images_in(img_dir)
        if not files:
            empty.append(d.name)
            continue
        classes.append(d.name)
        mask_dir = d / "masks"
        for f in files:
            rel = f.relative_to(root).as_posix()
            items.append((rel, d.name))
            m = mask_dir / f.name
            if layout == "database" and m.is_file():
                masks[rel] = m.relative_to(root).as_posix()
        meta = root / f"{d.name}.metadata.xlsx"
        if meta.is_file():
            metadata[d.name] = meta
    if empty:
        raise DatasetError(
            f"Class folder(s) with no images in {root}: {', '.join(empty)}. "
            f"Add {'/'.join(IMAGE_EXTS)} images or remove the folder."
        )
    if len(classes) < 2:
        raise DatasetError(f"Need at least 2 classes in {root}; found {classes or 'none'}.")
    return Dataset(root=root, layout=layout, classes=classes, items=items, masks=masks,
                   metadata=metadata)


# ---------------------------------------------------------------- hashing and duplicates


PHASH_SIZE = 16  # 16x16 = 256-bit pHash


def file_hashes(path: Path) -> tuple[str, int]:
    """(sha1 of the bytes, 256-bit perceptual hash) of one image file.

    The pHash is taken of the 8-bit image the model sees: the preprocessing contract's
    grayscale decode (:func:`core.preprocess.load_gray_bytes`, 16-bit data scaled by its bit
    depth) rounded to 8 bits. Pillow's ``convert("L")`` would clip 16-bit data to white, so
    distinct 16-bit X-rays would all hash alike. A 256-bit pHash (imagehash,
    ``hash_size=16``) rather than the usual 64-bit one: every chest X-ray shares the same
    low-frequency layout, and on the shared real set the 64-bit hash put different patients
    within 4 bits of each other (false merges). Raises InvalidImageError (a ValueError) for
    a file that cannot be decoded.
    """
    import imagehash

    data = path.read_bytes()
    sha1 = hashlib.sha1(data).hexdigest()
    seen = Image.fromarray(to_uint8(load_gray_bytes(data)))
    ph = imagehash.phash(seen, hash_size=PHASH_SIZE)
    return sha1, int(str(ph), 16)


def _words(phashes: Sequence[int]) -> np.ndarray:
    """256-bit ints -> (n, 4) uint64 words."""
    mask = (1 << 64) - 1
    return np.array(
        [[(p >> (64 * k)) & mask for k in range(4)] for p in phashes], dtype=np.uint64
    ).reshape(len(phashes), 4)


def near_duplicate_pairs(phashes: Sequence[int], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose 256-bit hashes differ in at most ``max_distance`` bits.

    Vectorised all-pairs Hamming distance in row blocks (21k images: ~2x10^8 pairs, seconds).
    """
    h = _words(phashes)
    n = len(h)
    pairs: list[tuple[int, int]] = []
    block = 256
    for start in range(0, n, block):
        rows = h[start : start + block]
        dist = np.bitwise_count(rows[:, None, :] ^ h[None, :, :]).sum(axis=2, dtype=np.int32)
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        keep = jj > ii
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    return pairs


def group_duplicates(sha1s: Sequence[str], phashes: Sequence[int], max_distance: int) -> list[int]:
    """Union-find over exact (same sha1) and near (pHash) duplicates; returns a group id per item."""
    n = len(sha1s)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, s in enumerate(sha1s):
        if s in first:
            union(first[s], i)
        else:
            first[s] = i
    for i, j in near_duplicate_pairs(phashes, max_distance):
        union(i, j)
    return [find(i) for i in range(n)]


# ---------------------------------------------------------------- splitting


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    rows: list[dict[str, str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicate_images: int = 0  # images that share a group with at least one other
    duplicate_groups: int = 0

    def split(self, name: str) -> list[dict[str, str]]:
        return [r for r in self.rows if r["split"] == name]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_csv().encode()).hexdigest()

    def split_digests(self) -> dict[str, dict[str, Any]]:
        """Per split: its image count and the SHA-256 of its sorted ``path,class,sha1`` lines
        (stored in checkpoints, so that a changed manifest can say which split changed)."""
        out = {}
        for s in SPLITS:
            lines = sorted(f"{r['path']},{r['class']},{r['sha1']}" for r in self.split(s))
            out[s] = {"n": len(lines),
                      "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_csv())
        tmp.replace(path)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {s: dict.fromkeys(self.classes, 0) for s in SPLITS}
        for r in self.rows:
            out[r["split"]][r["class"]] += 1
        return out


def load_manifest(path: str | Path, root: str | Path) -> Manifest:
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or set(MANIFEST_FIELDS) - set(rows[0]):
        raise DatasetError(f"{path} is not a CXR Insight manifest (columns {MANIFEST_FIELDS}).")
    classes = sorted({r["class"] for r in rows})
    return Manifest(root=Path(root), classes=classes, rows=rows)


def run_split_rows(
    run_dir: str | Path,
    data_dir: str | Path,
    ckpt: Mapping[str, Any],
    splits: Sequence[str],
    *,
    allow_manifest_change: bool = False,
) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
    """The rows of a finished run's splits, read from ``run_dir/manifest.csv`` and checked
    against its checkpoint ``ckpt``: the one reader of a run's splits (evaluation,
    calibration, OOD and int8 statistics).

    Returns ``({split: rows}, warnings)``. Raises :class:`~core.errors.ManifestChangedError`,
    saying which splits changed, when the manifest is not the one the checkpoint was trained
    on (its ``manifest_sha256``), unless ``allow_manifest_change`` (then the same text is a
    warning); CheckpointError without a manifest or with classes the checkpoint lacks;
    DatasetError for an empty split or images missing under ``data_dir``.
    """
    if not isinstance(ckpt, Mapping):
        raise TypeError("run_split_rows takes the run's checkpoint dict (it checks the manifest "
                        "hash and the classes against it), not a list of classes")
    path = Path(run_dir) / "manifest.csv"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this step needs the run's split manifest "
                              "beside the checkpoint (written by core.train).")
    manifest = load_manifest(path, data_dir)
    warnings: list[str] = []
    expected = ckpt.get("manifest_sha256")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected and expected != actual:
        text = (f"{path} is not the manifest the checkpoint was trained on (sha256 "
                f"{actual[:12]}, trained on {str(expected)[:12]}); changed: "
                f"{'; '.join(manifest_changes(manifest, ckpt.get('manifest_splits')))}. "
                "The images evaluated or fitted on may overlap the training images")
        if not allow_manifest_change:
            raise ManifestChangedError(
                f"{text}. Restore the run's manifest.csv, or pass --allow-manifest-change "
                "(allow_manifest_change=True) to go on anyway.")
        log.warning("%s (going on: --allow-manifest-change)", text)
        warnings.append(f"{text}.")
    classes = list(ckpt["classes"])
    out = {s: manifest.split(s) for s in splits}
    for name, rows in out.items():
        if not rows:
            raise DatasetError(f"The manifest {path} has no {name!r} images.")
        unknown = sorted({r["class"] for r in rows} - set(classes))
        if unknown:
            raise CheckpointError(f"Manifest classes {unknown} are not classes of the "
                                  f"checkpoint ({classes}).")
        missing = [r["path"] for r in rows if not (Path(data_dir) / r["path"]).is_file()]
        if missing:
            trained_on = (ckpt.get("data_config") or {}).get("data_dir", "?")
            raise DatasetError(
                f"{len(missing)} of {len(rows)} {name} images are missing under {data_dir} "
                f"(e.g. {missing[0]}). Manifest paths are relative to the dataset root; pass "
                f"the --data-dir the run was trained on (the checkpoint says {trained_on}).")
    return out, warnings


def manifest_changes(manifest: Manifest, recorded: Mapping[str, Any] | None) -> list[str]:
    """What differs per split between ``manifest`` and the split digests a checkpoint
    recorded (:meth:`Manifest.split_digests`); without those (older checkpoints), the
    manifest's split sizes now."""
    now = manifest.split_digests()
    if not recorded:
        sizes = ", ".join(f"{s} {now[s]['n']}" for s in SPLITS)
        return [f"unknown (the checkpoint records no split sizes; the manifest now has {sizes} "
                "images)"]
    out = []
    for s in SPLITS:
        old = recorded.get(s) or {"n": 0, "sha256": ""}
        if old.get("sha256") == now[s]["sha256"]:
            continue
        if int(old.get("n", 0)) != now[s]["n"]:
            out.append(f"{s}: {old.get('n', 0)} -> {now[s]['n']} images")
        else:
            out.append(f"{s}: {now[s]['n']} images, not the same ones")
    return out or ["row order or columns only (every split holds the same images)"]


def _assign_splits(
    group_of: list[int], labels: list[str], classes: list[str], cfg: DataConfig
) -> list[str]:
    """Stratified split of duplicate groups: every member of a group gets the same split."""
    rng = np.random.default_rng(cfg.seed)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, idx in sorted(members.items()):
        majority = Counter(labels[i] for i in idx).most_common(1)[0][0]
        by_class[majority].append(g)
    split_of = [""] * len(labels)
    for cls in classes:
        groups = by_class.get(cls, [])
        order = rng.permutation(len(groups))
        n = sum(len(members[groups[k]]) for k in order)
        n_test = round(n * cfg.test_frac)
        n_val = round(n * cfg.val_frac)
        if n_test < 1 or n_val < 1 or n - n_test - n_val < 1:
            raise DatasetError(
                f"Class {cls!r} has {n} image(s): too few for a train/val/test split "
                f"({1 - cfg.val_frac - cfg.test_frac:.0%}/{cfg.val_frac:.0%}/{cfg.test_frac:.0%}). "
                "Add images (at least 7 per class)."
            )
        counts = {"test": 0, "val": 0}
        for k in order:
            g = groups[k]
            size = len(members[g])
            if counts["test"] < n_test:
                s = "test"
            elif counts["val"] < n_val:
                s = "val"
            else:
                s = "train"
            if s in counts:
                counts[s] += size
            for i in members[g]:
                split_of[i] = s
    return split_of


def build_manifest(cfg: DataConfig, progress: bool = True) -> Manifest:
    """Discover, hash, group duplicates and split. Same data + seed -> same manifest."""
    from tqdm.auto import tqdm

    ds = discover(cfg.data_dir)
    items = ds.items
    if cfg.max_per_class > 0:
        rng = np.random.default_rng(cfg.seed)
        picked: list[tuple[str, str]] = []
        for cls in ds.classes:
            cls_items = [it for it in items if it[1] == cls]
            keep = sorted(rng.permutation(len(cls_items))[: cfg.max_per_class].tolist())
            picked.extend(cls_items[k] for k in keep)
        items = picked
    ok: list[tuple[str, str]] = []
    sha1s: list[str] = []
    phashes: list[int] = []
    skipped: list[tuple[str, str]] = []
    for rel, cls in tqdm(items, desc="hashing images", disable=not progress, unit="img"):
        try:
            s, p = file_hashes(ds.root / rel)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            skipped.append((rel, f"{type(exc).__name__}: {exc}"))
            continue
        ok.append((rel, cls))
        sha1s.append(s)
        phashes.append(p)
    for rel, reason in skipped:
        log.warning("Skipping unreadable image %s (%s)", rel, reason)
    classes = [c for c in ds.classes if any(cls == c for _, cls in ok)]
    missing = sorted(set(ds.classes) - set(classes))
    if missing:
        raise DatasetError(f"Every image of class(es) {missing} is unreadable; see the warnings.")
    groups = group_duplicates(sha1s, phashes, cfg.near_dup_distance)
    sizes = Counter(groups)
    dup_images = sum(v for v in sizes.values() if v > 1)
    dup_groups = sum(1 for v in sizes.values() if v > 1)
    labels = [cls for _, cls in ok]
    splits = _assign_splits(groups, labels, classes, cfg)
    rows = [
        {
            "path": rel,
            "class": cls,
            "split": splits[i],
            "sha1": sha1s[i],
            "phash": f"{phashes[i]:064x}",
            "dup_group": str(groups[i]),
        }
        for i, (rel, cls) in enumerate(ok)
    ]
    log.info(
        "Manifest: %d images, %d classes, %d duplicate groups holding %d images kept in one "
        "split each, %d skipped",
        len(rows), len(classes), dup_groups, dup_images, len(skipped),
    )
    return Manifest(root=ds.root, classes=classes, rows=rows, skipped=skipped,
                    duplicate_images=dup_images, duplicate_groups=dup_groups)


# ---------------------------------------------------------------- torch Dataset


class CXRDataset(torch.utils.data.Dataset):
    """Rows of a manifest split -> (normalised tensor, class index).

    With ``lung_masks`` (evaluation of lung focus) each item also carries the image's lung
    mask on the model input's pixel grid (uint8 S x S after the same lung view and resize as
    the image: 0 letterbox padding, 1 image, 2 lung), whether it came from the dataset (True)
    or the segmenter (False; see :func:`core.lungs.reference_lung_mask`) and the lungs' share
    of the original image.
    """

    def __init__(
        self,
        root: str | Path,
        rows: Iterable[dict[str, str]],
        classes: Sequence[str],
        transform: Transform,
        lung_masks: bool = False,
        cache: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.root = Path(root)
        self.lung_masks = lung_masks
        # ``cache`` (training): each image's deterministic preparation (decode, lung view,
        # resize, CLAHE; ``Transform.prepared``) kept after its first use, so that later
        # epochs only augment and normalise. Datasets of the same rows and preprocessing may
        # share one dict. Lives in this process (DataLoader workers each fill their own).
        self.cache = cache
        self.rows = list(rows)
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.targets = [self.index[r["class"]] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None and not self.lung_masks:
            u8 = self.cache.get(i)
            if u8 is None:
                u8 = self.cache[i] = self.transform.prepared(self._gray(i))[0]
            return self.transform.finish(u8), self.targets[i]
        gray = self._gray(i)
        if not self.lung_masks:
            return self.transform(gray), self.targets[i]
        return self._with_lung_mask(i, gray)

    def _gray(self, i: int) -> np.ndarray:
        row = self.rows[i]
        try:
            return load_gray(self.root / row["path"])
        except InvalidImageError as exc:  # the file changed after the manifest was written
            # Never a blank image in its place: it would be trained on or scored silently.
            raise DatasetError(
                f"{row['path']} (under {self.root}) can no longer be read ({exc}); it was "
                "readable when the split manifest was written. Restore the file, or start a "
                "new run so that the manifest leaves it out."
            ) from exc

    def _with_lung_mask(self, i: int, gray: np.ndarray) -> tuple[Any, ...]:
        row = self.rows[i]
        from core import lungs
        from core.preprocess import mask_to_input

        x, view = self.transform.with_view(gray)
        path = self.root / row["path"]
        seen = None if view is None else view.full_mask(gray.shape)
        if seen is not None and lungs.dataset_mask_path(path) is None:
            mask, source = seen, "segmenter"  # the lung view already segmented this image
        else:
            mask, source = lungs.reference_lung_mask(gray, path)
        box = None if view is None else view.box
        cfg = self.transform.cfg
        # 0 = letterbox padding, 1 = image content, 2 = lung
        grid = mask_to_input(np.ones_like(mask), cfg, box).astype(np.uint8)
        grid[mask_to_input(mask, cfg, box)] = 2
        return x, self.targets[i], torch.from_numpy(grid), source == "dataset", float(mask.mean())


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed augmentation per worker, reproducibly."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = info.seed % 2**31
    np.random.seed(seed)
    ds = info.dataset
    tf = getattr(ds, "transform", None)
    if isinstance(tf, Transform):
        tf.reseed(seed)


# ---------------------------------------------------------------- dataset summary (dataset.json)


MAX_DUPLICATE_EXAMPLES = 5


def _header_size_and_depth(path: Path) -> tuple[str, str] | None:
    """("WxH", bits per sample) from an image file's header (PIL opens lazily: the pixels
    are not decoded); None when the header is unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            mode, fmt = img.mode, img.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):  # PNG 16-bit greyscale
        depth = 16
    elif mode in ("I", "F"):
        depth = 32
    elif mode == "1":
        depth = 1
    else:  # L, P, LA, RGB, RGBA, CMYK, YCbCr: 8 bits per sample
        depth = 8
    return f"{w}x{h}", str(depth)


def _not_listed(root: Path) -> list[tuple[str, str]]:
    """(path, reason) of what :func:`discover` passes over under ``root``: class folders of
    the database layout without ``images/``, and files without an image extension."""
    try:
        layout = discover(root).layout
    except DatasetError:
        return []
    out: list[tuple[str, str]] = []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        folder = d / "images" if layout == "database" else d
        if not folder.is_dir():
            out.append((f"{d.name}/", "class folder without an images/ folder"))
            continue
        out.extend((f.relative_to(root).as_posix(),
                    f"not an image file (expected {'/'.join(IMAGE_EXTS)})")
                   for f in sorted(folder.iterdir())
                   if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() not in IMAGE_EXTS)
    return out


def dataset_summary(manifest: Manifest, sources: dict | None = None) -> dict:
    """What ``models/<run>/dataset.json`` holds (see the contract in docs/METRICS.md): images
    per class and split, duplicate groups (from the manifest's ``dup_group``), the files
    left out and why (passed over by :func:`discover`, unreadable in :func:`build_manifest`;
    a manifest read back from CSV no longer knows the latter), image sizes and bit depths (from file headers) and,
    given ``sources`` (``core.metadata.source_report``'s block), the image sources per class.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for r in manifest.rows:
        groups[r["dup_group"]].append(r["path"])
    dups = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    sizes: Counter[str] = Counter()
    depths: Counter[str] = Counter()
    unreadable = 0
    for r in manifest.rows:
        header = _header_size_and_depth(Path(manifest.root) / r["path"])
        if header is None:
            unreadable += 1
            continue
        sizes[header[0]] += 1
        depths[header[1]] += 1
    if unreadable:
        log.warning("%d manifest images have no readable header under %s", unreadable,
                    manifest.root)
    src = sources or {"available": False, "reason": "not looked up", "per_class": {}}
    per_class = {
        cls: {s["source"]: int(s["count"]) for s in entry.get("sources", [])}
        for cls, entry in (src.get("per_class") or {}).items()
    }
    return {
        "data_dir": str(manifest.root),
        "classes": list(manifest.classes),
        "counts": manifest.summary(),
        "duplicates": {
            "groups": len(dups),
            "images_in_groups": sum(len(g) for g in dups),
            "largest_group": max((len(g) for g in dups), default=0),
            "examples": [sorted(g) for g in dups[:MAX_DUPLICATE_EXAMPLES]],
        },
        "skipped": [{"path": p, "reason": why}
                    for p, why in [*_not_listed(Path(manifest.root)), *manifest.skipped]],
        "image_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "bit_depths": dict(sorted(depths.items(), key=lambda kv: int(kv[0]))),
        "sources": {"available": bool(src.get("available")), "reason": src.get("reason"),
                    "per_class": per_class},
    }


if __name__ == "__main__":  # python -m core.data download [--dest D]: see core.download
    # The download builds on this module (it verifies with discover), so the library never
    # imports it: the command line alone forwards to it by name.
    import runpy

    runpy.run_module("core.download", run_name="__main__", alter_sys=True)
