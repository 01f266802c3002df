"""Exact means exact: whole-split validation, checkpoint contents, gradient accumulation, interrupts and resume
under every setting a user can turn on (issue 15)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn import functional as F

from lit_gpt_char.checkpoints import load_checkpoint
from lit_gpt_char.data import FixedWindows
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPTConfig
from lit_gpt_char.module import LitGPT
from lit_gpt_char.policy import RunPolicy

from .conftest import TINY, make_text, run_main, run_subprocess, tokenize
from .test_cli import read_events

DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def _table_value(out: str, key: str) -> float:
    """A metric from the table `validate` prints."""
    line = next(line for line in out.splitlines() if f" {key} " in line)
    return float(line.split()[-1].strip("│"))


def _whole_split_loss(checkpoint: Path, corpus: Path, block_size: int) -> tuple[float, int]:
    """Mean cross-entropy over every target of the validation split, one tile at a time; (loss, targets)."""
    model, _ = load_checkpoint(checkpoint)
    _, ids = tokenize(corpus.read_text())
    val = ids[int(0.9 * len(ids)) :].long()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val) - 1, block_size):
            y = val[start + 1 : start + 1 + block_size]
            x = val[start : start + len(y)]
            logits, _ = model(x[None])
            total += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            count += len(y)
    return total / count, count


# ---- whole-split validation scores every target once (item 7) ----


def test_fixed_windows_len_counts_the_short_last_batch(corpus: Path) -> None:
    ids = tokenize(corpus.read_text())[1][:1000]
    for world_size in (1, 2):
        for rank in range(world_size):
            windows = FixedWindows(ids, 16, None, 7, rank, world_size)
            batches = list(windows)
            assert len(windows) == len(batches)
    # 999 targets in tiles of 16: 62 full tiles and one of 7, in batches of 7 windows: 9 full batches, then the tail
    batches = list(FixedWindows(ids, 16, None, 7, 0, 1))
    assert len(batches) == 10 and batches[-1][1].shape == (1, 7)


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_whole_split_validation_under_the_trainer_scores_every_target(
    devices: int, tiny_checkpoint: Path, corpus: Path, workdir: Path
) -> None:
    # the tiny checkpoint was trained on make_text(30_000), as `corpus` is: 3,000 validation targets, tiles of 16,
    # batches of 32 windows: a short last tile in a batch of its own (on one of the ranks under DDP)
    expected, count = _whole_split_loss(tiny_checkpoint, corpus, 16)
    assert count == 3000
    devices_args = DDP if devices == 2 else []
    args = ["validate", *TINY, *devices_args, "--data.path", str(corpus), "--data.val_windows", "null"]
    result = run_subprocess([*args, "--ckpt_path", str(tiny_checkpoint)], cwd=workdir, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _table_value(result.stdout, "val/loss") == pytest.approx(expected, rel=1e-5)


# ---- too few validation windows for the world size (item 8) ----


def test_too_few_validation_windows_for_the_ranks_is_one_error(corpus: Path) -> None:
    ids = tokenize(corpus.read_text())[1]
    with pytest.raises(LitGPTCharError, match="validation has 1 window\\(s\\) for 2 processes"):
        FixedWindows(ids, 16, 1, 32, 0, 2)
    assert len(FixedWindows(ids, 16, 2, 32, 1, 2)) == 1  # one each is enough


@pytest.mark.slow
def test_too_few_validation_windows_under_ddp_stops_every_rank_cleanly(corpus: Path, workdir: Path) -> None:
    args = ["fit", *TINY, *DDP, "--data.path", str(corpus), "--data.val_windows", "1"]
    result = run_subprocess(args, cwd=workdir, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("validation has 1 window(s) for 2 processes" in line for line in errors), result.stderr
    assert not list(workdir.glob("checkpoints/**/*.ckpt"))


# ---- checkpoints hold each tensor once, under names that do not depend on compile (item 2) ----


def test_checkpoint_holds_each_weight_once_under_model_names(tiny_checkpoint: Path) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in state), sorted(state)
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)  # no tensor stored twice
    hparams = torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]
    compiled = LitGPT(hparams["vocab"], GPTConfig(**hparams["config"]), compile=True)
    assert sorted(compiled.state_dict()) == sorted(state)
    compiled.load_state_dict(state)  # strict: a run started without compile resumes with it, and the reverse


def test_a_checkpoint_with_the_old_duplicate_keys_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["state_dict"].update({"_forward." + k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    module = LitGPT.load_from_checkpoint(old)
    assert torch.equal(module.model.wte.weight, ckpt["state_dict"]["model.wte.weight"])


# ---- the exactness matrix: stopped and resumed equals unbroken (items 3, 4, 5, 6, 9) ----

# dropout and a warmup + cosine schedule make the global RNG and the scheduler matter; log every 5, evaluate every 10
EXACT = [
    *TINY, "--model.config.dropout", "0.1", "--model.warmup_steps", "5", "--model.lr_schedule", "cosine",
    "--model.decay_steps", "30", "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "5",
    "--trainer.val_check_interval", "10", "--data.val_windows", "96", "--sampling.every_n_steps", "0",
    "--sampling.final_max_new_tokens", "0",
]  # fmt: skip
SERIES = ("train/loss", "val/loss", "lr")


def _fit(work: Path, args: list[str], devices: int) -> tuple[int, str]:
    """Run `fit` in ``work``: in this process for 1 device, as a subprocess for 2; (exit status, stderr)."""
    work.mkdir(parents=True, exist_ok=True)
    if devices == 1:
        previous = os.getcwd()
        os.chdir(work)
        try:
            return run_main(["fit", *args]), ""
        finally:
            os.chdir(previous)
    result = run_subprocess(["fit", *args, *DDP], cwd=work, timeout=240)
    return result.returncode, result.stderr


def _last(work: Path) -> Path:
    (path,) = work.glob("checkpoints/**/last.ckpt")
    return path


def _series(work: Path) -> tuple[dict[str, dict[int, float]], list[dict[str, list[int]]]]:
    """Per tag, step → the last value written, over every event file of the run in the order written; and, per
    event file, the steps it holds for each tag."""
    files = sorted(work.glob("lightning_logs/**/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    merged: dict[str, dict[int, float]] = {tag: {} for tag in SERIES}
    per_file = []
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        steps = {}
        for tag in SERIES:
            events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
            steps[tag] = [e.step for e in events]
            merged[tag].update((e.step, e.value) for e in events)
        per_file.append(steps)
    return merged, per_file


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory, corpus_module: Path) -> Callable[[int, int], Path]:
    """The folder of an unbroken 30-step run for (accumulate_grad_batches, devices), run once per module."""
    runs: dict[tuple[int, int], Path] = {}

    def get(accumulate: int, devices: int) -> Path:
        if (accumulate, devices) not in runs:
            work = tmp_path_factory.mktemp(f"unbroken_k{accumulate}_d{devices}")
            probes = ["--trainer.callbacks+=tests.probes.RngDigest", "--trainer.callbacks.out_dir", str(work / "probe")]
            probes += ["--trainer.callbacks+=tests.probes.Losses", "--trainer.callbacks.out_dir", str(work / "probe")]
            args = [*EXACT, "--data.path", str(corpus_module), "--trainer.accumulate_grad_batches", str(accumulate)]
            # samples every 10 steps: their TensorBoard steps show when they were taken
            args += ["--sampling.every_n_steps", "10", "--sampling.max_new_tokens", "8"]
            code, err = _fit(work, [*args, *probes], devices)
            assert code == 0, err[-3000:]
            runs[accumulate, devices] = work
        return runs[accumulate, devices]

    return get


@pytest.fixture(scope="module")
def corpus_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(30_000), encoding="utf-8")
    return path


# (accumulate_grad_batches, devices, how it stops, at step, micro-batch or validation batch, rank that gets the signal)
CASES = {
    "k1-max_steps-13": (1, 1, "max_steps", 13, None, 0),
    "k1-SIGTERM-step-7": (1, 1, "SIGTERM", 7, 0, 0),
    "k1-SIGINT-in-validation": (1, 1, "SIGINT", 20, "val1", 0),
    "k3-max_steps-10": (3, 1, "max_steps", 10, None, 0),
    "k3-SIGTERM-mid-window": (3, 1, "SIGTERM", 12, 1, 0),
    "k3-SIGINT-in-validation": (3, 1, "SIGINT", 10, "val2", 0),
    "k3-SIGINT-last-micro-batch": (3, 1, "SIGINT", 17, 2, 0),
    "ddp-k1-SIGTERM-to-rank1-in-validation": pytest.param((1, 2, "SIGTERM", 20, "val0", 1), marks=pytest.mark.slow),
    "ddp-k3-SIGINT-mid-window": pytest.param((3, 2, "SIGINT", 12, 1, 0), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_stopped_and_resumed_equals_unbroken(case: tuple, unbroken, corpus_module: Path, tmp_path: Path) -> None:
    accumulate, devices, how, step, where, rank = case
    reference = unbroken(accumulate, devices)
    work = tmp_path / "broken"
    args = [*EXACT, "--data.path", str(corpus_module), "--trainer.accumulate_grad_batches", str(accumulate)]
    args += ["--sampling.every_n_steps", "10", "--sampling.max_new_tokens", "8"]
    if how == "max_steps":
        code, err = _fit(work, [*args, "--trainer.max_steps", str(step)], devices)
        assert code == 0, err[-3000:]
        stopped_at = step
    else:
        probe = ["--trainer.callbacks+=tests.probes.SendSignal", "--trainer.callbacks.at_step", str(step)]
        probe += ["--trainer.callbacks.signal", how, "--trainer.callbacks.rank", str(rank)]
        if isinstance(where, str):
            probe += ["--trainer.callbacks.val_batch", where.removeprefix("val")]
        else:
            probe += ["--trainer.callbacks.micro", str(where)]
        code, err = _fit(work, [*args, *probe], devices)
        assert code == 128 + getattr(signal, how), err[-3000:]
        # a whole optimizer step: the one under way when the signal came (a signal inside the evaluation at a step
        # comes after that step); under DDP the ranks agree on stopping at log steps (every 5 steps here)
        if isinstance(where, str):
            stopped_at = step
        elif devices == 1:
            stopped_at = step + 1
        else:
            stopped_at = -(-(step + 1) // 5) * 5  # the next multiple of 5
    saved = torch.load(_last(work), weights_only=True)
    assert saved["global_step"] == stopped_at
    code, err = _fit(work, [*args, "--ckpt_path", str(_last(work))], devices)
    assert code == 0, err[-3000:]

    _assert_same_run(reference, work, stopped_at)


def _assert_same_run(reference: Path, work: Path, resumed_at: int) -> None:
    """The run in ``work``, resumed from step ``resumed_at``, ends as the unbroken one in ``reference``: the same
    final weights, bit for bit, and the same TensorBoard series, step for step and value for value (per step the
    last value written, over every event file of the run in the order written)."""
    expected, got = torch.load(_last(reference), weights_only=True), torch.load(_last(work), weights_only=True)
    assert got["global_step"] == expected["global_step"] == 30
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, got["state_dict"][name]), name
    want, _ = _series(reference)
    have, files = _series(work)
    for tag in SERIES:
        assert have[tag] == want[tag], tag  # same steps, same values
    assert sorted(want["val/loss"]) == [10, 20, 30] and sorted(want["train/loss"]) == [5, 10, 15, 20, 25, 30]
    # the resumed run rewrote no point of the stopped run's history
    assert all(s >= resumed_at for tag in SERIES for s in files[-1][tag])


@pytest.mark.slow
def test_killed_inside_an_evaluation_resumes_with_that_evaluation(
    unbroken, corpus_module: Path, tmp_path: Path
) -> None:
    # periodic checkpoints every 5 steps: the one of step 20 (an evaluation step) is written after that evaluation,
    # so a run killed during it resumes from step 15 and evaluates step 20 again (Lightning skips the evaluation of
    # a step whose checkpoint was written before it)
    reference = unbroken(1, 1)
    work = tmp_path / "killed"
    work.mkdir()
    args = [
        *EXACT,
        "--data.path",
        str(corpus_module),
        "--sampling.every_n_steps",
        "10",
        "--sampling.max_new_tokens",
        "8",
    ]
    args += ["--periodic_checkpoint.every_n_train_steps", "5"]
    kill = ["--trainer.callbacks+=tests.probes.SendSignal", "--trainer.callbacks.at_step", "20"]
    kill += ["--trainer.callbacks.signal", "SIGKILL", "--trainer.callbacks.val_batch", "1"]
    result = run_subprocess(["fit", *args, *kill], cwd=work, timeout=240)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert torch.load(_last(work), weights_only=True)["global_step"] == 15
    code, err = _fit(work, [*args, "--ckpt_path", str(_last(work))], 1)
    assert code == 0, err
    _assert_same_run(reference, work, 15)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_train_loss_is_the_mean_over_every_micro_batch_of_its_steps(accumulate: int, unbroken) -> None:
    work = unbroken(accumulate, 1)
    losses = json.loads((work / "probe" / "losses0.json").read_text())
    assert len(losses) == 30 * accumulate
    logged, _ = _series(work)
    for step in (5, 10, 15, 20, 25, 30):
        window = [loss for s, loss in losses if step - 5 <= s < step]
        assert len(window) == 5 * accumulate
        assert logged["train/loss"][step] == pytest.approx(sum(window) / len(window), rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_samples_at_optimizer_steps_only(accumulate: int, unbroken) -> None:
    _, texts = read_events(unbroken(accumulate, 1) / "lightning_logs")
    assert [step for step, _ in texts["samples/text_summary"]] == [10, 20, 30]  # none at step 0, one per step


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_stream(unbroken) -> None:
    work = unbroken(1, 2)
    digests = [(work / "probe" / f"rng{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] != digests[1]  # before: both ranks seeded alike and drew alike, ending in one state


def test_divergence_under_accumulation_names_the_optimizer_step(
    corpus: Path, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan = ["--trainer.callbacks+=tests.probes.InjectNaN", "--trainer.callbacks.at_step", "6"]
    for on_host in (True, False):  # the CPU's immediate check, and the deferred one accelerators use
        monkeypatch.setattr(RunPolicy, "_checks_on_host", staticmethod(lambda trainer, loss, on_host=on_host: on_host))
        args = ["fit", *TINY, "--data.path", str(corpus), "--trainer.accumulate_grad_batches", "3", *nan]
        assert run_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and " at step 6." in err[0], err
