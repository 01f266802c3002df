"""Every check of the user's input that the command line makes before anything is written or printed.

Lightning prints while the CLI builds the Trainer; :class:`HeldOutput` keeps those lines back until the checks
pass, so that a rejected command prints one line, its error, and writes nothing.
"""

import inspect
import logging
import os
import re
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator

from lit_gpt_char.data import ShakespeareDataModule
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPTConfig
from lit_gpt_char.module import LitGPT, scaled_and_clipped
from lit_gpt_char.sampling import SampleTextCallback


def given(key: str, argv: list[str]) -> bool:
    """Whether option ``key``, or a group holding it, is on the command line (a config file's does not count)."""
    options = (token[2:].split("=", 1)[0] for token in argv if token.startswith("--"))
    return any(key == option or key.startswith(option + ".") for option in options)


def follow_checkpoint(config: Namespace, ckpt: dict, path: Path, argv: list[str], evaluate: bool) -> None:
    """The checkpoint decides the model: an option given on the command line that differs from it is an error.
    An evaluation also scores the run's own validation set, its corpus and windows saved in the checkpoint, unless
    given on the command line (not those of the --config given, e.g. small.yaml's 3,200 windows)."""
    hparams = ckpt["hyper_parameters"]
    # compile and fused_adamw may change on resume: how the step is computed, not what
    theirs = {f"model.{k}": v for k, v in hparams.items() if k not in ("vocab", "config", "compile", "fused_adamw")}
    # the corpus decides vocab_size (its vocabulary is checked on its own); block_size is the data's option
    theirs |= {f"model.config.{k}": v for k, v in hparams["config"].items() if k != "vocab_size"}
    theirs["data.block_size"] = theirs["model.config.block_size"]
    if evaluate:  # cache_dir and on_device: where this machine keeps and reads the corpus
        saved = ckpt.get(ShakespeareDataModule.CHECKPOINT_HYPER_PARAMS_KEY, {}).items()
        theirs |= {
            f"data.{k}": v for k, v in saved if k not in ("cache_dir", "on_device") and not given(f"data.{k}", argv)
        }
    for key, value in theirs.items():
        if key not in config:
            continue
        ours, plain = _plain(config[key]), _plain(value)
        if ours != plain and given(key, argv):
            raise LitGPTCharError(
                f"--{key} {ours} conflicts with checkpoint {path}, trained with {plain}: when resuming, the checkpoint "
                f"decides the model; pass --{key} {plain} or drop it, or start a new run without --ckpt_path"
            )
        config[key] = value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_trainer(trainer: Namespace) -> None:
    """Trainer options Lightning would reject with a message that does not say what to do."""
    mps = trainer.accelerator == "gpu" and torch.backends.mps.is_available()  # "gpu" is also Apple's MPS to Lightning
    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        raise LitGPTCharError(
            f"--trainer.accelerator {trainer.accelerator}: no CUDA GPU is visible here; use --trainer.accelerator cpu "
            f"(configs/small.yaml is sized for a CPU)"
        )
    devices = trainer.devices
    if isinstance(devices, int) and devices != -1 and devices < 1 or devices in ("0", ""):
        raise LitGPTCharError(f"--trainer.devices {devices}: use at least 1 (or -1 / auto for all of them)")


