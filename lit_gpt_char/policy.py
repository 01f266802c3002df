"""RunPolicy: how every fit guards itself and stays exact (divergence, optimizer steps as the unit, per-rank random
streams). Not a user's choice, so not a CLI callback: LitGPT.configure_callbacks adds it to every Trainer."""

import math
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from lit_gpt_char.checkpoints import last_checkpoint
from lit_gpt_char.data import _mix
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.internals import accumulating, set_logging_step

_NO_BAD_STEP = 2**62  # "no non-finite loss yet" in the device-side record of the first bad step


def sync_due(trainer: Trainer) -> bool:
    """Whether a check that syncs (the ranks' agreement, a GPU's host waiting) is due at the batch that just ended:
    at log steps (every step without logging) and at the last step, after which fit ends."""
    step = trainer.global_step
    return step % (trainer.log_every_n_steps or 1) == 0 or step == trainer.max_steps


class RunPolicy(Callback):
    """How a run guards itself and stays exact.

    - Divergence: a non-finite training loss stops fit with one error naming the optimizer step, and no checkpoint
      is written after it. In one process on a CPU the check is free and comes before the backward pass, so the
      weights stay good. Elsewhere a per-step check would cost a sync every step (an accelerator's host waits for the
      step to finish; DDP's ranks must agree, one all-reduce), so the first bad step is kept on the device and
      checked (one sync, over all ranks) at each log step and the last step, before every evaluation, sample and
      checkpoint: fit stops at most ``log_every_n_steps`` steps after the bad one, every rank at the same point.
    - Optimizer steps are the unit. With gradient accumulation over k batches an integer ``val_check_interval`` N
      means every N optimizer steps (Lightning counts batches), so evaluations and their checkpoints fall between
      steps, never inside an accumulation window. Lightning's logging counter is kept at the optimizer step: after a
      resume it can be one ahead, which would write every train/loss point a few steps late.
    - Random streams: under DDP rank r > 0 reseeds the global RNG (dropout) from (seed, r), as nanoGPT offsets its
      seed per rank, so ranks do not draw the same masks; every rank's RNG state is gathered into the checkpoint
      (rank 0 writes it) and each comes back to its rank on resume. A rank the checkpoint has no state for (more
      devices than before) keeps its fresh stream.
    """

    _first_bad: Optional[torch.Tensor] = None  # off the host check: the first bad step, or _NO_BAD_STEP

    # ---- divergence ----

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._checks_on_host(trainer, loss):  # free, and before the backward pass: the weights stay good
            value = loss.item()
            if not math.isfinite(value):
                raise self._diverged(trainer, f"is {value}", trainer.global_step)
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=loss.device)
        # the step goes to the kernel as a Python scalar: no copy to the device, no sync
        bad = ~torch.isfinite(loss) & (self._first_bad == _NO_BAD_STEP)
        self._first_bad = torch.where(bad, trainer.global_step, self._first_bad)

    @staticmethod
    def _checks_on_host(trainer: Trainer, loss: torch.Tensor) -> bool:
        return loss.device.type == "cpu" and trainer.world_size == 1

    def check_finite(self, trainer: Trainer) -> None:
        """Raise if a training loss so far was not finite on any rank (call it on every rank alike)."""
        if self._first_bad is None:
            return
        first = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))  # over the ranks
        if first != _NO_BAD_STEP:
            raise self._diverged(trainer, "is not finite", first)

    @staticmethod
    def _diverged(trainer: Trainer, loss: str, step: int) -> LitGPTCharError:
        return LitGPTCharError(
            f"training diverged: the loss {loss} at step {step}. Checkpoints are kept as they were (last: "
            f"{last_checkpoint(trainer) or 'none written yet'}); try a lower --model.learning_rate, "
            f"--model.warmup_steps or --trainer.gradient_clip_val 1.0"
        )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_finite(trainer)  # a no-op but in fit, after a training step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if self._first_bad is not None and sync_due(trainer) and not accumulating(trainer):
            self.check_finite(trainer)

    # ---- optimizer steps as the unit ----

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # at the start of fit and of each epoch: Lightning sets val_check_batch again when it reloads the dataloader
        k = trainer.accumulate_grad_batches
        if k == 1 or trainer.val_check_batch in (None, float("inf")):
            return
        interval = trainer.val_check_interval
        batches = interval * k if isinstance(interval, int) else trainer.val_check_batch
        trainer.val_check_batch = -(-batches // k) * k  # a fraction of an epoch: rounded up to whole windows

    on_train_start = on_train_epoch_start

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        set_logging_step(trainer, trainer.global_step)

    # ---- per-rank random streams ----

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING and trainer.global_rank > 0:
            torch.manual_seed(_mix(torch.initial_seed(), trainer.global_rank))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check_finite(trainer)  # never write a diverged model
        states = {"torch": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng_states"] = [states] * trainer.world_size
        if trainer.world_size > 1:  # every rank saves alike, only rank 0 writes: it gathers the others' states
            torch.distributed.all_gather_object(checkpoint["rng_states"], states)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states", [])
        if isinstance(states, dict):  # written before the states were kept per rank: rank 0's
            states = [states]
        if trainer.global_rank < len(states):
            torch.set_rng_state(states[trainer.global_rank]["torch"])
            if "cuda" in states[trainer.global_rank] and torch.cuda.is_available():  # before the model moves
                torch.cuda.set_rng_state(states[trainer.global_rank]["cuda"])
