"""The lung segmenter on the serving runtime (core.serving.open_segmenter, ``segmenter.onnx``):
its masks agree with the eager torch U-Net's on phantoms and real X-rays, the sidecar carries
the segmenter weights' hash and is exported again when that does not match, and a lung-view
run served from ONNX Runtime segments there and crops the same lung box as torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from core import export, lungs, serving, synthetic
from core.config import PreprocessConfig, to_dict
from core.inference import Predictor
from core.model import save_checkpoint
from core.pixels import load_gray
from tests.conftest import require_real
from tests.test_inference import make_ckpt

MIN_IOU = 0.99
MIN_PIXEL_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def torch_seg() -> lungs.LungSegmenter:
    return lungs.default_segmenter()


@pytest.fixture(scope="module")
def onnx_seg() -> lungs.LungSegmenter:
    return serving.open_segmenter("onnx")  # no checkpoint: exported in memory


def phantoms(n: int = 3, size: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [synthetic.make_phantom(c, rng, size)[0]
            for c in ("Normal", "COVID", "Viral Pneumonia", "Lung_Opacity")[:n]]


def assert_same_masks(a: lungs.LungSegmenter, b: lungs.LungSegmenter,
                      images: list[np.ndarray]) -> None:
    for img in images:
        ma, mb = a.segment(img), b.segment(img)
        assert not lungs.implausible(ma), lungs.implausible(ma)  # a lung field to agree on
        iou = (ma & mb).sum() / (ma | mb).sum()
        agreement = (ma == mb).mean()
        assert iou >= MIN_IOU and agreement >= MIN_PIXEL_AGREEMENT, (iou, agreement)


def lung_view_run(folder: Path, view: str = "crop") -> Path:
    """A small random-init ResNet18 checkpoint (64 px) whose preprocessing has a lung view
    pinned to the shipped segmenter, saved as ``folder/best.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    pp = PreprocessConfig(img_size=64, lung_view=view,
                          segmenter_sha256=export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))
    save_checkpoint(make_ckpt(seed=3, preprocess=to_dict(pp)), folder / "best.pt")
    return folder / "best.pt"


def test_onnx_segmenter_masks_agree_with_the_torch_unet_on_phantoms(torch_seg, onnx_seg):
    assert onnx_seg.runtime == "onnx-fp32" and torch_seg.runtime == "torch-fp32"
    assert onnx_seg.sha256 == torch_seg.sha256 == export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH)
    img = phantoms(1)[0]
    assert np.abs(onnx_seg.logits(img) - torch_seg.logits(img)).max() < 1e-3
    assert_same_masks(torch_seg, onnx_seg, phantoms(4) + [phantoms(1, size=180)[0][:, 20:170]])


def test_openvino_segmenter_masks_agree_with_the_torch_unet_on_phantoms(torch_seg):
    """The same graph on OpenVINO (compiled for one image at a time)."""
    from core import network as net

    if not net.runtime_available("openvino"):
        pytest.skip("the openvino runtime is not installed (requirements.txt has it)")
    ov_seg = serving.open_segmenter("openvino")
    assert ov_seg.runtime == "openvino-fp32"
    img = phantoms(1)[0]
    assert np.abs(ov_seg.logits(img) - torch_seg.logits(img)).max() < 1e-3
    assert_same_masks(torch_seg, ov_seg, phantoms(4) + [phantoms(1, size=180)[0][:, 20:170]])


def test_onnx_segmenter_masks_agree_with_the_torch_unet_on_real_xrays(torch_seg, onnx_seg):
    real = require_real()
    paths = [p for c in ("COVID", "Normal", "Viral Pneumonia")
             for p in sorted((real / c / "images").glob("*.png"))[::60][:4]]
    assert len(paths) == 12
    assert_same_masks(torch_seg, onnx_seg, [load_gray(p) for p in paths])


def test_the_sidecar_is_stamped_and_exported_again_when_its_stamp_does_not_match(
        tmp_path, torch_seg):
    best = tmp_path / "best.pt"
    path = export.ensure_segmenter_graph(export.segmenter_graph_path(best), torch_seg)
    assert path == tmp_path / "segmenter.onnx"
    assert export.graph_metadata(path)["weights_sha256"] == torch_seg.sha256
    stamp = path.stat().st_mtime_ns
    assert export.ensure_segmenter_graph(path, torch_seg) == path
    assert path.stat().st_mtime_ns == stamp  # current: not exported again

    proto = onnx.load(str(path))  # the export of other segmenter weights
    onnx.helper.set_model_props(proto, {**export.graph_metadata(path), "weights_sha256": "0" * 64})
    onnx.save(proto, str(path))
    assert not export.is_current(path, torch_seg.sha256)
    export.ensure_segmenter_graph(path, torch_seg)
    assert export.is_current(path, torch_seg.sha256)
    stamp = path.stat().st_mtime_ns
    best.write_bytes(b"")  # open_segmenter serves the sidecar beside an existing checkpoint
    rebuilt = serving.open_segmenter("onnx", str(best))
    assert path.stat().st_mtime_ns == stamp and rebuilt.runtime == "onnx-fp32"
    assert_same_masks(torch_seg, rebuilt, phantoms(1))

    path.write_bytes(b"not an onnx file")  # a damaged sidecar is exported again too
    export.ensure_segmenter_graph(path, torch_seg)
    assert export.is_current(path, torch_seg.sha256)


