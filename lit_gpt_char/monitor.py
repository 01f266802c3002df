"""What a person watching a run looks at: throughput (tokens/s, MFU), train vs val loss in one chart, and a progress
bar that reads right after a resume."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from lit_gpt_char.internals import convert_inf


class Throughput(Callback):
    """Logs ``train/tokens_per_sec`` (all ranks together) and, where the device's peak is known (GPUs),
    ``train/mfu``: model FLOPs per second over the device's bf16 peak, per device. Both are shown in the
    progress bar and written to TensorBoard at each ``log_every_n_steps``, over the optimizer steps since
    the previous log point, not counting time spent in validation.

    Lightning's own ThroughputMonitor synchronises CUDA after every batch, which stalls the host each step
    and costs a small model several percent; here the clock is read, and the device synchronised, only at
    the log points. The FLOPs come from the model's formula (``GPT.flops_per_token``), not from a FLOP
    counter run at start-up.
    """

    def __init__(self) -> None:
        self._flops_per_token = 0
        self._peak: Optional[float] = None
        self._start = 0.0
        self._start_step = 0
        self._paused = 0.0
        self._pause_start: Optional[float] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._flops_per_token = pl_module.model.flops_per_token()
        self._peak = get_available_flops(trainer.strategy.root_device, torch.bfloat16)  # None on a CPU

    def _now(self, trainer: Trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":  # the queued steps must finish to be counted
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()

    def _restart(self, trainer: Trainer) -> None:
        self._start = self._now(trainer)
        self._start_step = trainer.global_step
        self._paused = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restart(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._pause_start = self._now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        # once per optimizer step (micro-batches of gradient accumulation share one global_step)
        if not every or step % every or step == self._start_step:
            return
        seconds = self._now(trainer) - self._start - self._paused
        tokens = (step - self._start_step) * batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size
        tokens_per_sec = tokens / max(seconds, 1e-9)
        pl_module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True, rank_zero_only=True)
        if self._peak:
            mfu = tokens_per_sec * self._flops_per_token / (self._peak * trainer.world_size)
            pl_module.log("train/mfu", mfu, prog_bar=True, rank_zero_only=True)
        self._restart(trainer)


class LossChart(Callback):
    """One TensorBoard chart with train/loss and val/loss together (TensorBoard's custom-scalars layout,
    written when training starts), the picture that shows over- or under-fitting at a glance. The separate
    series stay where they were."""

    LAYOUT = {"loss": {"train/loss and val/loss": ["Multiline", ["train/loss", "val/loss"]]}}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self.LAYOUT)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, also right after a resume. Lightning 2.6 counts it from the batch the run resumed at in its
    nominal epoch, but sizes it to the steps left, and resuming mid-epoch skips the hook that sizes it (Lightning
    #20603): it read ``310/?`` at a rate that counted the batches before the resume as done at once."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if batch_idx and bar is not None and not bar.disable and bar.n == 0:  # the first batch after a resume
            left = self.total_train_batches  # min(epoch length, steps left), as if the epoch started here
            bar.reset(total=convert_inf(min(trainer.num_training_batches, batch_idx + left)))
            bar.n = bar.initial = bar.last_print_n = batch_idx
            bar.set_description(f"Epoch {trainer.current_epoch}")
