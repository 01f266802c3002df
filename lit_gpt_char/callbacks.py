"""Callbacks: SampleTextCallback (text while training), InterruptCheckpoint (Ctrl-C / SIGTERM safety),
Checkpoint (ModelCheckpoint naming files by the optimizer step) and RunPolicy (how a run guards itself and stays
exact: divergence, evaluations at optimizer steps, per-rank random streams)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char.data import CharTokenizer, _mix
from lit_gpt_char.errors import LitGPTCharError, shown
from lit_gpt_char.internals import (
    evaluation_follows,
    every_n_train_steps,
    mark_saved,
    save_last,
    saved_step,
    set_logging_step,
    set_sigterm,
)


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
        every_n_steps: int = 1000,
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
        self._last_step = 0

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step  # the step a run starts (or resumes) from has no new model to show

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        step = trainer.global_step
        if (
            step != self._last_step  # this batch stepped the optimizer (once per step under gradient accumulation)
            and self.every_n_steps
            and step % self.every_n_steps == 0
            and trainer.is_global_zero
            # a diverged model is not sampled (rank 0 alone must not raise); RunPolicy's own check stops the run
            and all(c.first_bad_step() is None for c in trainer.callbacks if isinstance(c, RunPolicy))
        ):
            self._publish(trainer, self.sample(pl_module, self.max_new_tokens), "samples")
        self._last_step = step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.final_max_new_tokens and trainer.is_global_zero:
            self._publish(trainer, self.sample(pl_module, self.final_max_new_tokens), "samples/final")


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class InterruptCheckpoint(Callback):
    """Ctrl-C or SIGTERM during fit: finish the optimizer step under way, and the evaluation and checkpoints due at it,
    then save ``last.ckpt`` and say how to resume.

    While training, both signals only set a flag: Lightning installs no SIGINT handler (Ctrl-C would land anywhere in a
    step, even between the updates of two parameter groups), and it acts on SIGTERM after any batch, inside a gradient
    accumulation window. The flag is read at the end of each batch that stepped the optimizer and at the end of each
    evaluation; then Lightning's own SIGTERM stop ends fit after that batch, once the evaluation and checkpoints due at
    the step are done, and this callback saves. Under DDP the ranks agree on it (one all-reduce a step), so every rank
    stops at the same step. A second Ctrl-C stops at once and saves nothing. Other exceptions save nothing: the state
    may be the cause (a diverged model), and the last checkpoint written by ModelCheckpoint stays.
    """

    def __init__(self) -> None:
        self._signal: Optional[int] = None  # the first signal received while training
        self._stopping = False
        self._previous: dict[int, Any] = {}
        self._seen_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signal, self._stopping, self._seen_step = None, False, trainer.global_step
        if trainer.received_sigterm:  # Lightning's handler got a SIGTERM in the sanity check: act on it at a step's end
            set_sigterm(trainer, False)
            self._signal = signal.SIGTERM
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self._previous = {signum: signal.signal(signum, self._receive) for signum in _SIGNAL_NAMES}

    def _receive(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
        self._signal = self._signal or signum

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step != self._seen_step:  # this batch stepped the optimizer: a whole step is done
            self._seen_step = trainer.global_step
            # Lightning's stop would cut short the evaluation due at this step: decide after it (on_validation_end)
            if not evaluation_follows(trainer):
                self._decide(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._decide(trainer)  # a signal during the evaluation: it is finished, its checkpoints come next

    def _decide(self, trainer: Trainer) -> None:
        stop = self._signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not self._stopping:
            self._stopping = True
            # Lightning raises SIGTERMException at the end of this batch, after its evaluation and checkpoints
            set_sigterm(trainer, True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()  # before the Trainer's teardown puts back the handlers it found

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if not (self._stopping and isinstance(exception, SIGTERMException)):
            if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
                print(
                    f"interrupted by Ctrl-C during step {trainer.global_step + 1}: nothing saved (the last checkpoint "
                    f"is {shown(last_checkpoint(trainer)) or 'none'})",
                    file=sys.stderr,
                    flush=True,
                )
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or "checkpoints"
        path = Path(dirpath) / "last.ckpt"
        # at an evaluation step the checkpoint callbacks have just written it (the grace time of a SIGTERM is short)
        if not any(cb.save_last and saved_step(cb) == trainer.global_step for cb in trainer.checkpoint_callbacks):
            trainer.save_checkpoint(path)
        signum = self._signal or signal.SIGTERM  # None: the signal went to another process of this run
        exception.signum = signum  # the exit status, 128 + signum (cli.main)
        if trainer.is_global_zero:
            print(
                f"interrupted by {_SIGNAL_NAMES[signum]} after step {trainer.global_step}: saved {shown(path)}; "
                f"resume by running the same command with --ckpt_path {shown(path)}",
                file=sys.stderr,
                flush=True,
            )


def last_checkpoint(trainer: Trainer) -> str:
    """The path of the newest last.ckpt this run wrote, or ""."""
    return next((cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path), "")


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``{step}`` in filenames always the optimizer step being saved, a save due at an
    evaluation step made after that evaluation, and two rules Lightning does not keep:

    - with ``save_last``, last.ckpt is the newest state: also written after an evaluation and at the end of fit when
      this callback saved nothing else there (Lightning writes it only beside one of its own saves);
    - with a ``monitor``, resuming an older checkpoint of the run keeps the scores of the files on disk, not those of
      the step resumed from, so a worse model never replaces a better one.

    LitGPT logs a "step" value as TensorBoard's x-axis only when it logs (every log_every_n_steps and
    at evaluations); ModelCheckpoint would take that, possibly stale, value for ``{step}``. The state
    key (which Lightning formats around every hook call, ~50 times a step) is computed once.
    """

    _after_evaluation: Optional[tuple] = None  # a step's save waiting for the evaluation at that step
    evaluated_step: Optional[int] = None  # of fit's latest evaluation: its val/loss is in trainer.callback_metrics

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # the step a run resumes from is on disk already; saving it again would, under gradient accumulation,
        # write the state of the first micro-batch after resuming, in the middle of an accumulation window
        mark_saved(self, trainer.global_step)
        if self.monitor:
            self._rescore_from_disk(trainer)

    def _rescore_from_disk(self, trainer: Trainer) -> None:
        # the checkpoint resumed from may hold older scores, or none (written before the first evaluation, or in
        # another folder): what counts is what the files on disk hold now
        scores = {}
        if trainer.is_global_zero:  # the files are rank 0's; every rank must take the same decisions
            own = os.path.join(self.dirpath, f"{self.filename}{self.FILE_EXTENSION}") if self.filename else None
            for path in {*self.best_k_models, *([own] if own and "{" not in own else [])}:
                if os.path.isfile(path):
                    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    score = saved.get("callbacks", {}).get(self.state_key, {}).get("current_score")
                    if score is not None:
                        scores[path] = score
        self.best_k_models = trainer.strategy.broadcast(scores)
        if not self.best_k_models:
            self.best_model_score, self.best_model_path, self.kth_best_model_path = None, "", ""
            return
        best, worst = (min, max) if self.mode == "min" else (max, min)
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
        self.kth_value = self.best_k_models[self.kth_best_model_path]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        n = every_n_train_steps(self)
        if n and trainer.global_step % n == 0 and evaluation_follows(trainer):
            # an evaluation follows at this step: save after it. Lightning resumes from a file written before the
            # evaluation by skipping it, so a run killed during that evaluation would never have it
            self._after_evaluation = args
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self.evaluated_step = trainer.global_step
        if self._after_evaluation is not None:
            args, self._after_evaluation = self._after_evaluation, None
            super().on_train_batch_end(trainer, pl_module, *args)
        self._save_last_if_new(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_new(trainer)

    def _save_last_if_new(self, trainer: Trainer) -> None:
        if self.save_last and saved_step(self) != trainer.global_step:
            save_last(self, trainer)

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


_NO_BAD_STEP = 2**62  # "no non-finite loss yet" in the device-side record of the first bad step


class RunPolicy(Callback):
    """How a run guards itself and stays exact; LitGPT adds it to every Trainer that fits it (configure_callbacks).

    - Divergence: a non-finite training loss stops fit with one error naming the optimizer step, and no checkpoint
      is written after it. On a CPU the check is free and comes before the backward pass, so the weights stay good.
      On an accelerator a per-step check would stall the host until the step finishes, so the first bad step is kept
      on the device and checked (one sync) at each log step, before every evaluation and before every checkpoint is
      written. Under DDP the decision is taken over all ranks, so every rank stops at the same point instead of one
      waiting forever in a collective.
    - Optimizer steps are the unit. With gradient accumulation over k batches an integer ``val_check_interval`` N
      means every N optimizer steps (Lightning counts batches), so evaluations and their checkpoints fall between
      steps, never inside an accumulation window. Lightning's logging counter is kept at the optimizer step: after a
      resume it can be one ahead, which would write every train/loss point a few steps late.
    - Random streams: under DDP rank r > 0 reseeds the global RNG (dropout) from (seed, r), as nanoGPT offsets its
      seed per rank, so ranks do not draw the same masks; every rank's RNG state is gathered into the checkpoint
      (rank 0 writes it) and each comes back to its rank on resume. A rank the checkpoint has no state for (more
      devices than before) keeps its fresh stream.
    """

    def __init__(self) -> None:
        self._first_bad: Optional[torch.Tensor] = None
        self._step: Optional[torch.Tensor] = None
        self._log_check_step = -1

    # ---- divergence ----

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._checks_on_host(loss):
            here = not bool(torch.isfinite(loss))
            anywhere = here
            if trainer.world_size > 1:
                anywhere = trainer.strategy.reduce_boolean_decision(here, all=False)
            if anywhere:
                self._diverged(
                    trainer, trainer.global_step, f"is {loss.item()}" if here else "is not finite on another rank"
                )
            return
        if self._first_bad is None:
            self._step = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=loss.device)
        assert self._step is not None
        self._step.fill_(trainer.global_step)  # the step goes to the kernel as an argument: no copy, no sync
        bad = ~torch.isfinite(loss) & (self._first_bad == _NO_BAD_STEP)
        self._first_bad = torch.where(bad, self._step, self._first_bad)

    @staticmethod
    def _checks_on_host(loss: torch.Tensor) -> bool:
        return loss.device.type == "cpu"

    def first_bad_step(self) -> Optional[int]:
        """The first step with a non-finite loss on this rank, or None (one host sync on an accelerator)."""
        if self._first_bad is None or int(self._first_bad) == _NO_BAD_STEP:
            return None
        return int(self._first_bad)

    def check_finite(self, trainer: Trainer) -> None:
        """Raise if a training loss so far was not finite on any rank (call it on every rank alike)."""
        if self._first_bad is None:
            return
        first = self._first_bad
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first.clone(), reduce_op="min")
        if int(first) != _NO_BAD_STEP:
            self._diverged(trainer, int(first), "is not finite")

    @staticmethod
    def _diverged(trainer: Trainer, step: int, loss: str) -> None:
        last = last_checkpoint(trainer) or "none written yet"
        raise LitGPTCharError(
            f"training diverged: the loss {loss} at step {step}. Checkpoints are kept as they were "
            f"(last: {last}); try a lower --model.learning_rate, --model.warmup_steps or "
            f"--trainer.gradient_clip_val 1.0"
        )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.check_finite(trainer)

    # ---- optimizer steps as the unit ----

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._align_validation(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._align_validation(trainer)  # Lightning sets val_check_batch again when it reloads the dataloader

    @staticmethod
    def _align_validation(trainer: Trainer) -> None:
        k = trainer.accumulate_grad_batches
        if k == 1 or trainer.val_check_batch in (None, float("inf")):
            return
        interval = trainer.val_check_interval
        batches = interval * k if isinstance(interval, int) else trainer.val_check_batch
        trainer.val_check_batch = -(-batches // k) * k  # a fraction of an epoch: rounded up to whole windows

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        # Lightning writes what was logged when its counter of "batches that stepped" says so; that counter is one
        # ahead after resuming from a checkpoint written at an evaluation. Here it is what it means: the step
        set_logging_step(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        every = trainer.log_every_n_steps
        step = trainer.global_step
        if self._first_bad is not None and every and step % every == 0 and step != self._log_check_step:
            self._log_check_step = step
            self.check_finite(trainer)

    # ---- per-rank random streams ----

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING and trainer.global_rank > 0:
            torch.manual_seed(_mix(torch.initial_seed(), trainer.global_rank))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check_finite(trainer)  # never write a diverged model
        states = {"torch": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        if trainer.world_size > 1:  # every rank saves alike; only rank 0 writes, so it gathers the others' states
            # torch.distributed directly: Lightning's all_gather goes through the deprecated autograd-aware
            # gather (a warning on every rank at every checkpoint). One tensor per rank, not views of one:
            # torch.set_rng_state ignores a view's storage offset (it would read rank 0's bytes, or crash)
            root = trainer.strategy.root_device
            gathered = {}
            for key, state in states.items():
                state = state.to(root)
                parts = [torch.empty_like(state) for _ in range(trainer.world_size)]
                torch.distributed.all_gather(parts, state)
                gathered[key] = [part.cpu() for part in parts]
            checkpoint["rng_states"] = [
                {key: g[rank] for key, g in gathered.items()} for rank in range(trainer.world_size)
            ]
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states", [])
        if isinstance(states, dict):  # written before the states were kept per rank: rank 0's
            states = [states]
        if trainer.global_rank < len(states):
            state = states[trainer.global_rank]
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():  # restored before the model moves: current device
                torch.cuda.set_rng_state(state["cuda"])