def test_a_lung_view_run_served_from_onnx_segments_there_and_crops_like_torch(tmp_path):
    best = lung_view_run(tmp_path / "run")
    served = Predictor.from_checkpoint(best, device="cpu", runtime="onnx")
    sidecar = tmp_path / "run" / "segmenter.onnx"
    assert export.is_current(sidecar, export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))
    eager = Predictor.from_checkpoint(best, device="cpu", runtime="torch")
    assert served.segmenter.runtime == "onnx-fp32" and eager.segmenter.runtime == "torch-fp32"
    images = phantoms(3)
    for img in images:
        a, b = served.prepare(img), eager.prepare(img)
        assert a.box == b.box and a.box != (0, 0, *img.shape), a.notes  # cropped to the lungs
        assert (a.lung_mask == b.lung_mask).mean() >= MIN_PIXEL_AGREEMENT
    got, ref = served.predict_batch(images), eager.predict_batch(images)
    assert [p.segmenter for p in got] == ["onnx-fp32"] * 3
    assert [p.segmenter for p in ref] == ["torch-fp32"] * 3
    assert [p.network for p in got] == ["onnx-fp32"] * 3
    assert [p.label for p in got] == [p.label for p in ref]
    assert max(abs(p.probabilities[c] - q.probabilities[c]) for p, q in zip(got, ref, strict=True)
               for c in p.classes) < 1e-4

    sidecar.write_bytes(b"stale")  # a stale sidecar never serves: the predictor exports again
    Predictor.from_checkpoint(best, device="cpu", runtime="onnx")
    assert export.is_current(sidecar, export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH))


def test_training_finish_and_the_cli_export_the_segmenter_for_lung_view_runs_only(
        tmp_path, small_run, capsys):
    with pytest.raises(SystemExit):
        export.main(["--help"])
    assert "segmenter.onnx" in capsys.readouterr().out
    best = lung_view_run(tmp_path / "soft", view="soft")
    assert export.finish_run(best.parent, None) is None
    sha = export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH)
    assert export.is_current(best.with_suffix(".onnx"), export.file_sha256(best))
    assert export.is_current(best.parent / "segmenter.onnx", sha)
    (best.parent / "segmenter.onnx").unlink()
    assert export.main([str(best.parent), "--no-check"]) == 0
    assert export.is_current(best.parent / "segmenter.onnx", sha)
    assert not (small_run / "segmenter.onnx").exists()  # lung view "none": no segmenter graph
    assert export.ensure_run_graphs(small_run / "best.pt") == [small_run / "best.onnx"]


def test_a_run_without_a_lung_view_has_no_segmenter():
    p = Predictor(make_ckpt(), runtime="torch")
    assert p.segmenter is None and p.predict(phantoms(1)[0]).segmenter == ""


def test_lung_focus_without_a_lung_view_segments_on_the_runtime_from_the_user_cache(
        small_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DATA_HOME", str(tmp_path / "home"))
    served = Predictor.from_checkpoint(small_run / "best.pt", device="cpu", runtime="onnx")
    eager = Predictor.from_checkpoint(small_run / "best.pt", device="cpu", runtime="torch")
    assert served.segmenter is None  # no lung view: nothing segments before the classifier
    img = phantoms(1)[0]
    got, ref = served.explain(img), eager.explain(img)
    assert got.prediction.segmenter == "" and got.lung_mask is not None
    assert (got.lung_mask == ref.lung_mask).mean() >= MIN_PIXEL_AGREEMENT
    assert got.lung_focus == pytest.approx(ref.lung_focus, rel=1e-2)
    sha = export.file_sha256(lungs.DEFAULT_SEGMENTER_PATH)
    cached = tmp_path / "home" / "cache" / f"lung_segmenter.{sha[:16]}.onnx"
    assert export.is_current(cached, sha)  # exported once into the user's cache...
    assert not (small_run / "segmenter.onnx").exists()  # ...never into the run folder
