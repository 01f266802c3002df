"""Real 2-process DDP on CPU (gloo), through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lit_gpt_char.data import RandomWindows, ShakespeareDataModule

from .conftest import TINY, files_under, run_main, run_subprocess

pytestmark = pytest.mark.slow

DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def test_two_process_ddp(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    probe = ["--trainer.callbacks+=tests.probes.Probe", "--trainer.callbacks.out_dir", str(tmp_path / "probe")]
    result = run_subprocess(["fit", *TINY, *DDP, "--data.path", str(corpus), *probe], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [20, 20]

    # each rank draws its own windows: no batch is the same on both ranks
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 20
    assert not any(a == b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))

    # the val loss is synced: both ranks log the same mean over all windows (each evaluated half)
    assert ranks[0]["val_losses"] == pytest.approx(ranks[1]["val_losses"], abs=1e-6)
    assert len(ranks[0]["val_losses"]) == 2

    # only rank 0 writes checkpoints, logs and samples
    assert os.listdir(work / "checkpoints") == ["version_0"]  # rank 1 wrote into the run rank 0 named
    assert sorted(p.name for p in (work / "checkpoints" / "version_0").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len([p for p in files_under(work / "lightning_logs") if "events" in p]) == 1
    assert result.stdout.count("----- samples at step 10 -----") == 1
    assert result.stdout.count("----- samples/final at step 20 -----") == 1

    # the synced val loss equals a single-process evaluation of every window with the final weights
    monkeypatch.chdir(work)
    assert torch.load(work / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == 20
    capsys.readouterr()
    assert (
        run_main(["validate", *TINY, "--data.path", str(corpus), "--ckpt_path", "checkpoints/version_0/last.ckpt"]) == 0
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if "val/loss" in line)
    assert float(line.split()[-1].strip("│")) == pytest.approx(ranks[0]["val_losses"][-1], abs=1e-5)


def test_ddp_resume_continues_each_ranks_stream(corpus: Path, tmp_path: Path) -> None:
    """A 2-process run resumed by a 2-process run draws, on each rank, the batches an unbroken run would."""
    work = tmp_path / "work"
    work.mkdir()

    def fit(steps: int, probe_dir: str, *extra: str) -> list[dict]:
        probe = ["--trainer.callbacks+=tests.probes.Probe", "--trainer.callbacks.out_dir", str(tmp_path / probe_dir)]
        args = ["fit", *TINY, *DDP, "--data.path", str(corpus), "--trainer.max_steps", str(steps), *probe, *extra]
        result = run_subprocess(args, cwd=work)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((tmp_path / probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]

    first = fit(20, "first")
    resumed = fit(30, "resumed", "--ckpt_path", "last")
    dm = ShakespeareDataModule(path=str(corpus), block_size=16, batch_size=8)
    dm.prepare_data()
    train, _ = dm._split_ids()
    for rank in (0, 1):
        stream = RandomWindows(train, 8, 16, seed=1337, rank=rank)  # what an unbroken run draws on this rank
        assert first[rank]["batches"] == [stream.batch(n)[0].tolist() for n in range(20)]
        assert resumed[rank]["batches"] == [stream.batch(n)[0].tolist() for n in range(20, 30)]
        assert resumed[rank]["global_step"] == 30


@pytest.mark.parametrize(("at_step", "last_step"), [(15, 19), (9, 9)])
def test_ddp_divergence_on_one_rank_stops_every_rank(
    corpus: Path, tmp_path: Path, at_step: int, last_step: int
) -> None:
    """A NaN on rank 1 alone: both ranks stop with the error naming its step, nobody hangs in a collective, nothing is
    written after it. No all-reduce every step under DDP: the ranks agree at the next log step (every 5 in TINY), so
    the cost of the delay is the steps until it (a NaN at 15: 16 to 19 ran, the check after step 20's batch stopped
    both ranks), and before a sample (at 10: the NaN at 9, averaged into rank 0's weights too, is never sampled)."""
    work = tmp_path / "work"
    work.mkdir()
    nan = ["--trainer.callbacks+=tests.probes.InjectNaN", "--trainer.callbacks.at_step", str(at_step)]
    nan += ["--trainer.callbacks.rank", "1", "--trainer.callbacks.out_dir", str(tmp_path / "probe")]
    args = ["fit", *TINY, *DDP, "--data.path", str(corpus), *nan]
    result = run_subprocess(args, cwd=work, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(f"error: training diverged: the loss is not finite at step {at_step}") == 2
    last_steps = [json.loads((tmp_path / "probe" / f"last_step{rank}.json").read_text()) for rank in (0, 1)]
    assert last_steps == [last_step, last_step]
    last = work / "checkpoints" / "version_0" / "last.ckpt"
    if at_step > 10:
        assert torch.load(last, weights_only=True)["global_step"] == 10
    else:
        assert not last.exists()


@pytest.mark.parametrize(("at_step", "max_steps", "stopped_at"), [(11, 20, 15), (16, 18, 18)])
def test_ddp_a_signal_to_one_rank_stops_every_rank_at_the_next_log_step(
    corpus: Path, tmp_path: Path, at_step: int, max_steps: int, stopped_at: int
) -> None:
    """SIGTERM to rank 1 alone: the ranks agree on stopping at log steps (every 5 in TINY) and at the last step, not
    with an all-reduce every step, so the cost of the delay is the steps until the next one (a signal during step 12:
    both ranks finish step 15); a signal after the last log step still stops the job, at its last step (before the
    final sample), and the run saves it and says how to resume."""
    work = tmp_path / "work"
    work.mkdir()
    stop = ["--trainer.callbacks+=tests.probes.SendSignal", "--trainer.callbacks.at_step", str(at_step)]
    args = ["fit", *TINY, *DDP, "--data.path", str(corpus), *stop, "--trainer.callbacks.rank", "1"]
    result = run_subprocess([*args, "--trainer.max_steps", str(max_steps)], cwd=work, timeout=120)
    assert result.returncode == 143, result.stderr[-3000:]
    assert f"interrupted by SIGTERM after step {stopped_at}: saved checkpoints/version_0/last.ckpt" in result.stderr
    assert torch.load(work / "checkpoints" / "version_0" / "last.ckpt", weights_only=True)["global_step"] == stopped_at
