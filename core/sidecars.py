"""What is fitted on a run's weights lives beside them, never inside them.

Training writes ``best.pt`` once; nothing rewrites it afterwards. What the finish fits on
those weights goes into sidecar files named like it, each recording the SHA-256 of the
``best.pt`` it was fitted on:

| file | holds | written by | refit with |
| --- | --- | --- | --- |
| ``best.calibration.json`` | ``temperature``, ``operating_point`` | ``core.calibration.recalibrate_checkpoint`` | ``python -m core.evaluate --checkpoint RUN/best.pt --data-dir DATA --calibrate`` |
| ``best.ood.safetensors`` | ``ood`` (Mahalanobis statistics: tensors, the rest as JSON metadata), ``low_confidence`` | ``core.ood.calibrate_run_ood`` | the same command |
| ``best.int8.pt`` | ``int8``: earlier versions' FX int8 statistics, read only so that the predictor can say it ignores them (the int8 network is now ``best.int8.onnx``, :mod:`core.export`) | earlier versions | ``python -m core.export RUN --data-dir DATA`` |

:func:`load_run_checkpoint` is the one place that reads them: it returns the checkpoint dict
with those keys merged in from sidecars whose hash matches ``best.pt``, and raises
:class:`StaleSidecarError` (a :class:`~core.errors.CheckpointError`) naming the file and the
command that refits it when one does not. Runs from before the sidecars keep these keys inside
``best.pt``: they still load (a key with no sidecar is read from the checkpoint), and
``python -m core.runs migrate RUN`` writes their sidecars without touching ``best.pt``.

No torch import at module level: ``core.runs`` lists these files without loading torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.files import file_sha256, write_bytes_atomic, write_json

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
PARTS = ("calibration", "ood", "int8")
KEYS: dict[str, tuple[str, ...]] = {
    "calibration": ("temperature", "operating_point"),
    "ood": ("ood", "low_confidence"),
    "int8": ("int8",),
}
"""The checkpoint keys each sidecar holds."""
SUFFIXES = {"calibration": ".calibration.json", "ood": ".ood.safetensors", "int8": ".int8.pt"}
FORMATS = {part: f"cxr-insight-{part}" for part in PARTS}
_TENSORS = ("mean", "projection", "centers")  # per OOD layer, stored as safetensors tensors


class StaleSidecarError(CheckpointError):
    """A sidecar was fitted on other weights than the ``best.pt`` beside it."""


def sidecar_path(checkpoint: str | Path, part: str) -> Path:
    """``best.<part>.<ext>`` beside ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[part])


def sidecar_files(checkpoint: str | Path) -> list[Path]:
    """The sidecars present beside ``checkpoint``, in :data:`PARTS` order."""
    return [p for p in (sidecar_path(checkpoint, part) for part in PARTS) if p.is_file()]


def refit_command(checkpoint: str | Path, part: str, data_dir: str | None = None) -> str:
    """The command that refits ``part`` for the run of ``checkpoint``."""
    checkpoint = Path(checkpoint)
    data = data_dir or "<dataset>"
    if part == "int8":
        return f"python -m core.export {checkpoint.parent} --data-dir {data}"
    return f"python -m core.evaluate --checkpoint {checkpoint} --data-dir {data} --calibrate"


