"""The demo model that ships with the repository, in ``assets/demo/``.

``python -m core.demo build [--from-run RUN_DIR] [--data-dir ../shared/data/cxr-real]``

On a machine with no run of its own under ``models/`` the demo is the active model
(:func:`core.runs.selectable_runs`); ``CXR_DEMO=0`` hides it. Every page that shows it labels
it (:func:`label`, drawn by ``core.ui.demo_notice``).

What the build does, deterministically apart from training:

1. takes a finished run (``--from-run``, e.g. the chosen recipe's final run), or trains one
   with the chosen recipe (``core.train --preset cpu-lungs``; extra ``core.train`` flags
   are passed on, e.g. ``--epochs 1 --arch resnet18`` for a throwaway build);
2. writes its weights as ``best.pt``, a normal project checkpoint (read by
   ``core.model.load_checkpoint`` with ``weights_only=True``) whose conv and linear weights
   are weight-only int8 with one fp32 scale per output channel
   (``core.model.quantized_checkpoint``), dequantised at load: a ResNet50's 23.5 M
   parameters take about 24 MB instead of 94 MB (fp32) or 47 MB (fp16);
3. copies beside it what the pages read (``config.json``, ``history.json``, ``manifest.csv``,
   ``dataset.json``), recording the data folder relative to the repository's root;
4. finishes the run **on the shipped (dequantised) weights**: calibration and OOD statistics
   on validation, the test report with per-image records
   (``core.evaluate.finalize_run(export=False)``), then ``run.json``
   (``core.runs.summarise``); every sidecar records the SHA-256 of the shipped ``best.pt``;
5. writes ``demo.json`` (provenance, weight format) and ``MODEL_CARD.md``
   (``core.model_card``), and checks that the folder holds at most 30 MB.

The serving runtime's exported network (``best.onnx``) does not ship: the predictor exports it
on first load into the user's cache folder (``core.export.graph_dir``), never into the
repository. The weights are replaced only when the recipe changes: each copy stays in the git
history.

This module imports no torch at import time (``core.ui`` reads :func:`label`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core import runs
from core.errors import CheckpointError, ConfigError, CXRError
from core.files import file_sha256, write_bytes_atomic, write_json

log = logging.getLogger(__name__)

ROOT = runs.ROOT
DEFAULT_DATA_DIR = "../shared/data/cxr-real"
DEFAULT_OUTPUT = runs.DEFAULT_DEMO_DIR
RECIPE = "cpu-lungs"
MAX_BYTES = 30_000_000
"""The shipped folder's budget: 30 MB (decimal), every file in it together."""
DEMO_FORMAT = "cxr-insight-demo"
DEMO_VERSION = 1
COPIED = ("config.json", "history.json", "history.csv", "manifest.csv", "dataset.json")
"""Files of the source run shipped as they are (their data folder rewritten)."""
FITTED_KEYS = ("temperature", "operating_point", "ood", "low_confidence", "int8")
"""Keys fitted on the source's weights (older runs keep them in best.pt): refitted here."""
DATABASE_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


# ---------------------------------------------------------------- what the pages show


def label(run: runs.RunArtifacts) -> str | None:
    """The plain label of the demo run, with its real test figures (None for any other
    run): "Demo model: trained on 942 images of 3 classes (no Lung Opacity), tested on 204;
    research use only. Test accuracy 87.7% (95% CI 83.3%–91.7%)." The counts come from its
    ``dataset.json`` and report, the figures from its report."""
    if not run.is_demo:
        return None
    counts = (run.dataset or {}).get("counts") or {}
    n_train = sum(int(n) for n in (counts.get("train") or {}).values())
    report = run.report or {}
    n_test = report.get("n") or sum(int(n) for n in (counts.get("test") or {}).values())
    absent = [c.replace("_", " ") for c in DATABASE_CLASSES if c not in run.classes]
    classes = f"{len(run.classes)} classes" + (f" (no {', '.join(absent)})" if absent else "")
    text = (f"Demo model: trained on {n_train:,} images of {classes}, tested on {n_test}; "
            "research use only.")
    acc = (report.get("overall") or {}).get("accuracy") or {}
    if acc.get("value") is not None:
        ci = acc.get("ci95")
        text += f" Test accuracy {100 * acc['value']:.1f}%"
        text += f" (95% CI {100 * ci[0]:.1f}%–{100 * ci[1]:.1f}%)." if ci else "."
    return text


def images_note(run: runs.RunArtifacts) -> str:
    """What a gallery says when the demo's images are not on this machine."""
    return (f"The demo model's images are not on this machine (its split names files of "
            f"`{DEFAULT_DATA_DIR}`, looked for at `{run.data_dir}`). Its figures and per-image "
            "records come from its own files and are shown anyway. To browse X-rays, get the "
            "COVID-19 Radiography Database with `python -m core.data download` (or **Download "
            "the database** on the **Training** page) and train your own run there: its "
            "galleries show its images.")


# ---------------------------------------------------------------- build


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _relative_to_root(path: Path) -> str:
    """``path`` relative to the repository's root (``../shared/data/cxr-real``), so that a
    shipped run names its data folder the same way on every clone."""
    return Path(os.path.relpath(path.resolve(), ROOT)).as_posix()


