"""Every use of Lightning's and jsonargparse's private API, in one place.

Each function says what it needs and why no public API does it. ``lightning`` and ``jsonargparse`` are pinned to
the minor releases the suite runs (pyproject.toml); tests/test_internals.py fails, naming the attribute, if a new
release moves one of these. Beyond these calls, subclasses use their base class's private members where they are:
LitGPTCLI (cli.py) overrides LightningCLI's ``_add_subcommands`` and ``_parse_ckpt_path``; ElasticDDPStrategy
(distributed.py) calls DDPStrategy's ``_get_process_group_backend`` and reads its ``_timeout``; the same test names
them.
"""

from argparse import Action, ArgumentParser
from typing import Any, Optional, Union

from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

# torch.distributed's teardown as Lightning registers it for the process groups it creates
destroy_dist_connection = _destroy_dist_connection


# ---- the fit loop ----


def evaluation_follows(trainer: Trainer) -> bool:
    """Whether Lightning evaluates at the end of the batch under way (asked in on_train_batch_end): a save or a stop
    due at this step must wait for that evaluation."""
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


def accumulating(trainer: Trainer) -> bool:
    """Whether the batch under way is not the last of its gradient-accumulation window (the optimizer steps after
    a later one)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def set_logging_step(trainer: Trainer, step: int) -> None:
    """Lightning writes what was logged when its count of "batches that stepped" says so; that count is one ahead
    after resuming from a checkpoint written at an evaluation. Set it to the optimizer step."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def set_sigterm(trainer: Trainer, received: bool) -> None:
    """Lightning's SIGTERM flag: set, the fit loop stops after the batch under way (and its evaluation is cut short
    if one is running), raising SIGTERMException; there is no public way to ask for that stop without an evaluation
    (``trainer.should_stop`` evaluates first)."""
    trainer._signal_connector.received_sigterm = received


# ---- ModelCheckpoint ----


def saved_step(checkpoint: ModelCheckpoint) -> int:
    """The optimizer step ModelCheckpoint last saved at."""
    return checkpoint._last_global_step_saved


def mark_saved(checkpoint: ModelCheckpoint, step: int) -> None:
    """Tell ModelCheckpoint that ``step`` is on disk already (the step a run resumes from)."""
    checkpoint._last_global_step_saved = step


def every_n_train_steps(checkpoint: ModelCheckpoint) -> int:
    """ModelCheckpoint's interval in optimizer steps (0: none), as it resolved its arguments."""
    return checkpoint._every_n_train_steps


def save_last(checkpoint: ModelCheckpoint, trainer: Trainer) -> None:
    """Write last.ckpt now: ModelCheckpoint writes it only beside one of its own saves."""
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


# ---- jsonargparse ----


def parser_options(parser: ArgumentParser) -> dict[str, Action]:
    """Every option of ``parser``, by its key (argparse keeps their list private)."""
    return {action.dest: action for action in parser._actions}


def subcommand_choices(parser: ArgumentParser) -> list[Action]:
    """The help entries of the subcommands (fit, validate, test), to replace Lightning's text."""
    return parser._subcommands_action._choices_actions


def also_accept(action: Action, typehint: Any) -> None:
    """Let an option of jsonargparse's also take ``typehint`` (and null): its ActionTypeHint has no public setter."""
    action._typehint = Optional[Union[typehint, action._typehint]]


def keep_help_as_written(action: Action) -> None:
    """Print ``action.help`` as given: jsonargparse otherwise appends a default it cannot show (a newline)."""
    action._jsonargparse_preexpanded_help = True
