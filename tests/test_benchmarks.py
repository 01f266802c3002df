"""The GPU benchmark scripts run end to end at toy sizes on a CPU, so they are ready when a GPU is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow  # on the packaged Tiny Shakespeare


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_speedrun_script_at_toy_size() -> None:
    out = _run("gpu_speedrun.py", "--tiny", "--skip-run-on", "--skip-compile")
    assert "| speedrun: start → first val < 10.0 |" in out and "(step 20," in out
    assert "| Trainer / plain (best; median of pairs) |" in out


def test_sweep_script_at_toy_size() -> None:
    out = _run("sweep.py", "--tiny", "--only", "baseline")
    row = next(line for line in out.splitlines() if line.startswith("| nanogpt (baseline)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "30" and 0 < float(cells[3]) < 4.5  # steps, best val


def test_laptop_script_at_toy_size() -> None:
    """benchmarks/laptop.py reads each run's val curve and prints its table (a few steps, shapes shrunk)."""
    toy = ["--model.config.n_embd", "32", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"]
    out = _run("laptop.py", "--runs", "2", "--", *toy)
    rows = [line for line in out.splitlines() if line.startswith("| laptop.yaml |")]
    assert len(rows) == 2
    assert all(3.0 < float(row.split("|")[4]) < 4.5 for row in rows)  # final val after 6 steps
    assert "laptop.yaml over 2 runs: whole process median" in out


def test_trainer_overhead_script_at_toy_size() -> None:
    """benchmarks/trainer_overhead.py times the real command, Lightning's bare Trainer and the plain loop, 1 process
    and 2 under DDP."""
    toy = ["--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.config.n_layer", "1"]
    out = _run("trainer_overhead.py", "--steps", "60", "--repeats", "1", "--devices", "1", "2", "--", *toy)
    # ten timed steps are noise (one slow step moves a ratio tenfold): this checks that each path runs at both sizes
    # of job and gets its row
    for name in ("`lit-gpt-char fit` (Lightning Trainer)", "Lightning's bare Trainer"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 2 and all(float(row.split("|")[3]) > 0 for row in rows), out
    assert "| plain PyTorch + DistributedDataParallel (torchrun) |" in out
