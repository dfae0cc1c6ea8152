"""Training: learning on real data, resume after a kill, DDP equivalence, head-mode cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.config import AugmentConfig, DataConfig, PreprocessConfig, RunConfig, TrainConfig
from core.errors import ConfigError
from core.model import load_checkpoint
from core.train import class_weights, fit, weighted_loss
from tests.conftest import ROOT, make_dataset

TINY = dict(arch="resnet18", weights="none", batch_size=6, lr=1e-3, dropout=0.0,
            evaluate=False, seed=3)


def tiny_cfg(data: Path, out: Path, **train) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=str(data)),
        preprocess=PreprocessConfig(img_size=32),
        augment=AugmentConfig(),
        train=TrainConfig(output=str(out), **{**TINY, **train}),
    )


def states_close(a: dict, b: dict, atol: float = 1e-5) -> float:
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            worst = max(worst, float((v - b[k]).abs().max()))
    return worst


def test_class_weighted_loss_is_shard_invariant():
    """DDP averages per-shard losses; ours must then equal the loss of the global batch."""
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    w = class_weights(y.tolist(), 3)
    assert float((w[y]).mean()) == pytest.approx(1.0)
    whole = weighted_loss(logits, y, w)
    halves = (weighted_loss(logits[::2], y[::2], w) + weighted_loss(logits[1::2], y[1::2], w)) / 2
    assert float(whole) == pytest.approx(float(halves), rel=1e-6)


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_killed_run_resumes_and_finishes_like_an_uninterrupted_one(tmp_path, ema):
    """Also with a weight average: last.pt keeps both the average and the trained weights."""
    data = make_dataset(tmp_path / "ds", per_class=12)
    ref = fit(tiny_cfg(data, tmp_path / "ref", epochs=3, ema_decay=ema), progress=False)

    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_train import tiny_cfg
        from core.train import fit
        from pathlib import Path
        def kill(step):
            if step == 6:  # the second step of epoch 2 (4 steps per epoch)
                os.kill(os.getpid(), signal.SIGKILL)
        fit(tiny_cfg(Path({str(data)!r}), Path({str(out)!r}), epochs=3, ema_decay={ema}),
            on_step=kill, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # died mid-epoch 2

    fit(tiny_cfg(data, out, epochs=3, resume=True, ema_decay=ema), progress=False)
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 3
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]
    ref_last = load_checkpoint(ref.parent / "last.pt")
    assert states_close(last["state_dict"], ref_last["state_dict"]) < 1e-5
    if ema:
        assert states_close(last["train_state_dict"], ref_last["train_state_dict"]) < 1e-5
        assert last["ema_n_averaged"] == ref_last["ema_n_averaged"] == 12  # 4 steps x 3 epochs
        assert states_close(last["state_dict"], last["train_state_dict"]) > 1e-4


def test_weight_average_follows_every_step_and_is_what_best_pt_holds(tmp_path):
    """--ema-decay d: after each optimiser step avg <- d * avg + (1 - d) * weights (the first
    step copies); validation and best.pt use the average, last.pt keeps the trained weights
    too."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader, TensorDataset

    from core.train import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), batch_size=5)
    snaps: list[torch.Tensor] = []
    train_one_epoch(model, lambda out, y: torch.nn.functional.cross_entropy(out, y),
                    torch.optim.SGD(model.parameters(), lr=0.5), loader, torch.device("cpu"), 1,
                    on_step=lambda step: snaps.append(model.weight.detach().clone()),
                    progress=False, ema=ema)
    expected = snaps[0]
    for w in snaps[1:]:
        expected = 0.75 * expected + 0.25 * w
    assert len(snaps) == 4
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert not torch.allclose(ema.module.weight, model.weight, atol=1e-3)

    data = make_dataset(tmp_path / "ds", per_class=12)
    best = fit(tiny_cfg(data, tmp_path / "ema", epochs=1, ema_decay=0.5), progress=False)
    saved, last = load_checkpoint(best), load_checkpoint(best.parent / "last.pt")
    assert saved["train_config"]["ema_decay"] == 0.5
    assert states_close(saved["state_dict"], last["state_dict"]) == 0.0  # best = the average
    assert states_close(saved["state_dict"], last["train_state_dict"]) > 1e-4
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_head_mode_trains_only_the_head_on_cached_features(tmp_path):
    data = make_dataset(tmp_path / "ds", per_class=12)
    best = fit(tiny_cfg(data, tmp_path / "head", epochs=3, mode="head", lr=1e-2), progress=False)
    ckpt = load_checkpoint(best.parent / "last.pt")
    hist = json.loads((best.parent / "history.json").read_text())
    assert [h["phase"] for h in hist] == ["head"] * 3
    torch.manual_seed(3)  # the run's seed: same initial backbone
    from core.model import build_model

    init = build_model(3, weights="none", arch="resnet18", dropout=0.0).state_dict()
    for k, v in ckpt["state_dict"].items():
        if not k.startswith("fc.") and v.is_floating_point() and "running" not in k:
            assert torch.equal(v, init[k]), f"backbone weight {k} changed in head mode"
    assert not torch.equal(ckpt["state_dict"]["fc.1.weight"], init["fc.1.weight"])


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "core.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _cli(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output", str(out), "--arch", "resnet18", "--weights",
            "none", "--backbone-lr-mult", "0.1", "--img-size", "32", "--batch-size", "6",
            "--dropout", "0", "--freeze-bn",
            "--no-augment", "--no-evaluate", "--device", "cpu", "--precision", "fp32", "--seed", "5",
            "--quiet", *extra]


