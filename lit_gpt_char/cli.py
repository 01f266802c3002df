"""The command line: ``lightning``, ``lit-gpt-char`` and ``python -m lit_gpt_char`` are all :func:`main`.

    fit | validate | test   LightningCLI over LitGPT + ShakespeareDataModule (every option: --help)
    sample                  text from a checkpoint alone (lit_gpt_char.sample)

A mistake the user can fix (:class:`LitGPTCharError`, or Lightning's own misconfiguration
errors) is printed as one line, ``error: ...``, with exit status 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char.callbacks import Checkpoint, InterruptCheckpoint, SampleTextCallback
from lit_gpt_char.checkpoint import read_checkpoint
from lit_gpt_char.data import ShakespeareDataModule
from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.module import LitGPT
from lit_gpt_char.monitor import LossChart, Throughput

DESCRIPTION = (
    "Train and evaluate a character-level GPT (Karpathy's 'Let's build GPT') with PyTorch Lightning.\n"
    "Subcommands: fit, validate, test (below) and sample (text from a checkpoint: "
    "`lit-gpt-char sample --help`)."
)


class CLIParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors as one line instead of a page of usage."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse is probing alternatives: let it raise
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {_one_line(message)} (options: {prog} --help)\n")
        sys.exit(2)


def _one_line(message: str) -> str:
    """A jsonargparse message on one line; a value outside a set of literals becomes "X is not one of: ..."."""
    key = re.search(r'Parser key "([^"]+)"', message)
    given = re.search(r"Given value: (.*)", message)
    literals = re.findall(r"typing\.Literal\[([^\]]*)\]", message)
    if key and given and literals:
        allowed = ", ".join(dict.fromkeys(item for group in literals for item in group.split(", ")))
        return f"--{key.group(1)} {given.group(1).strip()!r} is not one of: {allowed}"
    return " ".join(message.split())


class LitGPTCLI(LightningCLI):
    """LightningCLI with the data → model links, the sampling and checkpoint callbacks, and checkpoint checks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the data decides the vocabulary and the context length; the model follows
        parser.link_arguments("data.block_size", "model.config.block_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(SampleTextCallback, "sampling")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(Checkpoint, "periodic_checkpoint")
        # always on, also when a config gives its own trainer.callbacks list (which replaces the defaults)
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt_checkpoint")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(LossChart, "loss_chart")
        parser.set_defaults(
            {
                # best.ckpt (lowest val/loss) and last.ckpt, written at every evaluation
                "checkpoint.dirpath": "checkpoints",
                "checkpoint.filename": "best",
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,
                # step-N.ckpt every 1000 steps, all kept, and last.ckpt refreshed with each
                "periodic_checkpoint.dirpath": "checkpoints",
                "periodic_checkpoint.filename": "step-{step}",
                "periodic_checkpoint.auto_insert_metric_name": False,
                "periodic_checkpoint.every_n_train_steps": 1000,
                "periodic_checkpoint.save_top_k": -1,
                "periodic_checkpoint.save_last": True,
                "periodic_checkpoint.enable_version_counter": False,
            }
        )

    def _checkpoint_file(self) -> Optional[Path]:
        """The checkpoint file the subcommand will load, if any ("last" resolved in checkpoint.dirpath)."""
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            last = Path(config.checkpoint.dirpath or ".") / "last.ckpt"
            return last if last.is_file() else None
        if ckpt_path in (None, "best", "hpc", "registry"):
            return None
        return Path(ckpt_path)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the model's hyperparameters from the checkpoint here: check the file first,
        # so that a missing, truncated or foreign file is one clear error, not a traceback
        path = self._checkpoint_file() if self.config.get("subcommand") else None
        self._resumed = read_checkpoint(path)["hyper_parameters"] if path is not None else None
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        # the progress bar redraws every 10 steps: redrawing every step costs 5% of a small CPU step.
        # Lightning's TQDMProgressBar reads this variable; set it to 1 for every step
        os.environ.setdefault("TQDM_MINITERS", "10")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # checks that need the built objects, made before the Trainer writes anything
        cores = os.cpu_count() or 1
        if isinstance(self.trainer.accelerator, CPUAccelerator) and self.trainer.num_devices > cores:
            raise LitGPTCharError(
                f"--trainer.devices {self.trainer.num_devices} asks for that many CPU processes, but this machine "
                f"has {cores} cores; use --trainer.devices {cores} or fewer"
            )
        for callback in self.trainer.callbacks:
            if isinstance(callback, SampleTextCallback):
                callback.check_prompt(self.model.tokenizer)
        if self._resumed is None:
            return
        data, ckpt_vocab = self.datamodule, self._resumed["vocab"]
        if ckpt_vocab != data.vocab:
            ours, theirs = set(data.vocab), set(ckpt_vocab)
            diff = ", ".join(
                f"{label}: {''.join(sorted(chars))!r}"
                for label, chars in (("only in the corpus", ours - theirs), ("only in the checkpoint", theirs - ours))
                if chars
            )
            raise LitGPTCharError(
                f"the checkpoint's vocabulary ({len(ckpt_vocab)} characters) differs from that of corpus {data.path} "
                f"({len(data.vocab)} characters; {diff or 'same characters, other order'}). Use the corpus the "
                f"checkpoint was trained on (--data.path), or start a new run without --ckpt_path"
            )
        ckpt_block = self._resumed["config"]["block_size"]
        if ckpt_block != data.block_size:
            raise LitGPTCharError(
                f"the checkpoint was trained with block_size {ckpt_block}, the data is set to {data.block_size}; "
                f"pass --data.block_size {ckpt_block}"
            )


class QuietProfiler(PassThroughProfiler):
    """Lightning's default no-op profiler without its cost: Lightning wraps ~50 hook calls a step in
    ``profiler.profile(...)``, a generator-based context manager (2 µs each) even when profiling is off.
    Any --trainer.profiler replaces it."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return _NULL_CONTEXT


_NULL_CONTEXT = contextlib.nullcontext()

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
    },
    "check_val_every_n_epoch": None,  # count val_check_interval in steps across epochs
    "val_check_interval": 100,
    "log_every_n_steps": 50,
    "plugins": {"class_path": "lit_gpt_char.checkpoint.AtomicCheckpointIO"},  # no half-written checkpoint files
    "profiler": {"class_path": "lit_gpt_char.cli.QuietProfiler"},
}


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lit_gpt_char" if name == "__main__.py" else name


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> LitGPTCLI:
    """Parse ``args`` (default: sys.argv[1:]) and, with ``run``, run the subcommand (fit/validate/test);
    without, ``args`` has no subcommand and the CLI only builds the model, data and Trainer."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    # noise on every run: a torch deprecation inside Lightning, and the reuse of checkpoints/ by design
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return LitGPTCLI(
        LitGPT,
        ShakespeareDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1337,
        parser_kwargs={"description": DESCRIPTION, "prog": _prog()},
        parser_class=CLIParser,
        auto_configure_optimizers=False,
        load_from_checkpoint_support=False,
        args=args,
        run=run,
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of every console script."""
    try:
        args = sys.argv[1:] if argv is None else argv
        if args[:1] == ["sample"]:
            from lit_gpt_char.sample import sample_cli

            sample_cli(args[1:])
        else:
            build_cli(argv)
    except (LitGPTCharError, MisconfigurationException) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:  # InterruptCheckpoint has saved and said how to resume
        sys.exit(128 + signal.SIGTERM)
