"""The private API of Lightning and jsonargparse the project uses (lit_gpt_char/internals.py), checked on real
objects: when a release moves one, the failing test names it. What each one does for the project is tested by the
behaviour that needs it (tests/test_checkpoints.py, test_exact.py, test_cli.py, …)."""

from __future__ import annotations

import inspect
from typing import Optional

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy

from lit_gpt_char import internals


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)


@pytest.mark.parametrize(
    "path",
    [
        "_signal_connector.received_sigterm",
        "fit_loop._data_fetcher",
        "fit_loop.epoch_loop._should_check_val_fx",
        "fit_loop.epoch_loop._should_accumulate",
        "fit_loop.epoch_loop._batches_that_stepped",
    ],
)
def test_trainer_internals(trainer: Trainer, path: str) -> None:
    owner = trainer
    for name in path.split("."):
        assert hasattr(owner, name), f"lightning: Trainer.{path} is gone ({name})"
        owner = getattr(owner, name)


@pytest.mark.parametrize(
    "name", ["_last_global_step_saved", "_every_n_train_steps", "_save_last_checkpoint", "_monitor_candidates"]
)
def test_model_checkpoint_internals(name: str) -> None:
    assert hasattr(ModelCheckpoint(), name), f"lightning: ModelCheckpoint.{name} is gone"


def test_private_members_subclasses_use() -> None:
    assert list(inspect.signature(LightningCLI._add_subcommands).parameters) == ["self", "parser", "kwargs"]
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    ddp = DDPStrategy(parallel_devices=[torch.device("cpu")])
    assert ddp._get_process_group_backend() == "gloo", "lightning: DDPStrategy._get_process_group_backend"
    assert hasattr(ddp, "_timeout"), "lightning: DDPStrategy._timeout is gone"


def test_jsonargparse_internals() -> None:
    parser = ArgumentParser()
    option = parser.add_argument("--x", type=Optional[int], default=None, help="as written")
    assert internals.parser_options(parser)["x"] is option, "argparse: _actions"
    internals.also_accept(option, str)
    assert parser.parse_args(["--x", "text"]).x == "text", "jsonargparse: ActionTypeHint._typehint is not read"
    internals.keep_help_as_written(option)
    assert "default:" not in parser.format_help(), "jsonargparse: _jsonargparse_preexpanded_help is not read"
    subcommands = parser.add_subcommands()
    subcommands.add_subcommand("fit", ArgumentParser(), help="train")
    assert [a.dest for a in internals.subcommand_choices(parser)] == ["fit"], "jsonargparse: _choices_actions"
