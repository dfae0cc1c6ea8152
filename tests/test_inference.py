"""The inference engine (core.inference), OOD statistics (core.ood) and the predict CLI.

Most tests use small random-init ResNet18 checkpoints at 64 px built in memory (seconds).
``test_real_ood_*`` uses the session's ``trained_run`` (ResNet50 trained on the real X-rays)
and reports the OOD false-alarm and detection rates.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core import gradcam, ood
from core.config import PreprocessConfig, to_dict
from core.errors import CheckpointError, InvalidImageError
from core.inference import RESEARCH_ONLY, Explanation, Prediction, Predictor
from core.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model, save_checkpoint
from core.predict import main as predict_main
from tests.conftest import blob_image, write_png

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
FAST = "torch"  # eager: no export (the default runtime's graph is exported once, ~20 s here)


def make_ckpt(seed: int = 0, img_size: int = 64, **extra: object) -> dict:
    """A random-init ResNet18 checkpoint (BatchNorm statistics randomised so that folding
    them into the convolutions is exercised)."""
    torch.manual_seed(seed)
    m = build_model(len(CLASSES), weights="none", arch="resnet18", dropout=0.3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": "resnet18",
            "dropout": 0.3, "classes": list(CLASSES),
            "preprocess": to_dict(PreprocessConfig(img_size=img_size)),
            "state_dict": m.state_dict()}
    ckpt.update(extra)
    return ckpt


def constant_ckpt(probs: tuple[float, ...], temperature: float, **extra: object) -> dict:
    """A checkpoint whose calibrated probabilities are ``probs`` for every input: zero head
    weights and bias = T * log(p), so softmax(logits / T) = p."""
    ckpt = make_ckpt(temperature=temperature, **extra)
    sd = dict(ckpt["state_dict"])
    sd["fc.1.weight"] = torch.zeros_like(sd["fc.1.weight"])
    sd["fc.1.bias"] = temperature * torch.log(torch.tensor(probs, dtype=torch.float32))
    ckpt["state_dict"] = sd
    return ckpt


def const_predictor(probs: tuple[float, ...], temperature: float, **extra: object) -> Predictor:
    return Predictor(constant_ckpt(probs, temperature, **extra), runtime=FAST)


def xray_like(seed: int = 0, shape: tuple[int, int] = (96, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = blob_image(rng, seed % 3, size=max(shape))
    return np.ascontiguousarray(img[: shape[0], : shape[1]])


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(make_ckpt())


# ---------------------------------------------------------------- inputs


def test_predict_accepts_bytes_path_pil_and_array_with_identical_results(predictor, tmp_path):
    arr = xray_like(1)
    path = write_png(tmp_path / "x.png", arr)
    data = path.read_bytes()
    with Image.open(path) as im:
        pil = im.copy()
    results = [predictor.predict(src) for src in (data, path, str(path), pil, arr,
                                                  io.BytesIO(data))]
    assert all(r == results[0] for r in results)
    p = results[0]
    assert isinstance(p, Prediction)
    assert p.classes == tuple(CLASSES) and p.original_size == (96, 80)
    assert math.isclose(sum(p.probabilities.values()), 1.0, rel_tol=1e-9)
    assert p.label == max(p.probabilities, key=p.probabilities.get)
    assert p.decision == p.label  # no operating point stored
    assert p.research_only == RESEARCH_ONLY and "not a medical device" in RESEARCH_ONLY
    # No OOD / low-confidence statistics: flags off, score nan, and the notes say so.
    assert not p.ood and math.isnan(p.ood_score) and not p.ood_available
    assert not p.low_confidence and not p.low_confidence_available
    assert any("Out-of-distribution check unavailable" in n for n in p.notes)
    assert any("Low-confidence check unavailable" in n for n in p.notes)
    d = p.to_dict()
    assert d["label"] == p.label and d["classes"] == CLASSES


def test_predict_batch_equals_predict_per_image(predictor):
    imgs = [xray_like(s, (96 + 8 * s, 80)) for s in range(5)]
    batch = predictor.predict_batch(imgs)
    for img, b in zip(imgs, batch, strict=True):
        s = predictor.predict(img)
        assert (b.label, b.decision, b.original_size) == (s.label, s.decision, s.original_size)
        for c in CLASSES:  # batched convolutions may round differently in the last bits
            assert b.probabilities[c] == pytest.approx(s.probabilities[c], abs=1e-5)


@pytest.mark.parametrize("bad, words", [
    (b"definitely not an image", "not"),
    (b"", "empty"),
    (np.zeros((10, 10), np.uint8), "too small"),
    ("/nonexistent/scan.png", "could not be found"),
    (12345, "expects"),
])
def test_invalid_input_raises_invalid_image_error(predictor, bad, words):
    with pytest.raises(InvalidImageError) as info:
        predictor.predict(bad)
    assert isinstance(info.value, ValueError)
    assert words in str(info.value)


def test_predict_batch_can_return_errors_in_place(predictor):
    good = xray_like(2)
    out = predictor.predict_batch([good, b"garbage", good], on_error="return")
    assert isinstance(out[0], Prediction) and isinstance(out[2], Prediction)
    assert isinstance(out[1], InvalidImageError)
    assert out[0] == out[2]
    with pytest.raises(InvalidImageError):
        predictor.predict_batch([good, b"garbage"])


# ---------------------------------------------------------------- calibration and decision


def test_temperature_is_applied_to_the_probabilities():
    t = 2.5
    calibrated = Predictor(make_ckpt(temperature=t), runtime="torch")
    img = xray_like(3)
    x = calibrated.prepare(img).x[None]
    from core.model import model_from_checkpoint

    with torch.inference_mode():
        logits = model_from_checkpoint(make_ckpt()).eval()(x).double()
    expected = torch.softmax(logits / t, dim=1)[0].numpy()
    p = calibrated.predict(img)
    assert p.calibrated
    assert [p.probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)
    assert not any("not calibrated" in n for n in p.notes)


def test_decision_at_the_operating_point_follows_the_rule_by_hand():
    op = {"class": "COVID", "threshold": 0.2, "target_sensitivity": 0.95,
          "achieved_val_sensitivity": 0.96}
    # P = (COVID 0.25, Normal 0.5, Viral 0.25): COVID reaches 0.2 -> decision COVID.
    p = const_predictor((0.25, 0.5, 0.25), 1.7, operating_point=op).predict(xray_like())
    assert p.probabilities["COVID"] == pytest.approx(0.25, abs=1e-5)
    assert p.probabilities["Normal"] == pytest.approx(0.5, abs=1e-5)
    assert (p.label, p.decision) == ("Normal", "COVID")
    assert "COVID when P(COVID) >= 0.2000" in p.decision_rule
    # Threshold 0.3 is not reached -> the most probable *other* class.
    op3 = {**op, "threshold": 0.3}
    p = const_predictor((0.25, 0.5, 0.25), 1.7, operating_point=op3).predict(xray_like())
    assert p.decision == "Normal"
    # COVID is the top class but under a high threshold -> the best of the others (Viral).
    op6 = {**op, "threshold": 0.6}
    p = const_predictor((0.5, 0.2, 0.3), 1.0, operating_point=op6).predict(xray_like())
    assert (p.label, p.decision) == ("COVID", "Viral Pneumonia")


def test_bad_calibration_entries_are_checkpoint_errors():
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor(make_ckpt(temperature=-1.0))
    with pytest.raises(CheckpointError, match="Operating point"):
        Predictor(make_ckpt(operating_point={"class": "Cat", "threshold": 0.5}))


def test_low_confidence_flag_uses_the_stored_cut_off():
    low = {"threshold": 0.6, "quantile": 0.05, "temperature": 1.0, "calibrated": True}
    p = const_predictor((0.25, 0.5, 0.25), 1.0, low_confidence=low).predict(xray_like())
    assert p.low_confidence_available and p.low_confidence and p.confidence == pytest.approx(0.5)
    p = const_predictor((0.25, 0.5, 0.25), 1.0, low_confidence={**low, "threshold": 0.4}).predict(
        xray_like())
    assert not p.low_confidence


def test_ood_flag_and_score_follow_the_stored_statistics(predictor):
    """The predictor scores the features that core.ood computes from the network as trained."""
    from core.model import model_from_checkpoint

    model = model_from_checkpoint(make_ckpt())
    imgs = [xray_like(s) for s in range(12)]
    with torch.inference_mode():
        feats = ood.pooled_layer_features(model, torch.stack([predictor.prepare(i).x for i in imgs]))
    train = {k: v[:8] for k, v in feats.items()}
    val = {k: v[8:] for k, v in feats.items()}
    stats = ood.fit_ood(train, np.arange(8) % 3, val, dim=4)
    assert stats["layer_names"] == list(ood.LAYERS)
    p_in = Predictor(make_ckpt(ood=stats), runtime=FAST)
    preds = p_in.predict_batch(imgs)
    expected = ood.ood_score(stats, feats)
    assert [p.ood_score for p in preds] == pytest.approx(expected, rel=1e-3)
    assert all(p.ood == (p.ood_score > stats["threshold"]) for p in preds)
    assert all(p.ood_available and p.ood_threshold == stats["threshold"] for p in preds)
    flag_all = Predictor(make_ckpt(ood={**stats, "threshold": -1.0}), runtime=FAST)
    assert all(p.ood for p in flag_all.predict_batch(imgs[:3]))
    # Statistics fitted on one plain array are those of the head's input (pooled layer4).
    single = ood.fit_ood(train["layer4"], np.arange(8) % 3, val["layer4"], dim=4)
    p1 = Predictor(make_ckpt(ood=single), runtime=FAST).predict(imgs[0])
    assert p1.ood_score == pytest.approx(ood.ood_score(single, feats["layer4"][:1])[0], rel=1e-3)


def test_calibrate_run_ood_stores_cut_offs_beside_the_checkpoint(tiny_dataset, tmp_path):
    from core.config import DataConfig
    from core.data import build_manifest
    from core.sidecars import load_run_checkpoint

    run = tmp_path / "run"
    build_manifest(DataConfig(data_dir=str(tiny_dataset)), progress=False).save(run / "manifest.csv")
    ckpt = make_ckpt(temperature=1.5)
    ckpt["classes"] = ["A", "B", "C"]
    save_checkpoint(ckpt, run / "best.pt")
    before = (run / "best.pt").read_bytes()
    out = ood.calibrate_run_ood(run, tiny_dataset, device="cpu", progress=False, dim=8)
    assert (run / "best.pt").read_bytes() == before  # the statistics go beside it
    back = load_run_checkpoint(run / "best.pt")
    assert back["temperature"] == 1.5 and back["ood"]["layer_names"] == list(ood.LAYERS)
    assert back["ood"]["threshold"] == out["ood"]["threshold"]
    assert back["low_confidence"]["temperature"] == 1.5 and back["low_confidence"]["calibrated"]
    assert 0 < back["low_confidence"]["threshold"] <= 1
    p = Predictor.from_checkpoint(run / "best.pt", runtime=FAST).predict(tiny_dataset / "A" / "A-0.png")
    assert p.ood_available and p.low_confidence_available
    assert not any("unavailable" in n or "not calibrated" in n for n in p.notes)
    assert math.isfinite(p.ood_score)
    assert back["ood"]["val_pass_rate"] >= 0.5


def test_fit_ood_passes_95_percent_of_validation_and_flags_far_points():
    rng = np.random.default_rng(0)
    d, n = 256, 600
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    y = rng.integers(0, 3, n)
    centers = rng.normal(scale=3.0, size=(3, d))

    def draw(labels: np.ndarray) -> np.ndarray:
        return centers[labels] + rng.normal(size=(len(labels), d)) @ mix

    stats = ood.fit_ood(draw(y), y, draw(rng.integers(0, 3, 400)), dim=32)
    assert stats["val_pass_rate"] == pytest.approx(0.95, abs=0.01)
    test_in = ood.ood_score(stats, draw(rng.integers(0, 3, 1000)))
    assert 0.9 <= (test_in <= stats["threshold"]).mean() <= 0.99
    far = ood.ood_score(stats, rng.normal(scale=3.0, size=(50, d)) + 10.0)
    assert (far > stats["threshold"]).all()
    # weights_only round trip: plain types and tensors only.
    buf = io.BytesIO()
    torch.save({"ood": stats}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["ood"]
    probe = draw(y[:5])
    assert np.allclose(ood.ood_score(back, probe), ood.ood_score(stats, probe))


# ---------------------------------------------------------------- explanations


def test_explain_returns_maps_at_the_original_resolution_of_a_non_square_image(predictor):
    img = xray_like(4, (120, 90))
    e = predictor.explain(img)
    assert isinstance(e, Explanation) and e.method == "gradcam"
    assert e.heatmap.shape == (120, 90) and e.heatmap.dtype == np.float32
    assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0 and e.heatmap.max() > 0
    assert e.overlay.shape == (120, 90, 3) and e.overlay.dtype == np.uint8
    assert e.prediction == predictor.predict(img)
    assert e.target == e.prediction.label
    other = predictor.explain(img, target="Viral Pneumonia")
    assert other.target == "Viral Pneumonia"
    pp = predictor.explain(img, method="gradcam++", target=0)
    assert pp.heatmap.shape == (120, 90) and pp.target == "COVID"


def test_fast_gradcam_equals_core_gradcam_forward_with_cam(predictor):
    """The predictor's CAM (the exported graph's layer4 output) equals gradcam.forward_with_cam on the
    network as trained, mapped back the same way."""
    from core.model import model_from_checkpoint

    img = xray_like(5, (100, 70))
    model = model_from_checkpoint(make_ckpt())
    x = predictor.prepare(img).x[None]
    with torch.inference_mode():
        logits, cams = gradcam.forward_with_cam(model, x)
    ref = gradcam.to_original(gradcam.upsample(cams, (64, 64))[0], (100, 70), 64, "letterbox")
    e = predictor.explain(img)
    assert np.abs(e.heatmap - ref).max() < 1e-3
    assert e.target == CLASSES[int(logits.argmax())]


def test_library_methods_reload_the_weights_of_a_runtime_predictor(tmp_path):
    """The runtime's graph holds the weights; gradcam++ re-reads them from the checkpoint
    file, and refuses a file that changed since the predictor was loaded."""
    path = tmp_path / "best.pt"
    save_checkpoint(make_ckpt(seed=3), path)
    served = Predictor.from_checkpoint(path, device="cpu", runtime="onnx")
    assert served.network == "onnx-fp32"
    img = xray_like(6, (90, 100))
    ref = Predictor(make_ckpt(seed=3), runtime=FAST).explain(img, method="gradcam++")
    got = served.explain(img, method="gradcam++")
    assert got.target == ref.target and np.abs(got.heatmap - ref.heatmap).max() < 1e-3
    served2 = Predictor.from_checkpoint(path, device="cpu", runtime="onnx")
    save_checkpoint(make_ckpt(seed=4), path)  # retrained meanwhile
    with pytest.raises(CheckpointError, match="changed on disk"):
        served2.explain(img, method="eigencam")


def test_explain_batch_matches_explain(predictor):
    imgs = [xray_like(s, (90 + 10 * s, 80)) for s in range(3)]
    batch = predictor.explain_batch(imgs)
    for img, b in zip(imgs, batch, strict=True):
        s = predictor.explain(img)
        assert b.heatmap.shape == s.heatmap.shape and b.target == s.target
        assert np.abs(b.heatmap - s.heatmap).max() < 1e-3


def assert_threads_match_serial(predictor: Predictor, imgs: list) -> None:
    """8 threads predicting and explaining the same images (each from another start) on one
    shared predictor give exactly the serial results."""
    serial = [(predictor.predict(im), predictor.explain(im)) for im in imgs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(k: int) -> None:
        try:
            start.wait()
            order = list(range(len(imgs)))[k % len(imgs):] + list(range(len(imgs)))[: k % len(imgs)]
            out = {}
            for j in order:
                out[j] = (predictor.predict(imgs[j]), predictor.explain(imgs[j]))
            results[k] = [out[j] for j in range(len(imgs))]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(8):
        for (p, e), (sp, se) in zip(results[k], serial, strict=True):
            assert p == sp and e.prediction == sp
            assert np.array_equal(e.heatmap, se.heatmap) and np.array_equal(e.overlay, se.overlay)


def test_eight_threads_on_one_predictor_give_the_serial_results(predictor):
    assert_threads_match_serial(predictor, [xray_like(s, (80 + 6 * s, 72)) for s in range(6)])


# ---------------------------------------------------------------- CLI


def test_predict_cli_on_a_folder_with_a_corrupt_file(tmp_path, capsys):
    ckpt_path = tmp_path / "run" / "best.pt"
    save_checkpoint(make_ckpt(temperature=1.3), ckpt_path)
    folder = tmp_path / "scans"
    for s in range(3):
        write_png(folder / f"scan{s}.png", xray_like(s, (90, 110)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out_csv = tmp_path / "out" / "pred.csv"
    heat = tmp_path / "heat"
    rc = predict_main(["--checkpoint", str(ckpt_path), str(folder), "--csv", str(out_csv),
                       "--heatmaps", str(heat), "--no-progress", "--device", "cpu",
                       "--runtime", FAST])
    assert rc == 1  # some files failed; the rest were predicted
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "scan0.png", "scan1.png",
                                                   "scan2.png"]
    assert list(rows[0]) == ["path", "label", "decision", *(f"p_{c}" for c in CLASSES),
                             "confidence", "low_confidence", "ood", "ood_score", "network", "heatmap",
                             "lung_focus", "error"]
    bad, good = rows[0], rows[1:]
    assert bad["error"] and not bad["label"]
    for r in good:
        assert r["error"] == "" and r["label"] in CLASSES and r["decision"] in CLASSES
        assert r["network"] == "torch-fp32"  # the runtime and precision asked for
        assert sum(float(r[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        with Image.open(r["heatmap"]) as im:
            assert im.size == (110, 90) and im.mode == "RGB"
    p = Predictor.from_checkpoint(ckpt_path).predict(folder / "scan1.png")
    assert float(good[1]["p_COVID"]) == pytest.approx(p.probabilities["COVID"], abs=1e-5)
    # Only a CSV (no heatmaps), all files good -> exit status 0.
    rc = predict_main(["--checkpoint", str(ckpt_path), str(folder / "scan0.png"),
                       "--csv", str(tmp_path / "one.csv"), "--no-progress"])
    assert rc == 0


def test_predict_cli_help_and_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        predict_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("--checkpoint", "--csv", "--heatmaps", "--method", "--device", "output",
                  "--runtime", "--precision", "onnx", "int8"):
        assert words in out
    rc = predict_main(["--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path),
                       "--csv", str(tmp_path / "x.csv"), "--no-progress"])
    assert rc == 2


# ---------------------------------------------------------------- real data: OOD


def non_xray_images() -> dict[str, np.ndarray]:
    """Inputs that are not chest X-rays: photos, textures, documents, noise."""
    from skimage import data as sk

    rng = np.random.default_rng(0)
    imgs: dict[str, np.ndarray] = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "coins",
                 "brick", "grass", "gravel", "clock", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "cell", "text", "page"):
        imgs[name] = np.asarray(getattr(sk, name)())
    imgs["checkerboard"] = np.asarray(sk.checkerboard())
    imgs["horse"] = np.asarray(sk.horse(), np.uint8) * 255
    imgs["uniform_noise"] = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    imgs["gaussian_noise"] = np.clip(rng.normal(128, 40, (256, 256)), 0, 255).astype(np.uint8)
    imgs["colour_noise"] = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    doc = Image.new("L", (400, 520), 255)
    draw = ImageDraw.Draw(doc)
    for k in range(24):
        draw.text((20, 12 + 20 * k), f"Line {k}: the quick brown fox jumps over the lazy dog.",
                  fill=0)
    imgs["rendered_document"] = np.asarray(doc)
    return imgs


@pytest.fixture(scope="module")
def ood_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of the session's real run with OOD statistics (a copy, unless already there)."""
    from core.sidecars import load_run_checkpoint

    if load_run_checkpoint(trained_run).get("ood") is not None:
        return trained_run
    run = tmp_path_factory.mktemp("ood_run")
    for name in ("best.pt", "manifest.csv", "best.calibration.json"):
        shutil.copy2(trained_run.parent / name, run / name)
    from tests.conftest import REAL_DIR

    ood.calibrate_run_ood(run, REAL_DIR, device="cpu", progress=False)
    return run / "best.pt"


