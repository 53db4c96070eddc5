"""The library stays pure: `cdsl/` decodes and scores; Ray, DeepSpeed, plots and the datasets
beside a checkout belong to `actors/` and `jobs/`."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

CDSL = Path(__file__).resolve().parent.parent / "cdsl"

IMPORT_ALL = """
import importlib, pkgutil, sys
import cdsl
for info in pkgutil.walk_packages(cdsl.__path__, "cdsl."):
    importlib.import_module(info.name)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules} & {"ray", "deepspeed", "matplotlib", "actors", "jobs"})))
"""


def test_importing_every_cdsl_module_loads_no_ray_deepspeed_or_matplotlib():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"cdsl/ pulled in: {out.stdout.strip()}"


def test_cdsl_reads_no_path_outside_its_package():
    for path in CDSL.rglob("*.py"):
        text = path.read_text()
        assert "parents[" not in text and '"shared"' not in text, f"{path} reaches outside the package"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: run `make gpu-check` itself")
def test_gpu_check_fails_loudly_without_a_gpu():
    """`make gpu-check` on a machine without a GPU must fail, not skip or fall back to CPU."""
    out = subprocess.run([sys.executable, "-m", "jobs.gpu_check", "--sets", "2"], capture_output=True, text=True,
                         timeout=300, cwd=CDSL.parent)
    assert out.returncode == 1 and "gpu-check: FAILED" in out.stderr and "CUDA" in out.stderr, out.stderr


def cdsl_imports() -> dict[str, set[str]]:
    """Module -> the cdsl modules it imports, at the top or inside a function alike."""
    graph: dict[str, set[str]] = {}
    for path in CDSL.rglob("*.py"):
        parts = path.relative_to(CDSL.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdsl"):
                # `from cdsl import pretrained` names a module; `from cdsl.x import y` names x
                deps.update(f"{node.module}.{a.name}" if node.module == "cdsl" else node.module for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("cdsl."))
        deps.discard(name)
    return graph


def test_cdsl_imports_read_one_way():
    """No loop among cdsl's modules, not even one broken by an import inside a function: each
    module can be read (and imported) knowing only the ones below it."""
    graph = cdsl_imports()
    assert {"cdsl.config", "cdsl.models", "cdsl.store", "cdsl.reward_model"} <= set(graph)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import loop in cdsl/: {' -> '.join(err.args[1])}")
    assert order.index("cdsl.config") < order.index("cdsl.methods")


def test_the_method_names_are_the_registry():
    from cdsl.config import MethodName
    from cdsl.methods import METHODS

    assert list(get_args(MethodName)) == list(METHODS)


def test_benchmark_and_fault_hooks_live_outside_the_methods_and_the_replica():
    """The oracle bench and the crash test reach in from their own modules; the algorithm and
    the job carry no parameter or environment switch for them."""
    import inspect

    from cdsl.methods.cdsl import speculate
    from cdsl.methods.speculative import draft, draft_and_verify

    assert "most" not in inspect.signature(speculate).parameters
    assert "stop" not in inspect.signature(draft).parameters
    assert "stop" not in inspect.signature(draft_and_verify).parameters
    replica = (CDSL.parent / "jobs" / "replica.py").read_text()
    assert "environ" not in replica and "_exit" not in replica
