"""The quick start's set-up: torch's CPU wheel index where no NVIDIA driver is, a local wheel first."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands(path: str) -> str:
    env = {**os.environ, "PATH": path}
    return subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout


def test_without_a_gpu_torch_comes_from_the_cpu_index_unless_a_local_wheel_is_there(tmp_path):
    if _has_nvidia():
        pytest.skip("an NVIDIA driver is on PATH")
    plain = setup_commands(os.environ["PATH"])
    torch_line = next(line for line in plain.splitlines() if "torch==" in line and "--dry-run" in line)
    assert "--no-index" in torch_line  # a wheel pip finds locally is used as it is
    assert "--index-url https://download.pytorch.org/whl/cpu" in plain
    assert plain.index("torch==") < plain.index('-e ".[test]"')  # before the project's bare `torch`
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\n")
    (fake / "nvidia-smi").chmod(0o755)
    gpu = setup_commands(f"{fake}:{os.environ['PATH']}")
    assert "download.pytorch.org" not in gpu


def _has_nvidia() -> bool:
    return any((Path(p) / "nvidia-smi").exists() for p in os.environ["PATH"].split(os.pathsep))