def _stamp(checkpoint: Path, part: str, weights_sha256: str) -> dict[str, Any]:
    return {"format": FORMATS[part], "version": SIDECAR_VERSION, "weights_file": checkpoint.name,
            "weights_sha256": weights_sha256,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------- writing


def write_calibration(checkpoint: str | Path, temperature: float | None,
                      operating_point: Mapping[str, Any] | None, *, weights_sha256: str,
                      fitted_on: Mapping[str, Any] | None = None) -> Path:
    """``best.calibration.json``: temperature and operating point fitted on the weights whose
    hash is ``weights_sha256`` (hash the file before loading it, so the stamp is of what was
    used)."""
    checkpoint = Path(checkpoint)
    path = sidecar_path(checkpoint, "calibration")
    write_json(path, {**_stamp(checkpoint, "calibration", weights_sha256),
                      "temperature": None if temperature is None else float(temperature),
                      "operating_point": None if operating_point is None else dict(operating_point),
                      "fitted_on": dict(fitted_on or {})})
    return path


def write_ood(checkpoint: str | Path, stats: Mapping[str, Any],
              low_confidence: Mapping[str, Any] | None, *, weights_sha256: str) -> Path:
    """``best.ood.safetensors``: each OOD layer's ``mean``, ``projection`` and ``centers``
    as float32 tensors; the other statistics, the low-confidence cut-off and the stamp as
    metadata (JSON strings)."""
    import torch
    from safetensors.torch import save

    checkpoint = Path(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {k: v for k, v in stats.items() if k != "layers"}
    rest["layers"] = {}
    for name, layer in stats["layers"].items():
        rest["layers"][name] = {k: v for k, v in layer.items() if k not in _TENSORS}
        for k in _TENSORS:
            tensors[f"layers.{name}.{k}"] = torch.as_tensor(
                layer[k], dtype=torch.float32).detach().cpu().contiguous()
    meta = {k: str(v) for k, v in _stamp(checkpoint, "ood", weights_sha256).items()}
    meta["ood"] = json.dumps(rest, allow_nan=False)
    meta["low_confidence"] = json.dumps(None if low_confidence is None else dict(low_confidence),
                                        allow_nan=False)
    path = sidecar_path(checkpoint, "ood")
    write_bytes_atomic(path, save(tensors, metadata=meta))
    return path


def write_int8(checkpoint: str | Path, state: Mapping[str, Any], *, weights_sha256: str) -> Path:
    """``best.int8.pt``: an earlier version's int8 block (migrated runs), loadable with
    ``weights_only``; the predictor loads and ignores it, with a note."""
    from core.model import save_checkpoint

    checkpoint = Path(checkpoint)
    path = sidecar_path(checkpoint, "int8")
    save_checkpoint({**_stamp(checkpoint, "int8", weights_sha256), "int8": dict(state)}, path)
    return path


# ---------------------------------------------------------------- reading


def _read(path: Path, part: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stamp, {key: value}) of one sidecar file; CheckpointError when it is unreadable."""
    try:
        if part == "calibration":
            doc = json.loads(path.read_text())
            return doc, {k: doc.get(k) for k in KEYS[part]}
        if part == "ood":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = dict(fh.metadata() or {})
                    tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            except SafetensorError as exc:
                raise ValueError(str(exc)) from exc
            stats = json.loads(meta.get("ood", "null"))
            if stats is not None:
                for name, layer in stats["layers"].items():
                    layer.update({k: tensors[f"layers.{name}.{k}"] for k in _TENSORS})
            if "version" in meta:
                meta["version"] = int(meta["version"])
            return meta, {"ood": stats, "low_confidence": json.loads(meta.get("low_confidence",
                                                                               "null"))}
        from core.model import torch_load_file

        doc = torch_load_file(path, CheckpointError, "int8 sidecar", "")
        return doc, {"int8": doc.get("int8")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {type(exc).__name__}: {exc}. Delete it and "
                              f"refit it (see core/sidecars.py).") from exc


def read_sidecar(checkpoint: str | Path, part: str, weights_sha256: str,
                 data_dir: str | None = None) -> dict[str, Any] | None:
    """The keys of one sidecar of ``checkpoint`` (None when it has none), checked against
    the weights' hash; :class:`StaleSidecarError` when they differ."""
    checkpoint = Path(checkpoint)
    path = sidecar_path(checkpoint, part)
    if not path.is_file():
        return None
    stamp, values = _read(path, part)
    if stamp.get("format") != FORMATS[part] or int(stamp.get("version", 0)) > SIDECAR_VERSION:
        raise CheckpointError(f"{path} is not a version-{SIDECAR_VERSION} {FORMATS[part]} "
                              "sidecar; refit it with "
                              f"`{refit_command(checkpoint, part, data_dir)}`.")
    recorded = str(stamp.get("weights_sha256", ""))
    if recorded != weights_sha256:
        raise StaleSidecarError(
            f"{path} was fitted on other weights (sha256 {recorded[:12] or 'none'}) than "
            f"{checkpoint} (sha256 {weights_sha256[:12]}): the run was retrained or its "
            f"checkpoint replaced, so its {' and '.join(KEYS[part])} no longer apply. Refit "
            f"them with `{refit_command(checkpoint, part, data_dir)}`.")
    return values


def load_run_checkpoint(checkpoint: str | Path,
                        parts: Iterable[str] = PARTS) -> dict[str, Any]:
    """The checkpoint (``core.model.load_checkpoint``) with the keys of its verified sidecars
    (``parts``) merged in. A key whose sidecar is absent keeps the checkpoint's own value
    (runs from before the sidecars); a stale sidecar raises :class:`StaleSidecarError`."""
    from core.model import load_checkpoint

    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint) if checkpoint.is_file() else ""
    ckpt = load_checkpoint(checkpoint)
    data_dir = (ckpt.get("data_config") or {}).get("data_dir")
    for part in parts:
        values = read_sidecar(checkpoint, part, sha, data_dir)
        if values is not None:
            ckpt.update(values)
    return ckpt


# ---------------------------------------------------------------- older runs


def migrate(checkpoint: str | Path) -> list[Path]:
    """Write the sidecars of a run that keeps its fitted keys inside ``best.pt`` (runs from
    before the sidecars), stamped with its hash; ``best.pt`` is not modified. Parts whose
    sidecar already exists are checked and left as they are. Returns the files written."""
    from core.model import load_checkpoint

    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    data_dir = (ckpt.get("data_config") or {}).get("data_dir")
    written = []
    for part in PARTS:
        if read_sidecar(checkpoint, part, sha, data_dir) is not None:
            continue
        if ckpt.get(KEYS[part][0]) is None:  # no temperature, OOD statistics or int8 block
            continue
        if part == "calibration":
            written.append(write_calibration(checkpoint, ckpt.get("temperature"),
                                             ckpt.get("operating_point"), weights_sha256=sha,
                                             fitted_on={"migrated_from": checkpoint.name}))
        elif part == "ood":
            written.append(write_ood(checkpoint, ckpt.get("ood"), ckpt.get("low_confidence"),
                                     weights_sha256=sha))
        else:
            written.append(write_int8(checkpoint, ckpt["int8"], weights_sha256=sha))
    for path in written:
        log.info("Wrote %s from the keys inside %s", path, checkpoint)
    return written