def _clear_output(output: Path) -> None:
    """Empty the output folder: only when it is absent, empty or an earlier demo build."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    if any(output.iterdir()) and not runs.is_shipped(output):
        raise ConfigError(f"--output {output} holds files but no {runs.DEMO_FILE}: it is not an "
                          "earlier demo build, so it is left alone. Choose an empty folder.")
    shutil.rmtree(output)


def train_source(data_dir: Path, workdir: Path, train_args: Sequence[str],
                 progress: bool) -> Path:
    """Train a run with the chosen recipe (``--preset cpu-lungs``, then ``train_args``) into
    ``workdir``; skips its evaluation and export (the build does both on the shipped
    weights). Returns the run folder."""
    from core import train

    argv = ["--preset", RECIPE, "--data-dir", str(data_dir), "--output", str(workdir),
            "--no-evaluate", "--no-export", *train_args]
    log.info("Training the demo: python -m core.train %s", " ".join(argv))
    cfg = train.config_from_args(train.parse_args(argv))
    return train.fit(cfg, progress=progress).parent


def write_weights(source: Path, output: Path, data_rel: str, output_rel: str) -> dict[str, Any]:
    """``output/best.pt``: the source's checkpoint with int8 weights, the data folder and
    output recorded relative to the root, and no keys fitted on the source's weights.
    Returns the quantisation's facts for ``demo.json``."""
    import torch

    from core import model as model_lib

    ckpt = model_lib.load_checkpoint(source / runs.CHECKPOINT_FILE)  # fp32 (dequantised)
    for key in FITTED_KEYS:
        ckpt.pop(key, None)
    ckpt["data_config"] = {**(ckpt.get("data_config") or {}), "data_dir": data_rel}
    ckpt["train_config"] = {**(ckpt.get("train_config") or {}), "output": output_rel}
    ckpt.pop("weight_format", None)
    shipped = model_lib.quantized_checkpoint(ckpt)
    worst = 0.0
    for name, scale in shipped["weight_scales"].items():
        view = (-1,) + (1,) * (ckpt["state_dict"][name].dim() - 1)
        deq = shipped["state_dict"][name].float() * scale.view(view)
        err = ((deq - ckpt["state_dict"][name].float()).abs() / scale.view(view)).max()
        worst = max(worst, float(err))
    # through memory, not torch.save(path): the archive's records are then named "archive/",
    # not after a temporary file, and the same weights give the same bytes on every build
    buffer = io.BytesIO()
    torch.save(shipped, buffer)
    write_bytes_atomic(output / runs.CHECKPOINT_FILE, buffer.getvalue())
    n_params = sum(int(t.numel()) for t in ckpt["state_dict"].values() if t.is_floating_point())
    n_int8 = sum(int(t.numel()) for t in shipped["state_dict"].values() if t.dtype == torch.int8)
    return {"weight_format": model_lib.INT8_WEIGHT_FORMAT, "parameters": n_params,
            "int8_parameters": n_int8, "max_weight_error_steps": round(worst, 4),
            "fp32_weights_sha256": file_sha256(source / runs.CHECKPOINT_FILE)}


def copy_run_files(source: Path, output: Path, data: Path, data_rel: str,
                   output_rel: str) -> None:
    """Ship the source's config, history, split and dataset summary, with the data folder
    (and the config's output) recorded relative to the root."""
    missing = [f for f in ("config.json", "history.json", "manifest.csv")
               if not (source / f).is_file()]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: pass a finished training run "
                              "(python -m core.train writes them).")
    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, output / name)
    config = json.loads((output / "config.json").read_text())
    config.setdefault("data", {})["data_dir"] = data_rel
    config.setdefault("train", {})["output"] = output_rel
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    dataset = output / runs.DATASET_FILE
    if dataset.is_file():  # this machine's path, in the folder and in messages, made relative
        text = dataset.read_text()
        for form in {str(data), str(data.resolve())}:
            text = text.replace(json.dumps(form)[1:-1], data_rel)
        doc = json.loads(text)
        doc["data_dir"] = data_rel
        write_json(dataset, doc)


def fp32_agreement(source: Path, output: Path) -> dict[str, int] | None:
    """How many test images the shipped weights classify as the source's fp32 weights did
    (from the two reports' per-image records); None when the source has no records."""
    import pandas as pd

    theirs, ours = source / "report" / "predictions.csv", output / "report" / "predictions.csv"
    if not (theirs.is_file() and ours.is_file()):
        return None
    a = pd.read_csv(theirs).set_index("path")["predicted_class"]
    b = pd.read_csv(ours).set_index("path")["predicted_class"]
    common = a.index.intersection(b.index)
    return {"n": int(len(common)), "same": int((a[common] == b[common]).sum())}


