"""What a person watching a run looks at beside the losses: throughput (tokens/s, MFU), train vs val in one chart, and
a progress bar that reads right after a resume."""

import math
import time
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger


class Throughput(Callback):
    """Logs ``train/tokens_per_sec`` (all ranks together) and, where Lightning knows the device's bf16 peak (GPUs),
    ``train/mfu`` = tokens/s × ``GPT.flops_per_token()`` / (peak × devices), to the progress bar and TensorBoard at
    each ``log_every_n_steps``: over the optimizer steps since the previous log point or evaluation, without
    validation time.

    Not Lightning's ThroughputMonitor: it synchronises CUDA after every batch, stalling the host each step; here the
    device is synchronised at log points only, and the metrics keep the names above.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._flops_per_token = pl_module.model.flops_per_token()
        self._peak = get_available_flops(trainer.strategy.root_device, torch.bfloat16)  # None on a CPU

    def _now(self, trainer: Trainer) -> float:
        if trainer.strategy.root_device.type in ("cuda", "mps"):  # the queued steps must finish to be counted
            getattr(torch, trainer.strategy.root_device.type).synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._start_step = self._now(trainer), trainer.global_step

    on_validation_end = on_train_start  # an interval starts again after each evaluation: no validation time in it

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if not every or step % every or step == self._start_step:  # once per optimizer step, at log points
            return
        seconds = self._now(trainer) - self._start
        tokens = (step - self._start_step) * batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size
        tokens_per_sec = tokens / max(seconds, 1e-9)
        pl_module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True, rank_zero_only=True)
        if self._peak:
            mfu = tokens_per_sec * self._flops_per_token / (self._peak * trainer.world_size)
            pl_module.log("train/mfu", mfu, prog_bar=True, rank_zero_only=True)
        self.on_train_start(trainer, pl_module)  # the next interval starts here


class LossChart(Callback):
    """One TensorBoard chart with train/loss and val/loss together (a custom-scalars layout, written when training
    starts): over- or under-fitting at a glance. The separate series stay where they were."""

    LAYOUT = {"loss": {"train/loss and val/loss": ["Multiline", ["train/loss", "val/loss"]]}}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers if trainer.is_global_zero else []:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self.LAYOUT)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, drawn once per update, also right after a resume.

    Lightning 2.6 draws the bar twice per update (the count, then the metrics beside it): the same line once costs
    half. It counts the bar from the batch the run resumed at in its nominal epoch, but sizes it to the steps left,
    and resuming mid-epoch skips the hook that sizes it and names the epoch (Lightning #20603): it read ``310/?`` at a
    rate that counted the batches before the resume as done at once."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if self.is_enabled and bar is not None and (n % self.refresh_rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # draws the line

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if batch_idx and bar is not None and not bar.disable and bar.n == 0:  # the first batch after a resume
            total = min(trainer.num_training_batches, batch_idx + self.total_train_batches)  # as if it started here
            bar.reset(total=None if math.isinf(total) else total)  # tqdm's "unknown"
            bar.n = bar.initial = bar.last_print_n = batch_idx
            bar.set_description(f"Epoch {trainer.current_epoch}")
