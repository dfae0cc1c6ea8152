"""The exported serving graph (core.export) and the network interface (core.network):
the sidecar and its hash, fp32 agreement with PyTorch on real decisions, the
reduced-precision check, old int8 blocks."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core import export, serving
from core import network as net
from core.data import load_manifest
from core.devices import cpu_has_native_bf16
from core.inference import Predictor
from core.model import load_checkpoint, save_checkpoint
from tests.test_inference import make_ckpt, xray_like


def test_sidecar_records_the_weights_hash_and_is_rebuilt_when_it_does_not_match(tmp_path):
    best = tmp_path / "best.pt"
    save_checkpoint(make_ckpt(seed=1), best)
    served = Predictor.from_checkpoint(best, device="cpu", runtime="onnx")
    graph = tmp_path / "best.onnx"
    meta = export.graph_metadata(graph)
    assert meta["weights_sha256"] == export.file_sha256(best)
    assert json.loads(meta["stage_widths"]) == [64, 128, 256, 512]  # resnet18's stages
    stamp = graph.stat().st_mtime_ns
    assert export.ensure_graph(best) == graph and graph.stat().st_mtime_ns == stamp  # current
    img = xray_like(2, (90, 100))
    before = served.predict(img)
    save_checkpoint(make_ckpt(seed=2), best)  # retrained: the old graph must not serve
    assert not export.is_current(graph, export.file_sha256(best))
    again = Predictor.from_checkpoint(best, device="cpu", runtime="onnx")
    assert export.graph_metadata(graph)["weights_sha256"] == export.file_sha256(best)
    ref = Predictor(make_ckpt(seed=2), runtime="torch").predict(img)
    got = again.predict(img)
    assert got.network == "onnx-fp32" and got.label == ref.label
    assert max(abs(got.probabilities[c] - ref.probabilities[c]) for c in ref.classes) < 1e-4
    assert got.probabilities != before.probabilities
    graph.write_bytes(b"not an onnx file")  # a damaged sidecar is exported again too
    assert export.ensure_graph(best) == graph and export.is_current(graph, export.file_sha256(best))


RUNTIMES = [pytest.param(r, marks=pytest.mark.skipif(not net.runtime_available(r),
                                                    reason=f"the {r} runtime is not installed"))
            for r in ("onnx", "openvino")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_one_pass_gives_logits_layer4_and_the_pooled_stages_that_ood_scores(runtime):
    """On either runtime; a batch of 3 (OpenVINO runs its single-image graph per image)."""
    from core import ood
    from core.model import model_from_checkpoint

    ckpt = make_ckpt(seed=5)
    model = model_from_checkpoint(ckpt)
    x = torch.randn(3, 3, 64, 64)
    runtime = net.RuntimeNetwork(export.export_graph(model, 64), net.stage_widths(model), runtime,
                                 "fp32")
    out = runtime(x)
    with torch.inference_mode():
        logits = model(x)
        pooled = ood.pooled_layer_features(model, x)
    assert torch.allclose(out.logits, logits, atol=1e-4)
    assert out.layer4.shape == (3, 512, 2, 2)
    for name in ood.LAYERS:
        assert np.allclose(out.pooled[name], pooled[name].numpy(), atol=1e-4)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_concurrent_calls_get_their_own_answers(runtime):
    """The app shares one predictor between sessions: calls from several threads at once
    each get the outputs of their own images (OpenVINO's shared infer request used to
    raise "Infer Request is busy")."""
    from concurrent.futures import ThreadPoolExecutor

    from core.model import model_from_checkpoint

    model = model_from_checkpoint(make_ckpt(seed=7, img_size=96))
    network = net.RuntimeNetwork(export.export_graph(model, 96), net.stage_widths(model),
                                 runtime, "fp32")
    xs = [torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    alone = [network(x).logits for x in xs]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            together = list(pool.map(lambda x: network(x).logits, xs))
            for a, b in zip(alone, together, strict=True):
                assert torch.allclose(a, b, atol=1e-6)


def test_runtime_threads_work_during_a_call_and_rest_between_calls():
    """ONNX Runtime's threads spin inside a call (faster) but stop when it returns: the
    process uses next to no CPU while idle between calls, so it slows nothing that runs
    next (without ``force_spinning_stop`` they burnt ~45 ms of CPU in the 50 ms after each
    call of a ResNet50)."""
    import time

    from core.model import model_from_checkpoint

    model = model_from_checkpoint(make_ckpt(seed=6, img_size=160))
    run = net.runtime_session(export.export_graph(model, 160), "onnx", "fp32", net.OUTPUT_NAMES,
                              threads=2)
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 160)).astype(np.float32)
    run(x)
    idle = []
    for _ in range(5):
        t0 = time.process_time()
        run(x)
        busy = time.process_time() - t0
        t1 = time.process_time()
        time.sleep(0.1)
        idle.append(time.process_time() - t1)
    assert busy > 0  # the call did work on this process's threads
    assert max(idle) < 0.01, f"CPU seconds used while idle after a call: {idle}"


def _mapped_rss(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process (``/proc/self/smaps``)."""
    target, total, inside = str(Path(path).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _kernel_pages_out() -> bool:
    import platform
    import sys

    if not sys.platform.startswith("linux"):
        return False
    major, minor = (int(v) for v in platform.release().split(".")[:2])
    return (major, minor) >= (5, 4)


def _on_memory_fs(path: Path) -> bool:
    """``path`` lies on a filesystem held in memory (tmpfs...), whose pages cannot be handed
    back to a file (without swap they stay resident)."""
    target, best, fstype = str(Path(path).resolve()), "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind = line.split()[:3]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs", "shm")