def test_ddp_two_processes_match_a_single_process(tmp_path):
    """gloo DDP on 2 CPU processes == one process with the same global batch and seed.

    BatchNorm is frozen (--freeze-bn) because SyncBatchNorm does not run on CPU; dropout and
    augmentation are off because their random draws are per process; fp32 is pinned because
    ``--precision auto`` trains in bf16 on CPUs with native bf16, whose rounding noise grows
    far past the tolerance (1.6e-1 of the distance trained, measured here); the backbone
    learns at a tenth of the head's rate, as this tolerance was measured with (at the full
    rate that Adam takes from scratch by default, float noise reaches 8e-2 in two epochs).
    """
    data = make_dataset(tmp_path / "ds", per_class=20)  # 42 training images: equal shards
    single = tmp_path / "single"
    from core.train import main

    assert main(_cli(data, single, "--epochs", "2")) == 0
    proc = _torchrun(_cli(data, tmp_path / "ddp", "--epochs", "2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(single / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    torch.manual_seed(5)
    from core.model import build_model

    init = build_model(3, weights="none", arch="resnet18", dropout=0.0).state_dict()
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]

    def norm(d):
        return float(torch.sqrt(sum(((d(k)) ** 2).sum() for k in keys)))

    moved = norm(lambda k: a[k] - init[k])
    apart = norm(lambda k: a[k] - b[k])
    # Float summation order differs between one batch and two all-reduced shards, and Adam
    # magnifies that noise on near-zero gradients, so compare against how far training moved.
    assert moved > 1e-2, "training did not move the weights: the comparison would be vacuous"
    assert apart / moved < 1e-2, f"DDP is {apart:.2e} from single-process (moved {moved:.2e})"

    # Early stopping: with a zero learning rate validation never improves after epoch 1, so
    # patience 1 stops at epoch 2, on both ranks and in the single process alike.
    proc = _torchrun(_cli(data, tmp_path / "ddp_stop", "--epochs", "5", "--lr", "0",
                          "--early-stop-patience", "1"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2 finished after epoch 2" in proc.stderr
    assert "rank 1 of 2 finished after epoch 2" in proc.stderr
    assert main(_cli(data, tmp_path / "single_stop", "--epochs", "5", "--lr", "0",
                     "--early-stop-patience", "1")) == 0
    assert load_checkpoint(tmp_path / "single_stop" / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_train_real_from_scratch_learns(trained_run):
    """From random weights on the real X-rays, the session model must beat chance by far.

    The CI model is small (64 px, 6 epochs, ~1-2 min); a full-size run (128 px, 8 epochs,
    quoted in the README) reaches the issue's 0.85 bar. Chance is 1/3.
    """
    ckpt = load_checkpoint(trained_run)
    report = json.loads((trained_run.parent / "report" / "metrics.json").read_text())
    assert ckpt["classes"] == ["COVID", "Normal", "Viral Pneumonia"]
    acc = report["overall"]["accuracy"]["value"]
    assert acc >= 0.65, f"test accuracy {acc:.3f} is too close to chance (0.33)"
    assert ckpt["val_metrics"]["macro_f1"] >= 0.6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_finishing_step_runs_at_each_precision(tmp_path, precision):
    """Training's whole finish (calibration, test report, OOD statistics, the exported graph
    and the reduced-precision check) at ``--precision fp32`` and ``bf16`` on this CPU,
    whichever kind it is: the bf16 path used to fail on CPUs with native bf16. Then each
    precision path through the predictor: the default serves the exported graph at fp32
    unless a reduced precision passed the check, torch fp32 and the runtime's fp32 agree,
    and bf16 (torch autocast; OpenVINO where the CPU has native bf16) still answers."""
    from core import export
    from core import network as net
    from core.devices import cpu_has_native_bf16
    from core.inference import Predictor

    data = make_dataset(tmp_path / "ds", per_class=16)
    best = fit(tiny_cfg(data, tmp_path / "run", epochs=1, precision=precision, evaluate=True,
                        export=True), progress=False)
    assert (best.parent / "report" / "metrics.json").is_file()
    from core.sidecars import load_run_checkpoint

    ckpt = load_run_checkpoint(best)  # calibration and OOD statistics live in sidecars
    assert ckpt.get("ood") is not None and ckpt.get("temperature") is not None
    assert export.is_current(best.with_suffix(".onnx"), export.file_sha256(best))
    serving = json.loads((best.parent / export.SERVING_FILE).read_text())
    assert serving["weights_sha256"] == export.file_sha256(best)
    fp32 = serving["checks"]["onnx-fp32"]  # recorded; its threshold sits on a validation score
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_dp"] < 1e-4
    default = Predictor.from_checkpoint(best, device="cpu")
    passed = [k for k, c in serving["checks"].items() if c.get("passed") and not k.endswith("fp32")]
    usable = {"openvino-bf16": cpu_has_native_bf16() and net.runtime_available("openvino"),
              "onnx-int8": True}  # the default settings' order (core.runs.AUTO_SERVING)
    want = [n for n in ("openvino-bf16", "onnx-int8") if n in passed and usable[n]][:1] or ["onnx-fp32"]
    assert default.network == want[0]
    torch32 = Predictor.from_checkpoint(best, device="cpu", runtime="torch", precision="fp32")
    explicit = Predictor.from_checkpoint(best, device="cpu", runtime="torch", precision="bf16")
    assert torch32.network == "torch-fp32" and explicit.network == "torch-bf16"
    images = [p.read_bytes() for p in sorted((data / "A").glob("*.png"))[:4]]
    for image in images:
        a, b = torch32.predict(image), default.predict(image)
        if default.network == "onnx-fp32":
            assert a.label == b.label and a.decision == b.decision
            assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.classes) < 1e-4
        assert set(explicit.predict(image).probabilities) == set(default.classes)
    if cpu_has_native_bf16():
        ov = Predictor.from_checkpoint(best, device="cpu", runtime="openvino", precision="bf16")
        assert ov.network == "openvino-bf16" and ov.predict(images[0]).label in default.classes


@pytest.mark.parametrize("argv, weights, mult", [
    (["--weights", "none"], "none", 1.0),  # from scratch: the backbone at the head's rate
    (["--weights", "none", "--backbone-lr-mult", "0.25"], "none", 0.25),  # the user's value wins
    (["--preset", "cpu-lungs"], "none", 1.0),
    (["--weights", "imagenet"], "imagenet", 0.1),  # pretrained: keep its features
])
def test_backbone_learning_rate_fits_the_weights(tiny_dataset, tmp_path, argv, weights, mult):
    from core import model as model_lib
    from core import train

    args = train.parse_args([*argv, "--data-dir", str(tiny_dataset),
                             "--output", str(tmp_path / "run"), "--arch", "resnet18",
                             "--lr", "0.002", "--device", "cpu"])
    cfg = train.config_from_args(args)
    assert cfg.train.weights == weights and cfg.train.backbone_lr_mult == mult
    if weights != "none":
        return  # ImageNet weights can't be downloaded here; the config decides the rate
    trainer = train.Trainer(cfg, progress=False)
    trainer.prepare_data()
    trainer.build()
    trainer.make_optimizer("finetune")
    backbone_ids = {id(p) for p in model_lib.backbone_parameters(trainer.net)}
    lrs = {("backbone" if id(g["params"][0]) in backbone_ids else "head"): g["lr"]
           for g in trainer.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.002)
    assert lrs["backbone"] == pytest.approx(0.002 * mult)


def test_preset_sets_defaults_that_flags_still_override(tmp_path):
    from core import train
    from core.config import PRESETS

    preset = PRESETS["cpu-lungs"]
    cfg = train.config_from_args(train.parse_args(["--preset", "cpu-lungs"]))
    assert (cfg.preprocess.lung_view, cfg.preprocess.img_size, cfg.train.epochs) == (
        preset["lung_view"], preset["img_size"], preset["epochs"])
    assert cfg.augment.erase_periphery == preset["erase_periphery"]
    assert cfg.train.ema_decay == preset.get("ema_decay", 0.0)
    cfg = train.config_from_args(train.parse_args(["--preset", "cpu-lungs", "--epochs", "3",
                                                   "--lung-view", "none"]))
    assert cfg.train.epochs == 3 and cfg.preprocess.lung_view == "none"
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "no-such-recipe"])