def check_built(trainer: Trainer, model: LitGPT, data: ShakespeareDataModule, ckpt: Optional[dict], fit: bool) -> list:
    """The checks that need the built objects; the notes to print once every check has passed."""
    cores, hp = os.cpu_count() or 1, model.hparams
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise LitGPTCharError(
            f"--trainer.devices {trainer.num_devices} asks for that many CPU processes, but this machine has {cores} "
            f"cores; use --trainer.devices {cores} or fewer"
        )
    for callback in trainer.callbacks:
        if isinstance(callback, SampleTextCallback):
            callback.check_prompt(model.tokenizer)
    scheduled = hp.lr_schedule != "constant" or hp.warmup_steps > 0
    if fit and scheduled and not hp.decay_steps and not (trainer.max_steps or 0) > 0:
        raise LitGPTCharError(
            f"--model.lr_schedule {hp.lr_schedule} needs to know where it ends: set --trainer.max_steps or "
            f"--model.decay_steps"
        )
    theirs = ckpt["hyper_parameters"]["vocab"] if ckpt is not None else data.vocab
    if theirs != data.vocab:
        raise LitGPTCharError(
            f"the checkpoint's vocabulary ({len(theirs)} characters) differs from that of corpus {data.path} "
            f"({len(data.vocab)}; only in the corpus: {''.join(sorted(set(data.vocab) - set(theirs)))!r}, only in "
            f"the checkpoint: {''.join(sorted(set(theirs) - set(data.vocab)))!r}): use the corpus the checkpoint was "
            f"trained on (--data.path), or start a new run without --ckpt_path"
        )
    if not scaled_and_clipped(trainer) or hp.fused_adamw is False:
        return []
    why = "16-mixed precision scales the loss, so a fused AdamW step cannot be clipped (--trainer.gradient_clip_val)"
    if hp.fused_adamw:
        raise LitGPTCharError(f"{why}: use --trainer.precision bf16-mixed, or --model.fused_adamw false")
    return [f"note: {why}: AdamW takes its plain step"]


def sized_for_a_gpu(trainer: Trainer, model: LitGPT, batch_size: int) -> Optional[str]:
    """A note when a run on a CPU would take hours: the expected time per step, and the CPU config."""
    gpt, windows = model.model, batch_size * trainer.accumulate_grad_batches
    # training FLOPs of one step: under ~1e11 a step is well under a second on any CPU
    big = gpt.flops_per_token() * windows * gpt.config.block_size >= 1e11
    if not big or not isinstance(trainer.accelerator, CPUAccelerator):
        return None
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        start = time.perf_counter()
        gpt(torch.zeros(2, gpt.config.block_size, dtype=torch.long))  # two windows, in the run's precision
    seconds = 3 * (time.perf_counter() - start) * windows / 2  # the backward pass costs about twice the forward
    note = f"note: this run is sized for a GPU: on this CPU one step takes ~{seconds:.0f} s; configs/small.yaml"
    return f"{note} is the CPU config" if seconds >= 1 else None


def name_options(message: str) -> str:
    """``message`` with the first mention of each model argument written as its option (--model.config.n_head);
    a word inside a path (``runs/init/dropout.txt``) is no mention."""
    names = [f"config.{f.name}" for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size")]
    names += [name for name in inspect.signature(LitGPT).parameters if name not in ("vocab", "config")]
    for name in names:
        word = name.rsplit(".", 1)[-1]
        message = re.sub(rf"(?<![\w./\\-]){word}(?![\w/\\-]|\.\w)", f"--model.{name}", message, count=1)
    return message


class HeldOutput:
    """Keeps Lightning's log lines and warnings back until :meth:`release`, so that when a check of the user's
    input fails, its error is the only line printed."""

    def __init__(self) -> None:
        self.released = False
        self._records: dict[int, logging.LogRecord] = {}  # by id: a record passes through several handlers
        loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "")]
        self._handlers = {handler for logger in loggers for handler in logger.handlers}
        for handler in self._handlers:
            handler.addFilter(self._hold)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()

    def _hold(self, record: logging.LogRecord) -> bool:
        self._records[id(record)] = record
        return False

    def release(self, *lines: Optional[str], show: bool = True) -> None:
        """Print ``lines``, then what was held, in order (``show``: else drop it)."""
        if self.released:
            return
        self.released = True
        for handler in self._handlers:
            handler.removeFilter(self._hold)
        self._warnings.__exit__(None, None, None)
        if show and any(lines):
            print(*filter(None, lines), sep="\n", flush=True)
        for record in self._records.values() if show else ():
            logging.getLogger(record.name).handle(record)
        for w in self._caught if show else ():
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
