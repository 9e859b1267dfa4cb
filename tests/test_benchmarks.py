"""Every benchmark's smoke run (`python benchmarks/NAME.py --smoke`): it exits 0, prints its table and its JSON line.

The smoke runs go through the same code as the real benchmarks (checks included) at tiny sizes, so a benchmark
that no longer runs against the current library fails here rather than when someone next measures with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "bench_utils")
RESULTS = ROOT / "benchmarks" / "results"  # the recorded figures: smoke runs must leave them alone


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def smoke_run(name: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **SUBPROCESS_ENV, "ADAMBA_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, f"benchmarks/{name}.py", "--smoke", "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """The selected benchmarks' smoke runs, started together, one per core: each is a fresh process whose imports
    (torch, adamba) and tokenizer training take most of its few seconds, so one after another they would take
    over a minute. Each gets its own temporary $ADAMBA_HOME (checkpoints, reports and plots go there)."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.getparent(pytest.Module) is request.node]
    before = snapshot(RESULTS)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {name: pool.submit(smoke_run, name, tmp_path_factory.mktemp(f"home_{name}")) for name in names}
        yield futures
        assert snapshot(RESULTS) == before, "a smoke run wrote into benchmarks/results"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke_run_prints_a_table_and_a_json_line(name, smoke_runs):
    proc = smoke_runs[name].result()
    assert proc.returncode == 0, f"{name} --smoke exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("|---") for line in lines), f"{name} printed no Markdown table:\n{proc.stdout[-2000:]}"
    result = json.loads(lines[-1])  # the last line printed is one JSON object
    assert result["benchmark"] == name
