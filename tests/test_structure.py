"""The library's shape: no import cycles between core modules (lazy imports included), the
evaluation split along its flow into modules under 500 lines, a small predictor constructor,
the metadata reader in the data layer, and ``python -m core.evaluate`` still the entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CORE = ROOT / "core"


def core_imports(path: Path) -> set[str]:
    """The core modules a file imports anywhere (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "core":
                out.update(a.name for a in node.names)
            elif node.module.startswith("core."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("core."))
    return out - {path.stem}


KNOWN_CYCLES: set[tuple[str, str]] = set()
"""None: the runtime issue removed ``core.quantize`` (the serving network is an exported
graph, ``core.export``), and with it the FX int8 network's imports both ways."""


def test_no_two_core_modules_import_each_other() -> None:
    graph = {p.stem: core_imports(p) for p in CORE.glob("*.py")}
    mutual = {tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
              if a in graph.get(b, set())}
    assert sorted(mutual - KNOWN_CYCLES) == [], f"mutual imports in core: {mutual}"
    assert ("evaluate", "runs") not in mutual  # the metadata reader moved to the data layer


def test_evaluation_modules_are_under_500_lines() -> None:
    for name in ("evaluate", "scoring", "calibration", "report", "metadata", "sidecars"):
        n = len((CORE / f"{name}.py").read_text().splitlines())
        assert n < 500, f"core/{name}.py has {n} lines"


def test_the_predictor_constructor_stays_small() -> None:
    """The runtime issue's bound: ``Predictor.__init__`` under 40 lines (it prepares, opens
    one network through ``core.serving.open_network`` and keeps what results need)."""
    tree = ast.parse((CORE / "inference.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    n = init.end_lineno - init.lineno + 1
    assert n < 40, f"Predictor.__init__ has {n} lines"


def test_metadata_parsing_lives_in_the_data_layer() -> None:
    from core import evaluate, metadata

    assert metadata.source_report.__module__ == "core.metadata"
    assert "source_report" not in vars(evaluate) or evaluate.source_report is metadata.source_report
    assert not {"torch", "scoring", "evaluate", "report"} & core_imports(CORE / "metadata.py")
    src = (CORE / "metadata.py").read_text()
    assert "import torch" not in src


def test_python_m_core_evaluate_still_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "core.evaluate", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--allow-manifest-change" in out.stdout
