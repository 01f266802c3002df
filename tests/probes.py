"""Callbacks the tests add through the CLI (``--trainer.callbacks+=tests.probes.Probe``): observe or disturb a run."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal as signal_module
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

_RECORDS: list[Path] = []  # the files Probe wrote in this process


@atexit.register  # at import, before any Trainer exists: it runs after every exit handler the run registers
def _record_exit() -> None:
    """Whether the process group was still up when the interpreter began to finalize: a gloo group left to
    finalization can abort the process (a worker thread of it releases the last collective's tensors without the
    GIL: "terminate called without an active exception")."""
    for path in _RECORDS:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "process_group_at_exit": dist.is_initialized()}))


class Probe(Callback):
    """Writes ``out_dir/rank{r}.json``: the training windows this rank drew and the val losses it logged, and
    at exit whether the process group was left up."""

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
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "val_losses": self.val_losses,
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
        _RECORDS.append(path)


class InjectNaN(Callback):
    """Makes the model produce NaN from optimizer step ``at_step`` on (a stand-in for divergence), on one
    rank (``rank``) or on all (None). With ``out_dir``: writes ``out_dir/last_step{r}.json`` when fit fails, the
    last optimizer step this rank began."""

    def __init__(self, at_step: int, rank: Optional[int] = None, out_dir: Optional[str] = None) -> None:
        self.at_step = at_step
        self.rank = rank
        self.out_dir = out_dir
        self.last_step = -1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.last_step = trainer.global_step
        if trainer.global_step == self.at_step and self.rank in (None, trainer.global_rank):
            with torch.no_grad():
                pl_module.model.wte.weight.fill_(float("nan"))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.out_dir) / f"last_step{trainer.global_rank}.json").write_text(json.dumps(self.last_step))


class SendSignal(Callback):
    """Sends ``signal`` to its own process, on rank ``rank``, at a deterministic place: at the start of micro-batch
    ``micro`` of the optimizer step after step ``at_step``, or, with ``val_batch``, at validation batch ``val_batch``
    of the evaluation at step ``at_step``. A real signal, delivered where a test wants it."""

    def __init__(
        self, at_step: int, signal: str = "SIGTERM", rank: int = 0, micro: int = 0, val_batch: Optional[int] = None
    ) -> None:
        self.at_step = at_step
        self.signum = getattr(signal_module, signal)
        self.rank = rank
        self.micro = micro
        self.val_batch = val_batch
        self._micro_seen = 0
        self._sent = False

    def _send(self, trainer: Trainer) -> None:
        if not self._sent and trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            self._sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.val_batch is None and trainer.global_step == self.at_step:
            if self._micro_seen == self.micro:
                self._send(trainer)
            self._micro_seen += 1

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int, *args
    ) -> None:
        if self.val_batch == batch_idx and not trainer.sanity_checking:
            self._send(trainer)


class RngDigest(Callback):
    """Writes ``out_dir/rng{r}.txt`` at the end of fit: a digest of this rank's global RNG state (dropout's stream)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        (self.out_dir / f"rng{trainer.global_rank}.txt").write_text(digest)


class Losses(Callback):
    """Writes ``out_dir/losses{r}.json``: [optimizer step under way, training loss] for every micro-batch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # Lightning hands over the loss divided by accumulate_grad_batches (what backward sees)
        step = trainer.global_step - (not trainer.fit_loop.epoch_loop._should_accumulate())
        self.losses.append((step, float(outputs["loss"]) * trainer.accumulate_grad_batches))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"losses{trainer.global_rank}.json").write_text(json.dumps(self.losses))


class LoseWorker(Callback):
    """SIGKILLs rank ``rank`` at the start of optimizer step ``at_step`` of the first torchrun attempt only
    (TORCHELASTIC_RESTART_COUNT 0): a worker lost once, as a failed machine loses it; the restarted job goes on."""

    def __init__(self, at_step: int, rank: int = 1) -> None:
        self.at_step = at_step
        self.rank = rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal_module.SIGKILL)