def _pages_out_here() -> bool:
    import tempfile

    return _kernel_pages_out() and not _on_memory_fs(Path(tempfile.gettempdir()))


needs_pageout = pytest.mark.skipif(
    not _pages_out_here(),
    reason="MADV_PAGEOUT needs Linux 5.4 or later, and the temporary folder on a disk (not tmpfs)")
needs_openvino_bf16 = pytest.mark.skipif(
    not (net.runtime_available("openvino") and cpu_has_native_bf16()),
    reason="OpenVINO bf16 serves only where openvino is installed and the CPU runs bf16 "
           "natively (AVX512-BF16/AMX)")


@needs_pageout
def test_page_out_file_hands_back_a_mapped_files_pages_and_keeps_its_content(tmp_path):
    import hashlib
    import mmap
    import os

    from core.devices import page_out_file

    data = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # clean pages, as a weights file read by a runtime
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert hashlib.sha256(mapped).digest() == hashlib.sha256(data).digest()  # every page read
        before = _mapped_rss(path)
        assert before >= 15 << 20
        assert page_out_file(path) >= len(data)
        assert _mapped_rss(path) < before / 4
        assert mapped[:] == data  # read back from the file where touched again
    assert page_out_file(tmp_path / "not-mapped.bin") == 0


@needs_pageout
@needs_openvino_bf16
def test_openvino_bf16_reads_an_ir_and_hands_back_its_fp32_source_weights(tmp_path, monkeypatch):
    """OpenVINO reads the graph's IR from the user's cache, converted once; at bf16 the
    compiled network computes with bf16 copies of the weights, so the fp32 source weights it
    keeps mapped are handed back after the first call. The answers are those of the same
    network compiled from the ONNX file (which keeps them), call after call."""
    from core.model import model_from_checkpoint

    monkeypatch.setenv("CXR_DATA_HOME", str(tmp_path / "home"))
    model = model_from_checkpoint(make_ckpt(seed=8, img_size=96))
    onnx_file = tmp_path / "best.onnx"
    onnx_file.write_bytes(export.export_graph(model, 96))
    xml = serving.openvino_ir(onnx_file)
    weights = xml.with_suffix(".bin")
    assert xml.parent == tmp_path / "home" / "cache" / "openvino" and weights.is_file()
    stamp = weights.stat().st_mtime_ns
    assert serving.openvino_ir(onnx_file) == xml and weights.stat().st_mtime_ns == stamp  # once
    widths = net.stage_widths(model)
    from_ir = net.RuntimeNetwork(xml, widths, "openvino", "bf16")
    assert _mapped_rss(weights) < weights.stat().st_size / 4
    kept = net.RuntimeNetwork(onnx_file, widths, "openvino", "bf16")
    fp32 = net.RuntimeNetwork(xml, widths, "openvino", "fp32")
    for seed in range(3):
        x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(seed))
        a, b = from_ir(x), kept(x)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.layer4, b.layer4)
        with torch.inference_mode():
            assert torch.allclose(fp32(x).logits, model(x), atol=1e-4)
    del fp32  # the fp32 network computes from the mapped weights themselves
    gc.collect()
    from_ir(torch.zeros(1, 3, 96, 96))
    assert _mapped_rss(weights) < weights.stat().st_size / 4  # its calls never read them back


