"""What a person watching a run looks at beside the losses: throughput (tokens/s, MFU) and train vs val in one chart."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


class Throughput(Callback):
    """Logs ``train/tokens_per_sec`` (all ranks together) and, where Lightning knows the device's bf16 peak (GPUs),
    ``train/mfu`` = tokens/s × ``GPT.flops_per_token()`` / (peak × devices), to the progress bar and TensorBoard at
    each ``log_every_n_steps``: over the optimizer steps since the previous log point, without validation time.

    Not Lightning's ThroughputMonitor: it synchronises CUDA after every batch, stalling the host each step; here the
    device is synchronised at log points only, and the metrics keep the names above.
    """

    _paused = 0.0  # seconds of validation in the interval (the sanity check's comes before the first)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._flops_per_token = pl_module.model.flops_per_token()
        self._peak = get_available_flops(trainer.strategy.root_device, torch.bfloat16)  # None on a CPU

    def _now(self, trainer: Trainer) -> float:
        if trainer.strategy.root_device.type in ("cuda", "mps"):  # the queued steps must finish to be counted
            getattr(torch, trainer.strategy.root_device.type).synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._start_step, self._paused = self._now(trainer), trainer.global_step, 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_start = self._now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._paused += time.perf_counter() - self._pause_start

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if not every or step % every or step == self._start_step:  # once per optimizer step, at log points
            return
        seconds = self._now(trainer) - self._start - self._paused
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
