"""The library stays pure: `cdsl/` decodes and scores; Ray, DeepSpeed, plots and the datasets
beside a checkout belong to `actors/` and `jobs/`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