@pytest.mark.skipif(not net.runtime_available("openvino"), reason="openvino is not installed")
def test_openvino_ir_cache_converts_each_graph_once_and_keeps_the_most_recently_used(
        tmp_path, monkeypatch):
    import os

    from core.model import model_from_checkpoint

    monkeypatch.setenv("CXR_DATA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(serving, "OPENVINO_IR_KEEP", 2)
    graphs = []
    for seed in (1, 2, 3):
        path = tmp_path / f"g{seed}" / "best.onnx"
        path.parent.mkdir()
        path.write_bytes(export.export_graph(model_from_checkpoint(make_ckpt(seed=seed)), 64))
        graphs.append(path)
    first = serving.openvino_ir(graphs[0])
    second = serving.openvino_ir(graphs[1])
    assert first != second and first.name.startswith("best.")
    os.utime(first, (1, 1))  # the oldest use...
    os.utime(second, (2, 2))
    assert serving.openvino_ir(graphs[0]) == first  # ...until used again: now the most recent
    third = serving.openvino_ir(graphs[2])
    left = sorted(p.name for p in (tmp_path / "home" / "cache" / "openvino").iterdir())
    assert left == sorted([first.name, first.with_suffix(".bin").name,
                           third.name, third.with_suffix(".bin").name])
    widths = net.stage_widths(model_from_checkpoint(make_ckpt(seed=3)))
    x = torch.randn(1, 3, 64, 64)
    a = net.RuntimeNetwork(third, widths, "openvino", "fp32")(x)
    b = net.RuntimeNetwork(graphs[2], widths, "openvino", "fp32")(x)
    assert torch.equal(a.logits, b.logits)  # the same graph


def test_default_settings_serve_openvino_bf16_only_where_its_check_passed_and_the_cpu_runs_it(
        small_run, tmp_path, monkeypatch):
    """``runtime="auto", precision="auto"``: OpenVINO bf16 where serving.json records its
    passed check for these weights, openvino is installed and the CPU runs bf16 natively;
    fp32 on ONNX Runtime otherwise; an explicit runtime keeps its own choice. The run's
    summary says the same (core.runs.serving)."""
    from core import runs

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "best.onnx", "best.calibration.json", "best.ood.safetensors",
                 "serving.json", "manifest.csv", "config.json"):
        shutil.copy2(small_run / name, run / name)
    best = run / "best.pt"
    check = json.loads((run / export.SERVING_FILE).read_text())

    def served(passed: bool, **kwargs: str) -> str:
        check["checks"]["openvino-bf16"] = {"passed": passed}
        check["checks"]["onnx-int8"] = {"passed": False}
        (run / export.SERVING_FILE).write_text(json.dumps(check))
        return Predictor.from_checkpoint(best, device="cpu", **kwargs).network

    monkeypatch.setattr(serving, "cpu_has_native_bf16", lambda: False)
    assert served(True) == "onnx-fp32"  # this CPU would emulate bf16
    monkeypatch.setattr(serving, "cpu_has_native_bf16", lambda: True)
    assert served(False) == "onnx-fp32"  # its check failed
    assert runs.serving(check, export.file_sha256(best))["network"] == "onnx-fp32"
    assert served(True, runtime="onnx") == "onnx-fp32"  # the runtime asked for
    summary = runs.serving(check, export.file_sha256(best))
    assert summary["network"] == "openvino-bf16" and "OpenVINO" in summary["text"]
    available = net.runtime_available
    monkeypatch.setattr(net, "runtime_available", lambda r: r != "openvino" and available(r))
    assert served(True) == "onnx-fp32"  # not installed
    monkeypatch.setattr(net, "runtime_available", available)
    if net.runtime_available("openvino") and cpu_has_native_bf16():
        p = Predictor.from_checkpoint(best, device="cpu")
        assert p.network == "openvino-bf16"
        assert p.predict(xray_like(3)).network == "openvino-bf16"

    # The app's deployment setting: CXR_PRECISION=fp32 keeps PyTorch fp32's answers.
    from core import ui
    from core.errors import ConfigError

    monkeypatch.setattr(serving, "cpu_has_native_bf16", cpu_has_native_bf16)
    served(True)
    stamp = runs.predictor_files(best)
    for value, want in (("", "openvino-bf16" if serving.auto_serving(best)[0] == "openvino"
                         else "onnx-fp32"), ("fp32", "onnx-fp32"), (" FP32 ", "onnx-fp32")):
        monkeypatch.setenv("CXR_PRECISION", value)
        ui.load_predictor.clear()
        assert ui.load_predictor(str(best), stamp).network == want
    monkeypatch.setenv("CXR_PRECISION", "fast")
    ui.load_predictor.clear()
    with pytest.raises(ConfigError, match="precision='fast'"):
        ui.load_predictor(str(best), stamp)
    ui.load_predictor.clear()


