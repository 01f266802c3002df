"""What the benchmark scripts share: running `lightning fit` in a scratch folder and reading its val curve."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str | Path, args: list[str], workdir: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `python -m lit_gpt_char fit --config CONFIG ARGS` in ``workdir`` (the packaged Tiny Shakespeare,
    the repo on PYTHONPATH, no progress bar): (result, start and end time.time())."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "lit_gpt_char", "fit", "--config", str(ROOT / config), *args,
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    end = time.time()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr.decode()[-3000:]}")
    return result, start, end


def val_curve(workdir: Path, start: float = 0.0) -> list[tuple[int, float, float]]:
    """(step, val loss, seconds since ``start``) of every evaluation of the run in ``workdir``."""
    acc = EventAccumulator(str(next((workdir / "lightning_logs").glob("version_*"))))
    acc.Reload()
    return [(e.step, e.value, e.wall_time - start) for e in acc.Scalars("val/loss")]
