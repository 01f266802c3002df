"""Exact means exact: whole-split validation, checkpoint contents, gradient accumulation, interrupts and resume
under every setting a user can turn on (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lit_gpt_char.checkpoint import load_checkpoint
from lit_gpt_char.data import CharTokenizer, FixedWindows
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPTConfig
from lit_gpt_char.module import LitGPT

from .conftest import TINY, run_main, run_subprocess

DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def _table_value(out: str, key: str) -> float:
    """A metric from the table `validate` prints."""
    line = next(line for line in out.splitlines() if f" {key} " in line)
    return float(line.split()[-1].strip("│"))


def _whole_split_loss(checkpoint: Path, corpus: Path, block_size: int) -> tuple[float, int]:
    """Mean cross-entropy over every target of the validation split, one tile at a time; (loss, targets)."""
    model, _ = load_checkpoint(checkpoint)
    _, ids = CharTokenizer.from_text(corpus.read_text())
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
    ids = CharTokenizer.from_text(corpus.read_text())[1][:1000]
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
    # the tiny checkpoint was trained on make_text(30_000), as `corpus` is: 3,001 characters, 3,000 validation targets, tiles of 16,
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
    ids = CharTokenizer.from_text(corpus.read_text())[1]
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