def test_an_old_int8_block_is_loaded_and_ignored_with_a_note():
    ckpt = make_ckpt(int8={"engine": "onednn", "graph": 2, "observers": {"x": torch.zeros(1)}})
    p = Predictor(ckpt, runtime="torch")
    pred = p.predict(xray_like(1))
    assert serving.OLD_INT8_NOTE in pred.notes and pred.network == "torch-fp32"


def test_runtime_and_precision_choices_are_checked():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime="):
        Predictor(make_ckpt(), runtime="jit")
    with pytest.raises(ConfigError, match="int8"):
        Predictor(make_ckpt(), runtime="torch", precision="int8")
    with pytest.raises(ConfigError, match="not served by runtime='onnx'"):
        Predictor(make_ckpt(), runtime="onnx", precision="bf16")


def test_the_check_counts_screening_decisions_not_only_the_top_class():
    """A change across the screening threshold with the top class unchanged fails the check."""
    ckpt = {"classes": ["COVID", "Normal", "Viral Pneumonia"], "temperature": 1.0,
            "operating_point": {"class": "COVID", "threshold": 0.2}}
    ref = {"logits": np.log(np.array([[0.21, 0.70, 0.09]] + [[0.1, 0.1, 0.8]] * 199)),
           "pooled": {}}
    cand = {"logits": np.log(np.array([[0.19, 0.72, 0.09]] + [[0.1, 0.1, 0.8]] * 199)),
            "pooled": {}}
    c = export.compare(ref, cand, ckpt)
    assert c["top1_agreement"] == 1.0 and c["screening_changes"] == 1
    assert c["decision_changes"] == 1 and not c["passed"]
    same = export.compare(ref, ref, ckpt)
    assert same["passed"] and same["decision_changes"] == 0 and same["max_abs_dp"] == 0.0


def _split_images(run_dir: Path, data_dir: Path, split: str) -> list[bytes]:
    rows = load_manifest(run_dir / "manifest.csv", data_dir).split(split)
    return [(data_dir / r["path"]).read_bytes() for r in rows]


