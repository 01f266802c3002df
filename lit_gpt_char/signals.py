"""Ctrl-C and SIGTERM during fit: finish the optimizer step under way, save, and say how to resume."""

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char.checkpoints import last_checkpoint
from lit_gpt_char.errors import shown
from lit_gpt_char.internals import accumulating, evaluation_follows, saved_step, set_sigterm
from lit_gpt_char.policy import sync_due

_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class InterruptCheckpoint(Callback):
    """Ctrl-C or SIGTERM during fit: finish the optimizer step under way, and the evaluation and checkpoints due at it,
    then save ``last.ckpt`` and say how to resume.

    While training, both signals only set a flag: Lightning installs no SIGINT handler (Ctrl-C would land anywhere in a
    step, even between the updates of two parameter groups), and it acts on SIGTERM after any batch, inside a gradient
    accumulation window. The flag is read at the end of each batch that stepped the optimizer and at the end of each
    evaluation; then Lightning's own SIGTERM stop ends fit after that batch, once the evaluation and checkpoints due at
    the step are done, and this callback saves. Under DDP the ranks must agree on it (one all-reduce), so every rank
    stops at the same step: they do at each log step (``log_every_n_steps``), at the last step and at the end of
    each evaluation, not every step, so a job stops at most ``log_every_n_steps`` steps after the signal. A second
    Ctrl-C stops at once and saves nothing. Other exceptions save nothing: the state may be the cause (a diverged
    model), and the last checkpoint written by ModelCheckpoint stays.
    """

    _signal: Optional[int] = None  # the first signal received while training
    _stopping = False  # Lightning's stop is asked for
    _previous: dict = {}  # the handlers this callback replaced, put back when training ends

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signal, self._stopping = None, False
        if trainer.received_sigterm:  # Lightning's handler got a SIGTERM in the sanity check: act on it at a step's end
            set_sigterm(trainer, False)
            self._signal = signal.SIGTERM
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self._previous = {signum: signal.signal(signum, self._receive) for signum in _SIGNAL_NAMES}

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()  # the same Ctrl-C as before fit, also during the final sample and save

    def _receive(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
        self._signal = self._signal or signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.world_size == 1:
            if self._signal is None:  # one process decides alone: nothing to agree on, so nothing to do
                return
        elif not sync_due(trainer):
            return  # the ranks agree at log steps, and at the last step (before the final sample and save)
        # only once a whole optimizer step is done, and after the evaluation due at it (Lightning's stop would cut
        # that evaluation short): then on_validation_end decides
        if not accumulating(trainer) and not evaluation_follows(trainer):
            self._decide(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._decide(trainer)

    def _decide(self, trainer: Trainer) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)  # any rank: all stop
        if stop and not self._stopping:
            self._stopping = True
            set_sigterm(trainer, True)  # Lightning raises SIGTERMException at the end of this batch

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, KeyboardInterrupt) and fitting and trainer.is_global_zero:
            # the second Ctrl-C: Lightning's own exit says nothing
            last = shown(last_checkpoint(trainer)) or "none"
            _say(
                f"interrupted by Ctrl-C during step {trainer.global_step + 1}: nothing saved (last checkpoint: {last})"
            )
        if not (self._stopping and isinstance(exception, SIGTERMException)):  # only our stop saves (set in fit)
            return
        path = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or "checkpoints") / "last.ckpt"
        # at an evaluation step the checkpoint callbacks have just written it (the grace time of a SIGTERM is short)
        if not any(cb.save_last and saved_step(cb) == trainer.global_step for cb in trainer.checkpoint_callbacks):
            trainer.save_checkpoint(path)
        signum = self._signal or signal.SIGTERM  # None: the signal went to another process of this run
        exception.signum = signum  # the exit status, 128 + signum (cli.main)
        if trainer.is_global_zero:
            _say(
                f"interrupted by {_SIGNAL_NAMES[signum]} after step {trainer.global_step}: saved {shown(path)}; "
                f"resume by running the same command with --ckpt_path {shown(path)}"
            )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
