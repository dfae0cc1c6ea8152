"""Grad-CAM and phantoms: the fast path is exact, maps localise lesions, sanity checks, threads.

The trained-model tests use small models trained on procedural phantoms (``core.synthetic``)
once per session: ``quick_phantom_run`` (96 px, ~30 s of CPU) for what any trained model must show, and,
under ``@pytest.mark.slow``, ``phantom_run`` (224 px, ~2 min of CPU) for the pointing game; see
their docstrings for the size/time trade-off.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from core import gradcam as G
from core import synthetic
from core.config import AugmentConfig, DataConfig, PreprocessConfig, RunConfig, TrainConfig
from core.errors import ConfigError
from core.model import build_model, load_checkpoint, model_from_checkpoint
from core.preprocess import build_transform, letterbox_box, resize

log = logging.getLogger(__name__)


class _GradCAMNoResize(GradCAM):
    """pytorch-grad-cam's GradCAM with its maps left at the layer's resolution (7x7): with
    no target size, ``scale_cam_image`` only min-max normalises (after the ReLU)."""

    def get_target_width_height(self, input_tensor):
        return None


def _random_model(arch: str, num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(num_classes, weights="none", arch=arch, dropout=0.3).eval()


# ---------------------------------------------------------------- 1. the fast path is Grad-CAM


@pytest.mark.parametrize(("arch", "targets"), [("resnet18", [1, 3]), ("resnet50", [2])])
def test_fast_cam_equals_pytorch_grad_cam(arch, targets):
    """At layer4 (7x7 at 224 px) our forward-only map equals the library's Grad-CAM, both at
    the layer's resolution and upsampled to the input (fp32, eval mode)."""
    model = _random_model(arch)
    x = torch.randn(len(targets), 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, cams = G.forward_with_cam(model, x, targets)
        assert torch.equal(logits, model(x))  # the same forward pass as the model's own
    assert cams.shape == (len(targets), 7, 7) and cams.dtype == torch.float32
    assert all(float(c.max()) == 1.0 for c in cams)  # non-trivial maps, normalised

    lib_targets = [ClassifierOutputTarget(t) for t in targets]
    with _GradCAMNoResize(model=model, target_layers=[model.layer4[-1]]) as cam:
        lib7 = cam(input_tensor=x, targets=lib_targets)
    np.testing.assert_allclose(cams.numpy(), lib7, atol=1e-4)

    # Upsampled to the input, every method's maps go through one resize (G.upsample).
    ours = G.explain(model, x, "gradcam", target=targets)
    assert ours.shape == (len(targets), 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, G.upsample(lib7, (224, 224)), atol=1e-4)
    via_library = G.explain(model, x, "gradcam", target=targets, target_layer="layer4.0")
    assert via_library.shape == ours.shape  # the library path at another layer, same resize


def test_fast_cam_default_target_is_argmax_and_runs_under_bf16_autocast():
    model = _random_model("resnet18")
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits, cams = G.forward_with_cam(model, x)
        _, cams_top = G.forward_with_cam(model, x, logits.argmax(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, cams16 = G.forward_with_cam(model, x)
    assert torch.equal(cams, cams_top)
    assert logits16.dtype == torch.bfloat16 and cams16.dtype == torch.float32
    assert float(cams16.min()) >= 0.0 and float(cams16.max()) <= 1.0
    assert float((cams16 - cams).abs().max()) < 0.1  # bf16 rounding only


def test_all_zero_cam_stays_zero():
    model = _random_model("resnet18")
    with torch.no_grad():
        G.classifier_layer(model).weight.fill_(-1.0)  # every channel pushes the logit down
    with torch.inference_mode():
        _, cams = G.forward_with_cam(model, torch.randn(1, 3, 64, 64), 0)
    assert float(cams.abs().max()) == 0.0
    assert float(np.abs(G.upsample(cams, (64, 64))).max()) == 0.0


def test_invalid_method_layer_and_target_list_the_choices():
    model = _random_model("resnet18")
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="gradcam\\+\\+"):
        G.explain(model, x, method="lime")
    with pytest.raises(ConfigError, match="layer4.1"):
        G.explain(model, x, target_layer="layer5")
    with pytest.raises(ConfigError, match="0..3"):
        G.explain(model, x, target=7)
    assert G.resolve_layer(model, "layer4") is model.layer4[-1]
    assert G.resolve_layer(model, "layer3") is model.layer3[-1]
    assert G.resolve_layer(model, "layer4.0") is model.layer4[0]


def test_library_methods_run_under_inference_mode_and_autocast():
    """The library path needs autograd in fp32; it must still work when the caller is
    inside ``torch.inference_mode`` and bf16 autocast (as the Predictor is)."""
    model = _random_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x_inf = x.clone()
        maps = {m: G.explain(model, x_inf, m, target=1) for m in G.METHODS if m != "gradcam"}
        maps["gradcam@layer3"] = G.explain(model, x_inf, "gradcam", 1, target_layer="layer3")
    for name, h in maps.items():
        assert h.shape == (2, 64, 64) and h.dtype == np.float32, name
        assert np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0, name
    assert all(p.grad is None for p in model.parameters())  # the shared model got no grads


# ---------------------------------------------------------------- 2-3. a model trained on phantoms

PHANTOM_SIZE = 224  # phantoms are drawn and the model trained at 224 px (layer4: 7x7)
QUICK_SIZE, QUICK_N, QUICK_EPOCHS = 96, 60, 10  # the default run's phantom model
# Bounds measured on a 2-core AVX512-BF16 CPU (fp32, one thread; two runs gave identical
# figures), less a margin for other CPUs' float paths (AVX2-only CPUs run other kernels and
# train a slightly different model; earlier figures moved by up to 0.17 between paths).
QUICK_MIN_ACCURACY = 0.7  # measured 0.87 on the 30 quick test phantoms; chance 0.25
MIN_POINTING_LAYER4 = 0.45  # measured 0.65; chance 0.09-0.16
MIN_POINTING_LAYER3 = 0.7  # measured 0.90
LESION_CLASSES = ("COVID", "Lung_Opacity", "Viral Pneumonia")
TOLERANCE_PX = 15  # the pointing game's tolerance at 224 px (Zhang et al., 2016)
TEST_PER_CLASS = 20  # fresh test phantoms per lesion class


def _train_phantoms(tmp: Path, size: int, n_per_class: int, epochs: int,
                    test_per_class: int) -> dict:
    """A ResNet18 trained from scratch with ``core.train.fit`` on ``4 x n_per_class`` phantoms
    at ``size`` px, in fp32 on one thread (one floating-point path: deterministic on a given
    CPU), and ``test_per_class`` fresh test phantoms per lesion class with their masks."""
    root = synthetic.write_dataset(tmp / "data", n_per_class=n_per_class, size=size, seed=0)
    pp = PreprocessConfig(img_size=size)
    cfg = RunConfig(
        data=DataConfig(data_dir=str(root)),
        preprocess=pp,
        # Shifts and zooms: a finding is a finding wherever it lies, so the features (and the
        # maps) follow the lesion rather than its usual place.
        augment=AugmentConfig(translate=0.1, scale=0.1),
        train=TrainConfig(output=str(tmp / "run"), arch="resnet18", weights="none",
                          mode="finetune", epochs=epochs, batch_size=16, lr=2e-3,
                          backbone_lr_mult=1.0, scheduler="cosine", dropout=0.0,
                          early_stop_patience=epochs, evaluate=False, seed=0,
                          precision="fp32"),
    )
    start = time.perf_counter()
    # One thread: one reduction order (with two threads the same seed took another path:
    # layer3 pointing 0.67 instead of 1.0).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The last epoch's weights (a cosine schedule ends at its smallest steps).
        ckpt = load_checkpoint(fit_run(cfg).parent / "last.pt")
    finally:
        torch.set_num_threads(threads)
    hist = ckpt["history"][-1]
    log.info("phantom model (%d px) trained in %.0f s; train acc %.2f, val acc %.2f", size,
             time.perf_counter() - start, hist["train_acc"], hist["val_acc"])
    model = model_from_checkpoint(ckpt)
    # Fresh phantoms (another seed) with their lesion masks, preprocessed by the contract.
    rng = np.random.default_rng(123)
    tf = build_transform(pp)
    images, masks, targets = [], [], []
    for cls in LESION_CLASSES:
        for _ in range(test_per_class):
            img, mask = synthetic.make_phantom(cls, rng, size)
            images.append(tf(img.astype(np.float32) / 255.0))
            masks.append(mask)
            targets.append(ckpt["classes"].index(cls))
    return {"model": model, "classes": ckpt["classes"], "x": torch.stack(images),
            "masks": masks, "targets": targets, "size": size}


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """For the slow pointing game: a ResNet18 trained on 4 x 60 phantoms at 224 px, 10 epochs
    (121 s of CPU time on one thread; test accuracy 0.98), and 20 fresh test phantoms per
    lesion class.

    Why ResNet18 and not the product's ResNet50: ImageNet weights cannot be downloaded in CI,
    and a from-scratch ResNet50 at 224 px costs ~4x more per image. Why 224 px: at 96, 128
    and 160 px the maps were centre-biased (pointing 0.0-0.5): the deep layers' receptive
    fields cover the whole image, so from-scratch evidence pools at the centre; at 224 px it
    localises.
    """
    return _train_phantoms(tmp_path_factory.mktemp("phantoms"), PHANTOM_SIZE, 60, 10,
                           TEST_PER_CLASS)


@pytest.fixture(scope="session")
def quick_phantom_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """For the default run: the same recipe on 60 phantoms per class at 96 px, 10 epochs
    (32 s of CPU time on one thread), and 10 test phantoms per lesion class: a model that
    learned the findings, on which maps can be checked for validity and for their
    dependence on the weights (not for localisation: see ``phantom_run``)."""
    return _train_phantoms(tmp_path_factory.mktemp("quick_phantoms"), QUICK_SIZE, QUICK_N,
                           QUICK_EPOCHS, 10)


def fit_run(cfg: RunConfig) -> Path:
    from core.train import fit

    return fit(cfg, progress=False)


def _pointing(run: dict, method: str = "gradcam", layer: str = "layer3",
              tolerance: float = TOLERANCE_PX) -> float:
    heat = G.explain(run["model"], run["x"], method, target=run["targets"], target_layer=layer)
    back = [G.to_original(h, m.shape, run["size"], "letterbox")
            for h, m in zip(heat, run["masks"], strict=True)]
    return G.pointing_game(back, run["masks"], tolerance=tolerance)


def test_pointing_game_counts_peaks_in_or_near_the_lesion():
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    maps = []
    for y, x in [(6, 6), (10, 6), (19, 19)]:  # inside; 3 px below the lesion; far away
        h = np.zeros((20, 20), np.float32)
        h[y, x] = 1.0
        maps.append(h)
    assert G.peak(maps[1]) == (10, 6)
    assert G.pointing_game(maps, [mask] * 3) == pytest.approx(1 / 3)
    assert G.pointing_game(maps, [mask] * 3, tolerance=3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        G.pointing_game(maps, [mask[:10]] * 3)


def _accuracy(run: dict) -> float:
    with torch.inference_mode():
        pred = run["model"].eval()(run["x"]).argmax(1).numpy()
    return float((pred == np.asarray(run["targets"])).mean())


def test_the_phantom_model_learned_the_findings(quick_phantom_run):
    assert _accuracy(quick_phantom_run) >= QUICK_MIN_ACCURACY  # chance: 0.25


@pytest.mark.slow
def test_pointing_game_on_phantoms(phantom_run):
    """The true class's Grad-CAM peak, mapped back onto the phantom, lands in or near (the
    pointing game's standard 15 px tolerance at 224 px, Zhang et al. 2016) its lesion for
    most of the 60 test phantoms with a lesion, at ``layer4`` (7x7) and at ``layer3``.

    Chance: the lesions grown by 15 px cover 9-16 % of a phantom. Measured (fp32 training on
    one thread, twice, identical): layer4 0.65 (0.13 strictly inside: a 7x7 map's peak
    cannot sit inside a 40 px lesion that lies between its cells), layer3 0.90 (0.50
    strict); the bounds keep 0.2 of margin (see MIN_POINTING_*). Earlier runs trained with
    bf16 autocast (``precision="auto"`` on a CPU with native bf16) measured layer4 0.93 and
    layer3 0.95: another float path trains another model. What had got layer4 from 0.77 to
    0.93 there: bicubic instead of bilinear upsampling (``core.gradcam.upsample``) and
    shift/zoom augmentation; 20 epochs instead of 10 did not help (0.78)."""
    assert _accuracy(phantom_run) >= 0.8  # chance: 0.25
    fine = _pointing(phantom_run)
    strict = _pointing(phantom_run, tolerance=0)
    coarse = _pointing(phantom_run, layer="layer4")
    coarse_strict = _pointing(phantom_run, layer="layer4", tolerance=0)
    log.warning("pointing game, Grad-CAM true class, %d phantoms: layer4 %.2f (%.2f strictly "
                "inside), layer3 %.2f (%.2f)", len(phantom_run["masks"]), coarse, coarse_strict,
                fine, strict)
    assert coarse >= MIN_POINTING_LAYER4
    assert fine >= MIN_POINTING_LAYER3


def test_other_methods_give_valid_maps_on_the_trained_model(quick_phantom_run):
    run = quick_phantom_run
    x, size = run["x"][:4], run["size"]
    for method in ("gradcam++", "eigencam"):
        for layer in ("layer4", "layer3"):
            h = G.explain(run["model"], x, method, target=run["targets"][:4], target_layer=layer)
            assert h.shape == (4, size, size) and h.dtype == np.float32
            assert np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0
            assert all(m.max() == pytest.approx(1.0) for m in h), (method, layer)


def test_model_randomisation_changes_the_maps(quick_phantom_run):
    """Adebayo et al. (2018): maps that survive re-initialising the top of the network
    would not explain the model. Two explains of the trained model are identical."""
    run = quick_phantom_run
    model, x, targets = run["model"], run["x"], run["targets"]
    trained = G.explain(model, x, target=targets)
    assert np.array_equal(trained, G.explain(model, x, target=targets))
    rnd = G.randomize_weights(model, seed=1, down_to="layer4")
    randomised = G.explain(rnd, x, target=targets)
    change = float(np.mean([G.cam_change(a, b) for a, b in zip(trained, randomised,
                                                               strict=True)]))
    log.info("mean cam_change after re-initialising fc + layer4: %.2f", change)
    assert change > 0.5


# ---------------------------------------------------------------- 4. hooks and threads


def _assert_no_hooks(module: torch.nn.Module) -> None:
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", {}), m


def test_library_explain_leaves_no_hooks_on_the_model():
    model = _random_model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    for method in ("gradcam++", "eigencam"):
        G.explain(model, x, method)
        G.explain(model, x, "gradcam", target_layer="layer3")
    _assert_no_hooks(model)
    assert not model.training


def test_concurrent_explains_equal_serial_ones():
    """8 threads on one shared model, mixing the hook-free fast path, a library method and
    plain forward passes, give exactly the serial results."""
    model = _random_model("resnet18")
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 3, 64, 64, generator=gen) for _ in range(8)]
    jobs = [("gradcam" if i % 2 == 0 else "gradcam++", inputs[i]) for i in range(8)]
    serial = [G.explain(model, x, m) for m, x in jobs]
    with torch.inference_mode():
        serial_logits = [model(x) for x in inputs]

    results: list[np.ndarray | None] = [None] * 8
    logits: list[torch.Tensor | None] = [None] * 8
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            m, x = jobs[i]
            results[i] = G.explain(model, x, m)
            with torch.inference_mode():
                logits[i] = model(inputs[(i + 1) % 8])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(8):
        assert np.array_equal(results[i], serial[i]), f"thread {i} ({jobs[i][0]}) differs"
        assert torch.equal(logits[i], serial_logits[(i + 1) % 8])
    _assert_no_hooks(model)


# ---------------------------------------------------------------- 5. mapping back, overlays


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_to_original_undoes_the_resize(mode):
    h, w, size = 300, 180, 64  # portrait: letterbox pads left and right
    orig = np.zeros((h, w), np.float32)
    orig[200:260, 120:170] = 1.0  # a hot patch, lower right
    heat = resize(orig, size, mode)
    if mode == "letterbox":
        top, left, nh, nw = letterbox_box((h, w), size)
        assert left > 0 and heat[:, :left].max() == 0  # the padding is cold
    back = G.to_original(heat, (h, w), size, mode)
    assert back.shape == (h, w) and back.dtype == np.float32
    y, x = np.unravel_index(np.argmax(back), back.shape)
    assert 200 <= y < 260 and 120 <= x < 170
    assert back[orig > 0].mean() > 0.8 and back[:150].max() < 0.05
    assert np.corrcoef(back.ravel(), orig.ravel())[0, 1] > 0.9


def test_to_original_rejects_bad_input():
    with pytest.raises(ConfigError, match="letterbox"):
        G.to_original(np.zeros((64, 64)), (10, 10), 64, "crop")
    with pytest.raises(ValueError, match="model input"):
        G.to_original(np.zeros((32, 32)), (10, 10), 64, "letterbox")


def test_overlay_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    heat = rng.random((40, 30)).astype(np.float32)
    gray_f = rng.random((40, 30)).astype(np.float32)
    gray_u8 = (gray_f * 255).astype(np.uint8)
    rgb = np.stack([gray_u8] * 3, axis=2)
    for img in (gray_f, gray_u8, rgb):
        out = G.overlay(img, heat, alpha=0.5)
        assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(G.overlay(rgb, heat, alpha=0.0), rgb)
    hot = G.overlay(np.zeros((4, 4), np.uint8), np.ones((4, 4)), alpha=1.0, colormap="jet")
    assert hot[0, 0, 0] > 100 and hot[0, 0, 2] < 50  # jet's top is red, and RGB order is kept
    outs = G.overlays([gray_u8, rgb], [heat, heat], colormap="inferno")
    assert len(outs) == 2 and all(o.shape == (40, 30, 3) for o in outs)
    with pytest.raises(ConfigError, match="jet"):
        G.overlay(gray_u8, heat, colormap="rainbow-unicorn")
    with pytest.raises(ValueError, match="to_original"):
        G.overlay(gray_u8, heat[:20])


def test_explain_batch_matches_explain():
    model = _random_model("resnet18")
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    whole = G.explain(model, x, "gradcam", target=2)
    assert np.array_equal(G.explain_batch(model, list(x), targets=2, batch_size=2), whole)


def test_cam_change():
    a = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert G.cam_change(a, a) == pytest.approx(0.0)
    assert G.cam_change(a, a[::-1, ::-1]) == pytest.approx(2.0)
    assert G.cam_change(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0
    assert G.cam_change(np.zeros((3, 3)), a[:3, :3]) == 1.0


def test_randomize_weights_cascades_and_leaves_the_original_alone():
    model = _random_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = G.randomize_weights(model, seed=1, down_to="layer4")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    new = rnd.state_dict()
    changed = {k.split(".")[0] for k in before
               if before[k].is_floating_point() and not torch.equal(before[k], new[k])}
    assert changed == {"fc", "layer4"}
    again = G.randomize_weights(model, seed=1, down_to="layer4").state_dict()
    assert all(torch.equal(new[k], again[k]) for k in new)  # seeded
    with pytest.raises(ConfigError, match="stem"):
        G.randomize_weights(model, down_to="head")


# ---------------------------------------------------------------- phantoms


def test_phantoms_are_seeded_and_have_the_promised_lesions():
    size = 224
    for cls in synthetic.CLASSES:
        img, mask = synthetic.make_phantom(cls, np.random.default_rng(7), size)
        img2, mask2 = synthetic.make_phantom(cls, np.random.default_rng(7), size)
        assert img.dtype == np.uint8 and img.shape == (size, size) and mask.dtype == bool
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
        if cls == "Normal":
            assert not mask.any()
            continue
        ys, xs = np.nonzero(mask)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 >= size / 7, cls
        # the finding is denser (brighter) than the same phantom's lung elsewhere
        assert img[mask].mean() > img[~mask].mean() - 5
    with pytest.raises(ConfigError, match="Lung_Opacity"):
        synthetic.make_phantom("Pneumothorax", np.random.default_rng(0))


def test_write_dataset_layout_is_discovered_without_the_masks(tmp_path):
    from core.data import discover

    root = synthetic.write_dataset(tmp_path / "ph", 2, size=64, seed=1)
    ds = discover(root)
    assert ds.layout == "plain" and ds.classes == sorted(synthetic.CLASSES)
    assert len(ds.items) == 2 * len(synthetic.CLASSES)
    for rel, cls in ds.items:
        mask = synthetic.load_mask(root, rel)
        assert mask.shape == (64, 64) and (mask.any() == (cls != "Normal"))
    assert synthetic.main(["--output", str(tmp_path / "cli"), "--n-per-class", "1",
                           "--size", "48", "--classes", "Normal", "COVID"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["COVID", "Normal", "_masks"]