def assert_fp32_runtime_keeps_pytorch_decisions(best: Path, data_dir: Path) -> None:
    """On the run's test split: top-1 agreement 100 %, identical operating-point decisions
    and flags, probabilities within 1e-3, between the default predictor and PyTorch fp32."""
    images = _split_images(best.parent, data_dir, "test")
    assert len(images) >= 9  # the small run's test split holds 9
    default = Predictor.from_checkpoint(best, device="cpu", precision="fp32")
    assert default.network == f"{net.DEFAULT_RUNTIME}-fp32"
    eager = Predictor.from_checkpoint(best, device="cpu", runtime="torch", precision="fp32")
    a, b = eager.predict_batch(images), default.predict_batch(images)
    assert [p.label for p in a] == [p.label for p in b]
    assert [p.decision for p in a] == [p.decision for p in b]
    assert [p.ood for p in a] == [p.ood for p in b]
    assert [p.low_confidence for p in a] == [p.low_confidence for p in b]
    dp = max(abs(p.probabilities[c] - q.probabilities[c]) for p, q in zip(a, b, strict=True)
             for c in p.classes)
    assert dp < 1e-3


def test_fp32_runtime_keeps_pytorch_decisions_on_the_small_run(small_run):
    data_dir = Path(json.loads((small_run / "config.json").read_text())["data"]["data_dir"])
    assert_fp32_runtime_keeps_pytorch_decisions(small_run / "best.pt", data_dir)


@pytest.mark.slow
def test_fp32_runtime_keeps_pytorch_decisions_on_the_real_test_split(trained_run, real_dir):
    assert_fp32_runtime_keeps_pytorch_decisions(trained_run, real_dir)


def test_auto_precision_follows_the_check_for_these_weights(small_run, tmp_path):
    """serving.json decides: a passed reduced precision serves, a failed one or one
    checked on other weights does not."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "best.onnx", "best.calibration.json", "best.ood.safetensors",
                 "manifest.csv", "config.json"):
        shutil.copy2(small_run / name, run / name)  # best.onnx: exported by training's finish
    data_dir = json.loads((run / "config.json").read_text())["data"]["data_dir"]
    summary = export.check_reduced_precisions(run, data_dir, calibration_images=32)
    assert summary["checks"]["onnx-fp32"]["passed"]
    int8 = summary["checks"]["onnx-int8"]
    assert set(int8) >= {"top1_agreement", "decision_changes", "ood_flag_agreement", "passed"}
    assert int8["passed"] == (int8["top1_agreement"] >= 0.995 and int8["decision_changes"] == 0
                              and int8["screening_changes"] == 0
                              and int8["ood_flag_agreement"] >= 0.98)
    best = run / "best.pt"
    p = Predictor.from_checkpoint(best, device="cpu", runtime="onnx")
    assert p.network == ("onnx-int8" if int8["passed"] else "onnx-fp32")
    forced = json.loads((run / export.SERVING_FILE).read_text())
    forced["checks"]["onnx-int8"]["passed"] = True
    (run / export.SERVING_FILE).write_text(json.dumps(forced))
    assert Predictor.from_checkpoint(best, device="cpu", runtime="onnx").network == "onnx-int8"
    cal = run / "best.calibration.json"
    original = cal.read_text()
    doc = json.loads(original)
    doc["operating_point"]["threshold"] = 0.5  # refit meanwhile: the check no longer holds
    cal.write_text(json.dumps(doc))
    assert Predictor.from_checkpoint(best, device="cpu", runtime="onnx").network == "onnx-fp32"
    cal.write_text(original)
    forced["weights_sha256"] = "0" * 64  # checked on other weights: fp32
    (run / export.SERVING_FILE).write_text(json.dumps(forced))
    assert Predictor.from_checkpoint(best, device="cpu", runtime="onnx").network == "onnx-fp32"
    assert load_checkpoint(best)["classes"] == load_checkpoint(small_run / "best.pt")["classes"]


def test_export_cli_help_and_run(small_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        export.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("run_dir", "--data-dir", "--no-check", "--force", "hash", "int8"):
        assert words.lower() in out.lower()
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(small_run / "best.pt", run / "best.pt")
    assert export.main([str(run), "--no-check"]) == 0
    assert export.is_current(run / "best.onnx", export.file_sha256(run / "best.pt"))
    assert export.main([str(tmp_path / "missing")]) == 2
