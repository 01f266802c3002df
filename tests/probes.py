"""Callbacks the tests add through the CLI (``--trainer.callbacks+=tests.probes.Probe``): observe or disturb a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class Probe(Callback):
    """Writes ``out_dir/rank{r}.json``: the training windows this rank drew and the val losses it logged."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[list[list[int]]] = []
        self.val_losses: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.batches.append(batch[0].tolist())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "val_losses": self.val_losses,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class InjectNaN(Callback):
    """Makes the model produce NaN from optimizer step ``at_step`` on (a stand-in for divergence), on one
    rank (``rank``) or on all (None)."""

    def __init__(self, at_step: int, rank: Optional[int] = None) -> None:
        self.at_step = at_step
        self.rank = rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                pl_module.model.wte.weight.fill_(float("nan"))
