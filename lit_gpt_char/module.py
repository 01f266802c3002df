"""LitGPT: the LightningModule around GPT — loss, metrics, AdamW and the learning-rate schedule.

The Trainer owns the loop, devices, precision, checkpoints and logging; this file only says what a
step computes. The checkpoint's hyperparameters hold the vocabulary and the model's shape as plain
values, so a model can be rebuilt from the checkpoint file alone (``LitGPT.load_from_checkpoint``).
"""

import math
from dataclasses import asdict
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.internals import accumulating
from lit_gpt_char.model import GPT, GPTConfig
from lit_gpt_char.optim import MuonAdamW
from lit_gpt_char.policy import RunPolicy


def lr_factor(step: int, warmup: int, end: int, schedule: str, floor: float, cooldown: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Linear warmup over ``warmup`` steps, then: "constant" stays at 1; "cosine" follows
    floor + (1 - floor)·(1 + cos(π·t))/2 with t going 0 → 1 from the end of warmup to step ``end``;
    "wsd" (warmup-stable-decay) stays at 1 and decays linearly to ``floor`` over the last
    ``cooldown`` fraction of ``end`` steps. After ``end`` it holds at ``floor`` (min_lr / learning_rate).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, end - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    cooldown_start = end * (1.0 - cooldown)
    t = min(1.0, max(0.0, (step - cooldown_start) / max(1.0, end - cooldown_start)))
    return 1.0 - (1.0 - floor) * t


def scaled_and_clipped(trainer: Trainer) -> bool:
    """Whether the Trainer scales the loss (16-mixed) and clips gradients: a fused AdamW step cannot be clipped."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None and bool(trainer.gradient_clip_val)


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
        fused_adamw: Use the fused AdamW kernel. Unset: on for CUDA and CPU devices, unless 16-mixed precision
            scales the loss and gradients are clipped (a fused step cannot be clipped there).
        optimizer: "adamw" (every parameter), or "muon": Muon for the transformer blocks' weight matrices and
            AdamW (learning_rate, betas, weight_decay) for the embeddings, the output head and the norms.
        muon_lr: Muon's peak learning rate (the schedule scales it as it scales learning_rate).
        muon_momentum: Muon's (Nesterov) momentum.
        compile: Compile the model's forward pass with torch.compile (on a small CPU the compile time does not pay;
            whether it pays on a GPU is for benchmarks/gpu_speedrun.py to show).
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
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        compile: bool = False,
    ) -> None:
        super().__init__()
        shape = GPTConfig(**config) if isinstance(config, dict) else config  # a dict: as stored in a checkpoint
        for ok, message in (  # each message begins with the option's name: the CLI writes it as --model.NAME
            (shape.vocab_size == len(vocab), f"config.vocab_size ({shape.vocab_size}) != len(vocab) ({len(vocab)})"),
            (learning_rate > 0, f"learning_rate must be > 0, got {learning_rate}"),
            (muon_lr > 0, f"muon_lr must be > 0, got {muon_lr}"),
            (0 <= muon_momentum < 1, f"muon_momentum must be in [0, 1), got {muon_momentum}"),
            (warmup_steps >= 0, f"warmup_steps must be >= 0, got {warmup_steps}"),
            (
                lr_schedule == "constant" or decay_steps is None or decay_steps > warmup_steps,
                f"decay_steps ({decay_steps}) must be greater than warmup_steps ({warmup_steps})",
            ),
            (min_lr >= 0, f"min_lr must be >= 0, got {min_lr}"),
            (min_lr <= learning_rate, f"min_lr ({min_lr}) must be at most learning_rate ({learning_rate})"),
            (0 <= cooldown_fraction <= 1, f"cooldown_fraction must be in [0, 1], got {cooldown_fraction}"),
        ):
            if not ok:
                raise LitGPTCharError(message)
        config = asdict(shape)  # save_hyperparameters reads this local: plain values load with weights_only=True
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer(vocab)
        self.model = GPT(shape)
        # a function, not a second module attribute: the weights are stored once, named model.*, whether
        # compiled or not (a checkpoint then resumes with compile switched either way)
        self._forward = torch.compile(self.model.forward) if compile else self.model.forward
        self._train_loss_sum, self._train_loss_count = 0.0, 0  # train/loss of the log window under way
        self.eval_loss = MeanMetric()  # of the validation or test under way (they never run at once)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._forward(*batch)
        # aggregate every micro-batch, log every log_every_n_steps optimizer steps: a self.log call costs a
        # noticeable part of a small CPU step in Lightning 2.6 (benchmarks/trainer_overhead.py); a running sum on the
        # loss's device needs no sync
        self._train_loss_sum = loss.detach() + (self._train_loss_sum if self._train_loss_count else 0.0)
        self._train_loss_count += 1
        if self.trainer.accumulate_grad_batches > 1 and accumulating(self.trainer):
            return loss  # not the window's last micro-batch: the optimizer steps (and the mean is logged) with that one
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            # mean over the micro-batches since the last log, on this rank
            self.log("train/loss", self._train_loss_sum / self._train_loss_count, prog_bar=True)
            self._train_loss_count = 0
            self.log("lr", self.optimizers().param_groups[0]["lr"])
            self.log("step", float(self.global_step + 1))  # this batch's update is step N (see on_validation_epoch_end)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, _ = self._forward(x)
        # sum over tokens so windows of any length weigh by their token count in the mean
        loss_sum = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        self.eval_loss.update(loss_sum / y.numel(), weight=y.numel())

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        prefix = "test" if self.trainer.testing else "val"
        loss = self.eval_loss.compute()  # mean over every rank's windows (torchmetrics syncs under DDP)
        self.eval_loss.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log(f"{prefix}/bpc", loss / math.log(2))
        # "step" is the x-axis of what is logged with it (not a metric itself): optimizer steps completed,
        # trainer.global_step, as in checkpoint names. Lightning's own counter is one behind for validation
        # mid-epoch, and one ahead after resuming from a checkpoint saved there. Only while fitting: a
        # validate/test run has no x-axis to give, and Lightning would list "step" in its table of metrics
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.log("step", float(self.global_step))

    on_test_epoch_end = on_validation_epoch_end

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the running train/loss sum of the log window under way: the first mean after resuming covers the whole window
        # (rank 0's, the one that is logged)
        total = float(self._train_loss_sum) if self._train_loss_count else 0.0
        checkpoint["train_loss_window"] = {"sum": total, "count": self._train_loss_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the weights were stored once also hold a copy of each under _forward.*
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("_forward.")}
        window = checkpoint.get("train_loss_window", {"sum": 0.0, "count": 0})
        self._train_loss_sum, self._train_loss_count = window["sum"], window["count"]

    def configure_callbacks(self) -> list[Callback]:
        # how a run guards itself (divergence, step-aligned evaluation, per-rank random streams), whatever the Trainer
        return [RunPolicy()]

    def configure_optimizers(self) -> Union[torch.optim.Optimizer, dict[str, Any]]:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Muon takes the blocks' weight matrices; the embedding tables and the head stay on AdamW
        blocks = self.model.h if hp.optimizer == "muon" else []
        muon = {p for block in blocks for p in block.parameters() if p.dim() == 2}
        groups = [
            {"params": [p for p in params if p.dim() >= 2 and p not in muon], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel (CUDA and CPU) is faster than the per-tensor loop; under fp16's loss scaling Lightning
        # cannot clip the gradients before it (they are unscaled inside the fused step)
        fused = hp.fused_adamw
        if fused is None:
            fused = self.device.type in ("cuda", "cpu") and not scaled_and_clipped(self.trainer)
        adamw = {"lr": hp.learning_rate, "betas": tuple(hp.betas), "fused": fused}
        if hp.optimizer == "muon":
            optimizer = MuonAdamW([p for p in params if p in muon], groups, hp.muon_lr, hp.muon_momentum, **adamw)
        else:
            optimizer = torch.optim.AdamW(groups, **adamw)
        if hp.lr_schedule == "constant" and hp.warmup_steps == 0:
            return optimizer
        end = hp.decay_steps or self.trainer.max_steps
        if end < 1:
            raise LitGPTCharError(f"lr_schedule {hp.lr_schedule} has no end: set decay_steps or --trainer.max_steps")
        ratio = hp.min_lr / hp.learning_rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, end, hp.lr_schedule, ratio, hp.cooldown_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