@pytest.mark.slow
def test_real_ood_false_alarms_on_test_x_rays_and_detects_non_x_rays(ood_run: Path, real_dir: Path):
    from core.data import load_manifest
    from core.sidecars import load_run_checkpoint

    ckpt = load_run_checkpoint(ood_run)
    assert ckpt["ood"]["val_pass_rate"] >= 0.94 and 0.0 < ckpt["low_confidence"]["threshold"] < 1
    predictor = Predictor.from_checkpoint(ood_run, device="cpu")
    rows = load_manifest(ood_run.parent / "manifest.csv", real_dir).split("test")
    test_preds = predictor.predict_batch([real_dir / r["path"] for r in rows])
    false_alarm = float(np.mean([p.ood for p in test_preds]))
    low_conf = float(np.mean([p.low_confidence for p in test_preds]))
    others = non_xray_images()
    other_preds = predictor.predict_batch(list(others.values()))
    detected = {n: p.ood for n, p in zip(others, other_preds, strict=True)}
    detection = float(np.mean(list(detected.values())))
    layers = "+".join(ckpt["ood"]["layer_names"])
    print(f"\nOOD (Mahalanobis on pooled {layers}, cut-off {ckpt['ood']['threshold']:.3f}): "
          f"false-alarm rate on {len(rows)} real test X-rays {false_alarm:.3f}; detection rate "
          f"on {len(others)} non-X-ray images {detection:.3f}; missed: "
          f"{[n for n, d in detected.items() if not d]}")
    print(f"Low-confidence rate on the test X-rays {low_conf:.3f} (cut-off "
          f"p < {ckpt['low_confidence']['threshold']:.3f}, 5% of validation by design)")
    assert detection >= 0.8
    assert false_alarm <= 0.15
    assert low_conf <= 0.2


def test_explain_gives_the_lung_mask_focus_and_contour_on_a_real_x_ray(predictor, real_dir):
    from core import lungs

    path = sorted((real_dir / "Normal" / "images").glob("*.png"))[0]
    plain = predictor.explain(path, lung_focus=False)
    assert plain.lung_mask is None and math.isnan(plain.lung_focus)
    exp = predictor.explain(path, lung_contour=True)
    gray = np.asarray(Image.open(path).convert("L"))
    assert exp.lung_mask.shape == gray.shape and 0.05 < exp.lung_mask.mean() < 0.8
    assert np.array_equal(exp.lung_mask, lungs.default_segmenter().segment(gray / 255.0))
    assert exp.lung_focus == pytest.approx(lungs.lung_focus_ratio(exp.heatmap, exp.lung_mask))
    changed = np.any(exp.overlay != plain.overlay, axis=2)  # only the outline was drawn
    assert 0 < changed.mean() < 0.1
    assert np.array_equal(exp.heatmap, plain.heatmap)


def test_explain_without_a_plausible_lung_field_has_no_focus(predictor):
    exp = predictor.explain(np.zeros((128, 128), np.uint8))
    assert exp.lung_mask is None and math.isnan(exp.lung_focus)
