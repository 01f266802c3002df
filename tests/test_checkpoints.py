"""Which state each checkpoint file holds: last.ckpt is always the newest, best.ckpt only ever improves, and an
interrupt never cuts an evaluation short (issue "Every checkpoint the README promises")."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from .conftest import TINY, run_main, run_subprocess
from .test_cli import read_events


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def test_last_is_the_newest_state_whatever_best_does(corpus: Path, workdir: Path) -> None:
    # --checkpoint.mode max keeps the first evaluation as "best" (val/loss falls), so no later evaluation writes best;
    # periodic checkpoints at steps 7, 14 and 21
    args = ["fit", *TINY, "--data.path", str(corpus), "--checkpoint.mode", "max", "--trainer.max_steps", "25"]
    assert run_main([*args, "--periodic_checkpoint.every_n_train_steps", "7"]) == 0
    run = workdir / "checkpoints" / "version_0"
    assert _step(run / "best.ckpt") == 10
    assert _step(run / "last.ckpt") == 25  # a run that ends between checkpoints saves its final state


def test_a_killed_run_keeps_the_state_of_its_newest_evaluation(corpus: Path, workdir: Path) -> None:
    kill = ["--trainer.callbacks+=tests.probes.LoseWorker", "--trainer.callbacks.at_step", "25"]
    kill += ["--trainer.callbacks.rank", "0"]  # SIGKILL at the start of step 26
    args = ["fit", *TINY, "--data.path", str(corpus), "--checkpoint.mode", "max", "--trainer.max_steps", "40"]
    result = run_subprocess([*args, *kill], cwd=workdir, timeout=240)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert _step(workdir / "checkpoints" / "version_0" / "last.ckpt") == 20


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_in_a_step_with_an_evaluation_lets_the_evaluation_finish(
    sig: str, corpus: Path, workdir: Path
) -> None:
    # the signal arrives during the training step 10; step 10 has an evaluation (2 batches) and a periodic checkpoint
    stop = ["--trainer.callbacks+=tests.probes.SendSignal", "--trainer.callbacks.at_step", "9"]
    stop += ["--trainer.callbacks.signal", sig]
    args = ["fit", *TINY, "--data.path", str(corpus), "--periodic_checkpoint.every_n_train_steps", "10", *stop]
    assert run_main(args) == 128 + getattr(signal, sig)
    run = workdir / "checkpoints" / "version_0"
    assert sorted(p.name for p in run.iterdir()) == ["best.ckpt", "last.ckpt", "step-10.ckpt"]
    assert _step(run / "best.ckpt") == _step(run / "last.ckpt") == _step(run / "step-10.ckpt") == 10
    scalars, _ = read_events(workdir / "lightning_logs")
    assert [step for step, _ in scalars["val/loss"]] == [10]


@pytest.mark.parametrize("older", [5, 10])  # step 5: before the run's first evaluation, so it holds no score at all
def test_resuming_an_older_checkpoint_never_replaces_best_with_a_worse_model(
    older: int, corpus: Path, workdir: Path
) -> None:
    common = ["fit", *TINY, "--data.path", str(corpus), "--periodic_checkpoint.every_n_train_steps", "5"]
    assert run_main([*common, "--trainer.max_steps", "30"]) == 0
    run = workdir / "checkpoints" / "version_0"
    val = dict(read_events(workdir / "lightning_logs")[0]["val/loss"])
    assert val[30] < val[20] < val[10] and _step(run / "best.ckpt") == 30
    # back to an older step and on to 20: step 20's model is worse than the best on disk (step 30's)
    assert run_main([*common, "--trainer.max_steps", "20", "--ckpt_path", str(run / f"step-{older}.ckpt")]) == 0
    assert _step(run / "last.ckpt") == 20
    assert _step(run / "best.ckpt") == 30
