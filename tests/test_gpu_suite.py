"""benchmarks/gpu_suite.sh: its --smoke run on the CPU goes through every benchmark of the GPU suite and leaves one
JSON per benchmark, so the script is known to work before a GPU is at hand; without a GPU the full run refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
BENCHMARKS = {"train_throughput_d12": "train_throughput", "train_throughput_d20": "train_throughput",
              "train_throughput_d12_float8": "train_throughput",
              "infer": "infer", "scan_kernels": "scan_kernels", "elastic": "elastic", "speculative": "speculative",
              "serve": "serve"}


def suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_smoke_run_writes_one_json_per_benchmark(tmp_path):
    run = suite("--smoke", "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "all passed" in run.stderr
    for name, benchmark in BENCHMARKS.items():
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["benchmark"] == benchmark, name
        assert any(line.startswith("|---") for line in (tmp_path / "out" / f"{name}.log").read_text().splitlines())
    float8 = json.loads((tmp_path / "out" / "train_throughput_d12_float8.json").read_text())["float8"]
    assert float8 == "tensorwise"  # the arguments after -- reach the smoke run too


def test_the_full_run_needs_a_gpu_and_arguments_are_checked(tmp_path):
    assert suite("--bogus").returncode == 2
    if not torch.cuda.is_available():
        run = suite("--out", str(tmp_path / "gpu"))
        assert run.returncode == 2 and "no CUDA device visible" in run.stderr