def build(output: str | Path = DEFAULT_OUTPUT, data_dir: str | Path = DEFAULT_DATA_DIR,
          from_run: str | Path | None = None, train_args: Sequence[str] = (),
          recipe: str | None = None, progress: bool = True,
          max_bytes: int = MAX_BYTES) -> Path:
    """Build the demo run into ``output`` (see the module docstring); returns its folder.

    ``data_dir`` and ``output`` are recorded relative to the repository's root, and the run
    is finished from there, so that its files name them the same way on every clone.
    Raises :class:`~core.errors.ConfigError` when the folder would exceed ``max_bytes``
    (it is left there to inspect) or the inputs are unusable."""
    from tqdm.auto import tqdm

    from core import evaluate, model_card

    data = Path(data_dir).resolve()
    output = Path(output).resolve()
    if not data.is_dir():
        raise ConfigError(f"--data-dir {data_dir} not found ({data}). The demo is built from "
                          f"the shared real X-rays, {DEFAULT_DATA_DIR} beside the repository.")
    source = Path(from_run).resolve() if from_run else None
    trained = source is None
    if source is not None:
        if not (source / runs.CHECKPOINT_FILE).is_file():
            raise CheckpointError(f"--from-run {from_run} holds no best.pt")
        if source == output:
            raise ConfigError("--from-run and --output are the same folder")
    data_rel, output_rel = _relative_to_root(data), _relative_to_root(output)
    steps = tqdm(total=5, desc="demo build", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="cxr-demo-train-") as work:
        if source is None:
            steps.set_postfix_str("training")
            source = train_source(data, Path(work) / "run", train_args, progress)
            recipe = recipe or " ".join(["--preset", RECIPE, *train_args])
        steps.update()
        steps.set_postfix_str("int8 weights")
        _clear_output(output)
        output.mkdir(parents=True)
        facts = write_weights(source, output, data_rel, output_rel)
        copy_run_files(source, output, data, data_rel, output_rel)
        command = ["python -m core.demo build", *train_args] if trained else [
            "python -m core.demo build --from-run", _relative_to_root(source)]
        doc = {"format": DEMO_FORMAT, "version": DEMO_VERSION,
               "recipe": recipe or source.name,
               "source_run": None if trained else _relative_to_root(source),
               "data_dir": data_rel, **facts, "build_command": " ".join(command)}
        write_json(output / runs.DEMO_FILE, doc)  # before anything loads it: marks it shipped
        steps.update()
        steps.set_postfix_str("calibration, OOD, test report")
        with contextlib.chdir(ROOT):  # the run records its data folder relative to the root
            evaluate.finalize_run(output_rel, data_rel, progress=progress, export=False)
            steps.update()
            steps.set_postfix_str("run.json, model card")
            runs.summarise(output_rel)
        if not (output / runs.DATASET_FILE).is_file():
            with contextlib.chdir(ROOT):
                runs.write_dataset_summary(output_rel, data_rel)
        agreement = fp32_agreement(source, output)
        if agreement is not None:
            doc["fp32_agreement"] = agreement
            write_json(output / runs.DEMO_FILE, doc)
        steps.update()
    run = runs.load_run(output)
    (output / "MODEL_CARD.md").write_text(model_card.markdown(run))
    steps.update()
    steps.close()
    size = folder_bytes(output)
    if size > max_bytes:
        raise ConfigError(f"{output} holds {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB "
                          "budget: use a smaller architecture (e.g. --arch resnet34).")
    log.info("Demo built in %s: %.1f MB. %s", output, size / 1e6, label(run))
    return output


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m core.demo",
        description="The demo model that ships in assets/demo/ (research use only).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "build", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        help="build assets/demo/ from a finished run or by training the chosen recipe",
        description="Build the shipped demo run: int8 weights (dequantised at load), "
        "calibration, OOD statistics and the test report computed on those weights, the "
        "files the pages read, demo.json and MODEL_CARD.md; at most 30 MB. Any other flag is "
        "passed to python -m core.train when the build trains (e.g. --epochs 1 --arch "
        "resnet18 --img-size 64 for a quick throwaway build).")
    g = p.add_argument_group("source")
    g.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="a finished training run to ship (its best.pt, config.json, "
                   "history.json, manifest.csv); without it, train one with --preset "
                   f"{RECIPE} (python -m core.train)")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="the dataset the run is (or was) trained on; recorded relative to the "
                   "repository's root")
    g.add_argument("--recipe", default=None,
                   help="how the model card names the recipe (default: the source run's "
                   "folder name, or the training flags)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=str(DEFAULT_OUTPUT),
                   help="the demo folder (emptied first; must be empty or an earlier build)")
    g.add_argument("--max-mb", type=float, default=MAX_BYTES / 1e6,
                   help="fail when the folder would hold more than this many MB")
    g = p.add_argument_group("logging")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and args.from_run:
        log.error("Training flags (%s) make no sense with --from-run", " ".join(extra))
        return 2
    t0 = time.monotonic()
    try:
        out = build(args.output, args.data_dir, args.from_run, extra, recipe=args.recipe,
                    progress=not args.quiet, max_bytes=int(args.max_mb * 1e6))
    except CXRError as exc:
        log.error("%s", exc)
        return 2
    log.info("Done in %.0f s: %s (commit it only when the recipe changed)", time.monotonic() - t0,
             out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
