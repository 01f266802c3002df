"""LitGPT: the LightningModule around GPT — loss, metrics, AdamW and the learning-rate schedule.

The Trainer owns the loop, devices, precision, checkpoints and logging; this file only says what a
step computes. The checkpoint's hyperparameters hold the vocabulary and the model's shape as plain
values, so a model can be rebuilt from the checkpoint file alone (``LitGPT.load_from_checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from torch.nn import functional as F
from torchmetrics import MeanMetric

from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPT, GPTConfig

_NONE = 2**62  # "no non-finite loss yet" in the device-side record of the first bad step


def lr_factor(
    step: int, warmup_steps: int, decay_steps: int, schedule: str, min_lr_ratio: float, cooldown_fraction: float
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Linear warmup over ``warmup_steps``, then: "constant" stays at 1; "cosine" follows
    min + (1 - min)·(1 + cos(π·t))/2 with t going 0 → 1 from the end of warmup to ``decay_steps``;
    "wsd" (warmup-stable-decay) stays at 1 and decays linearly to min over the last
    ``cooldown_fraction`` of ``decay_steps``. After ``decay_steps`` it holds at min.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    cooldown_start = decay_steps * (1.0 - cooldown_fraction)
    t = min(1.0, max(0.0, (step - cooldown_start) / max(1.0, decay_steps - cooldown_start)))
    return 1.0 - (1.0 - min_lr_ratio) * t


class LitGPT(LightningModule):
    """Trains :class:`~lit_gpt_char.model.GPT` on character windows.

    Args:
        vocab: The characters the model knows, in id order. Linked from the data; stored in the
            checkpoint so sampling needs no corpus.
        config: The model's shape and architecture (block_size and vocab_size come from the data).
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay, applied only to weights of 2 or more dimensions (matrices
            and embeddings), never to biases or LayerNorm gains.
        betas: AdamW's (beta1, beta2).
        warmup_steps: Optimizer steps of linear warmup from ~0 to learning_rate.
        lr_schedule: After warmup: "constant" (the lecture), "cosine" decay to min_lr, or "wsd"
            (warmup-stable-decay: constant, then a linear cooldown to min_lr).
        decay_steps: Step at which the decay reaches min_lr. Unset: the Trainer's max_steps.
        min_lr: Learning rate at the end of the decay.
        cooldown_fraction: For "wsd": the last fraction of decay_steps spent cooling down.
        fused_adamw: Use the fused AdamW kernel. Unset: on for CUDA and CPU devices.
        compile: Compile the model's forward pass with torch.compile (on a 2-core CPU it costs 27 s and the
            compiled step is slower; whether it pays on a GPU is for benchmarks/gpu_speedrun.py to show).
    """

    def __init__(
        self,
        vocab: str,
        config: GPTConfig,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine", "wsd"] = "constant",
        decay_steps: Optional[int] = None,
        min_lr: float = 0.0,
        cooldown_fraction: float = 0.2,
        fused_adamw: Optional[bool] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        shape = GPTConfig(**config) if isinstance(config, dict) else config  # a dict: as stored in a checkpoint
        if shape.vocab_size != len(vocab):
            raise LitGPTCharError(f"config.vocab_size is {shape.vocab_size} but the vocabulary has {len(vocab)} chars")
        if learning_rate <= 0 or min_lr < 0:
            raise LitGPTCharError(f"learning_rate must be > 0 and min_lr >= 0, got {learning_rate} and {min_lr}")
        if warmup_steps < 0:
            raise LitGPTCharError(f"warmup_steps must be >= 0, got {warmup_steps}")
        config = asdict(shape)  # save_hyperparameters reads this local: plain values load with weights_only=True
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer(vocab)
        self.model = GPT(shape)
        # a function, not a second module attribute: the weights are stored once, named model.*, whether
        # compiled or not (a checkpoint then resumes with compile switched either way)
        self._forward = torch.compile(self.model.forward) if compile else self.model.forward
        self._train_loss_sum: torch.Tensor | float = 0.0
        self._train_loss_count = 0
        self._first_bad: Optional[torch.Tensor] = None  # see _watch_finite
        self._step_on_device: Optional[torch.Tensor] = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around each of ~40 hook calls a step; nn.Module.__setattr__'s
        # bookkeeping makes that ~0.05 ms a step. A plain string needs none of it
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self._forward(x, y)
        self._watch_finite(loss)
        # aggregate every step, log every log_every_n_steps: one self.log costs ~0.8 ms in Lightning 2.6,
        # a tenth of a small CPU step, so per-step logging would make the Trainer 25% slower than a loop
        # (a running sum on the loss's device: no sync, ~1 µs; torchmetrics' update costs ~50 µs)
        self._train_loss_sum = loss.detach() + (self._train_loss_sum if self._train_loss_count else 0.0)
        self._train_loss_count += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            # mean since the last log, on this rank
            self.log("train/loss", self._train_loss_sum / self._train_loss_count, prog_bar=True)
            self._train_loss_count = 0
            self.log("lr", self.optimizers().param_groups[0]["lr"])
            self.log("step", float(self.global_step + 1))  # this batch's update is step N (see _log_eval)
        return loss

    def _watch_finite(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite loss, naming the step, without writing any checkpoint after it.

        On a CPU the check is free: training stops before the optimizer applies the step, the weights
        stay good. On an accelerator a per-step check would stall the host until the step finishes, so
        the first bad step is kept on the device and checked (one sync) at each log step, before every
        evaluation and before every checkpoint is written (check_finite). Under DDP the decision is
        taken over all ranks, so that every rank stops at the same point instead of one waiting forever.
        """
        if self._checks_on_host(loss):
            here = not torch.isfinite(loss)
            anywhere = here
            if self.trainer.world_size > 1:
                anywhere = self.trainer.strategy.reduce_boolean_decision(here, all=False)
            if anywhere:
                self._diverged(self.global_step, f"is {loss.item()}" if here else "is not finite on another rank")
            return
        if self._first_bad is None:  # device-side step counter and first non-finite step (_NONE: none yet)
            self._step_on_device = torch.tensor(self.global_step, device=loss.device)
            self._first_bad = torch.tensor(_NONE, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_bad == _NONE)
        self._first_bad = torch.where(bad, self._step_on_device, self._first_bad)
        self._step_on_device += 1
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.check_finite()

    @staticmethod
    def _checks_on_host(loss: torch.Tensor) -> bool:
        return loss.device.type == "cpu"

    def first_bad_step(self) -> Optional[int]:
        """The first step with a non-finite loss on this rank, or None (one host sync on an accelerator)."""
        return None if self._first_bad is None or int(self._first_bad) == _NONE else int(self._first_bad)

    def check_finite(self) -> None:
        """Raise if a training loss so far was not finite on any rank (call it on every rank alike)."""
        if self._first_bad is None:
            return
        first = self._first_bad
        if self.trainer.world_size > 1:
            first = self.trainer.strategy.reduce(first.clone(), reduce_op="min")
        if int(first) != _NONE:
            self._diverged(int(first), "is not finite")

    def _diverged(self, step: int, loss: str) -> None:
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise LitGPTCharError(
            f"training diverged: the loss {loss} at step {step}. Checkpoints are kept as they were "
            f"(last: {last}); try a lower --model.learning_rate, --model.warmup_steps or "
            f"--trainer.gradient_clip_val 1.0"
        )

    def on_validation_start(self) -> None:
        self.check_finite()

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metric: MeanMetric) -> None:
        x, y = batch
        logits, _ = self._forward(x)
        # sum over tokens so windows of any length weigh by their token count in the mean
        loss_sum = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        metric.update(loss_sum / y.numel(), weight=y.numel())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def _log_eval(self, prefix: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # mean over every rank's windows (torchmetrics syncs under DDP)
        metric.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log(f"{prefix}/bpc", loss / math.log(2))
        # "step" is the x-axis of what is logged with it (not a metric itself): optimizer steps completed,
        # trainer.global_step, as in checkpoint names. Lightning's own counter is one behind for validation
        # mid-epoch, and one ahead after resuming from a checkpoint saved there
        self.log("step", float(self.global_step))

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never write a diverged model
        # the global RNG drives dropout: with it, a resumed run draws the same masks as an unbroken one
        # (every rank seeds alike and draws alike, so rank 0's state is every rank's)
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the weights were stored once also hold a copy of each under _forward.*
        state = checkpoint["state_dict"]
        for key in [key for key in state if key.startswith("_forward.")]:
            del state[key]
        states = checkpoint.get("rng_states", {})
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():  # restored before the model moves: current device
            torch.cuda.set_rng_state(states["cuda"])

    def configure_optimizers(self) -> Union[torch.optim.Optimizer, dict[str, Any]]:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel (CUDA and CPU) is ~15% of a small CPU step faster than the per-tensor loop
        fused = hp.fused_adamw if hp.fused_adamw is not None else self.device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), fused=fused)
        if hp.lr_schedule == "constant" and hp.warmup_steps == 0:
            return optimizer
        decay_steps = hp.decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps < 1:
            raise LitGPTCharError(
                f"lr_schedule {hp.lr_schedule!r} needs --model.decay_steps or --trainer.max_steps to know when to end"
            )
        min_ratio = hp.min_lr / hp.learning_rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, hp.warmup_steps, decay_steps, hp.lr_schedule, min_ratio, hp.cooldown_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
