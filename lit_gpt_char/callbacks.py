"""Callbacks: SampleTextCallback (text while training), InterruptCheckpoint (Ctrl-C / SIGTERM safety) and
Checkpoint (ModelCheckpoint naming files by the optimizer step)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError


class SampleTextCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 samples text from the model, prints it and logs it.

    Sampling uses its own seeded generator (the same seed each time, so samples from different
    steps differ only by what the model learned) and the KV-cache generator; the training RNG is
    untouched. At the end of fit a longer sample is printed and logged, like the lecture's final
    ``generate``.

    Args:
        every_n_steps: Steps between samples; 0 disables the periodic samples.
        prompt: Text the samples continue; every character must be in the vocabulary
            ("\\n" by default: the lecture starts from token 0, which is the newline).
        max_new_tokens: Characters per periodic sample.
        final_max_new_tokens: Characters of the sample at the end of fit; 0 disables it.
        temperature: Softmax temperature; 0 picks the most likely character.
        top_k: Sample only among the k most likely characters (unset: all).
        seed: Seed of the sampling generator.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        final_max_new_tokens: int = 2000,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        seed: int = 1337,
    ) -> None:
        if every_n_steps < 0 or max_new_tokens < 0 or final_max_new_tokens < 0:
            raise LitGPTCharError(
                "--sampling.every_n_steps, --sampling.max_new_tokens and --sampling.final_max_new_tokens must be >= 0"
            )
        if temperature < 0:
            raise LitGPTCharError(f"--sampling.temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise LitGPTCharError(f"--sampling.top_k must be >= 1 (or null: no cut), got {top_k}")
        if not prompt:
            raise LitGPTCharError('--sampling.prompt is empty; use "\\n" to start from a new line')
        self.every_n_steps = every_n_steps
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.final_max_new_tokens = final_max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._last_step = -1

    def check_prompt(self, tokenizer: CharTokenizer) -> None:
        """Fail now, not at step N, if the prompt has a character outside the vocabulary."""
        try:
            tokenizer.encode(self.prompt)
        except LitGPTCharError as err:
            raise LitGPTCharError(f"--sampling.prompt: {err}") from None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_prompt(pl_module.tokenizer)

    def sample(self, pl_module: LightningModule, max_new_tokens: int) -> str:
        """The prompt followed by ``max_new_tokens`` sampled characters."""
        model = pl_module.model
        idx = pl_module.tokenizer.encode(self.prompt)[None].to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                idx, max_new_tokens, temperature=self.temperature, top_k=self.top_k, generator=generator
            )
        finally:
            model.train(was_training)
        return pl_module.tokenizer.decode(out[0])

    def _publish(self, trainer: Trainer, text: str, tag: str) -> None:
        step = trainer.global_step
        bar = trainer.progress_bar_callback
        show = getattr(bar, "print", print)  # the tqdm bar's print keeps the bar intact
        show(f"\n----- {tag} at step {step} -----\n{text}\n-----")
        markdown = "\n".join("    " + line for line in text.splitlines())  # indented: shown verbatim
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, markdown, global_step=step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and step != self._last_step  # once per optimizer step under gradient accumulation
            and trainer.is_global_zero
            # a diverged model is not sampled (rank 0 alone must not raise); LitGPT's own check stops the run
            and getattr(pl_module, "first_bad_step", lambda: None)() is None
        ):
            self._last_step = step
            self._publish(trainer, self.sample(pl_module, self.max_new_tokens), "samples")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.final_max_new_tokens and trainer.is_global_zero:
            self._publish(trainer, self.sample(pl_module, self.final_max_new_tokens), "samples/final")


class InterruptCheckpoint(Callback):
    """On Ctrl-C or SIGTERM during fit, save ``last.ckpt`` in the checkpoint folder and say how to resume.

    Lightning stops at the end of the current step when it receives SIGTERM, so the checkpoint holds a
    whole step and resuming continues with the next one. Other exceptions save nothing: the state
    may be the cause (a diverged model), and the last checkpoint written by ModelCheckpoint stays.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != TrainerFn.FITTING:
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or "checkpoints"
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        if path.is_relative_to(Path.cwd()):  # ModelCheckpoint makes its dirpath absolute: show it short
            path = path.relative_to(Path.cwd())
        if trainer.is_global_zero:
            signal_name = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
            print(
                f"interrupted by {signal_name} after step {trainer.global_step}: saved {path}; "
                f"resume by running the same command with --ckpt_path {path}",
                file=sys.stderr,
                flush=True,
            )


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``{step}`` in filenames always the optimizer step being saved.

    LitGPT logs a "step" value as TensorBoard's x-axis only when it logs (every log_every_n_steps and
    at evaluations); ModelCheckpoint would take that, possibly stale, value for ``{step}``. The state
    key (which Lightning formats around every hook call, ~50 times a step) is computed once.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    @property
    def state_key(self) -> str:
        if "_state_key" not in self.__dict__:
            self._state_key = super().state_key
        return self._state_key

    def format_checkpoint_name(self, metrics: dict[str, torch.Tensor], *args, **kwargs) -> str:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            metrics = {**metrics, "step": torch.tensor(trainer.global_step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)
