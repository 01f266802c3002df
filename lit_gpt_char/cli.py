"""The command line: ``lightning``, ``lit-gpt-char`` and ``python -m lit_gpt_char`` are all :func:`main`.

    fit | validate | test   LightningCLI over LitGPT + ShakespeareDataModule (every option: --help)
    sample                  text from a checkpoint alone (lit_gpt_char.sampling)

A mistake the user can fix (:class:`LitGPTCharError`, or Lightning's own misconfiguration
errors) is printed as one line, ``error: ...``, with exit status 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import time
import warnings
from argparse import Action
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char.checkpoints import Checkpoint, read_checkpoint
from lit_gpt_char.data import ShakespeareDataModule
from lit_gpt_char.distributed import job_store, publish_error, publish_run_name, published_run_name, slurm_run_name
from lit_gpt_char.errors import LitGPTCharError, shown
from lit_gpt_char.internals import (
    keep_help_as_written,
    parser_actions,
    subcommand_choices,
    subcommand_parsers,
    type_of,
    widen_type,
)
from lit_gpt_char.model import GPTConfig
from lit_gpt_char.module import LitGPT, scaled_and_clipped
from lit_gpt_char.monitor import LossChart, ProgressBar, Throughput
from lit_gpt_char.parser import CLIParser
from lit_gpt_char.precision import allow_clipping_with_fused_optimizers, auto_precision, native_bf16
from lit_gpt_char.runs import CHECKPOINTS, RUN_ENV, Run, claim, hold, plan_run
from lit_gpt_char.sampling import SampleTextCallback, sample_cli
from lit_gpt_char.signals import InterruptCheckpoint

DESCRIPTION = (
    "Train and evaluate a character-level GPT (Karpathy's 'Let's build GPT') with PyTorch Lightning. "
    "Subcommands: fit (train), validate and test (evaluate a checkpoint), sample (text from a checkpoint: "
    "PROG sample --help). Each subcommand lists its options: PROG fit --help."
)
SUBCOMMAND_HELP = {
    "fit": "Train: a new run, or resume one with --ckpt_path.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation windows.",
    "test": "The same as validate, as the test stage (the lecture has no test split).",
}
CKPT_PATH_HELP = {
    "fit": "Resume from this checkpoint: last (the newest run's last.ckpt, or with --run_name that run's; with no "
    "run yet, start one), best, or a file. A file in checkpoints/RUN/ continues run RUN.",
    "validate": "The checkpoint to evaluate: last or best (of the newest run, or of --run_name), or a file.",
}


class LitGPTCLI(LightningCLI):
    """LightningCLI with the data → model links, runs, the sampling and checkpoint callbacks, and every check of
    the user's input made before Lightning prints or writes anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held = HeldOutput()  # Lightning's lines wait until the input is checked: an error is the only line
        self._run: Optional[Run] = None
        self._ckpt: Optional[dict] = None  # the checkpoint to load, read and checked
        self._claimed: list[Path] = []  # folders this command created, removed again if the input is rejected
        self._precision: Optional[str] = None  # what --trainer.precision auto resolved to
        self._notes: list[str] = []  # lines printed after the run's first line, once the input is checked
        self._release = lambda: None  # lets go of the run's lock (rank 0 of a fit holds it)
        self._names_the_run = False  # rank 0 of a fit: the job's other ranks wait for its run's name, or its error
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self._release()
            if self._names_the_run:
                publish_error(str(err) if isinstance(err, LitGPTCharError) else f"global rank 0 failed: {err!r}")
            if not self._held.released:  # failed on the user's input: nothing was written, nothing printed
                self._held.discard()
                for folder in self._claimed:
                    with contextlib.suppress(OSError):  # only if still empty
                        folder.rmdir()
            raise
        else:
            self._release()
        finally:
            if not self._is_child():
                os.environ.pop(RUN_ENV, None)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate", "test")}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        parser.usage = "%(prog)s [-h] [-c CONFIG] {fit,validate,test,sample} ..."  # main() runs sample itself
        # Lightning's help is the first line of Trainer.fit's docstring, cut mid-sentence, and generic text
        # about ckpt_path ("registry", "hpc"): say what these do here
        for choice in subcommand_choices(parser):
            choice.help = SUBCOMMAND_HELP[choice.dest]
        for name, subparser in subcommand_parsers(self).items():
            subparser.description = SUBCOMMAND_HELP[name]
            _set_help(subparser, "ckpt_path", CKPT_PATH_HELP.get(name, CKPT_PATH_HELP["validate"]))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=Optional[str],
            default=None,
            help=(
                "The run's name: its checkpoints go to checkpoints/NAME/ and its logs to lightning_logs/NAME/. "
                "Unset: the next free version_N. With --ckpt_path last or best: that run's file."
            ),
        )
        # the data decides the vocabulary and the context length; the model follows
        parser.link_arguments("data.block_size", "model.config.block_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        # "auto" beside Lightning's values: the precision the device computes natively (see _auto_precision).
        # jsonargparse has no public way to widen a class argument's type: its ActionTypeHint keeps it here
        precision = _set_help(parser, "trainer.precision", PRECISION_HELP)
        widen_type(precision, Optional[Union[Literal["auto"], type_of(precision)]])
        parser.add_lightning_class_args(SampleTextCallback, "sampling")
        # its default, a newline, would print as an invisible "default: \n": write it out (the help as given)
        prompt = _set_help(
            parser, "sampling.prompt", "Text the samples continue (type: str, default: '\\n', a newline)"
        )
        keep_help_as_written(prompt)
        # the run decides the folder of both checkpoint callbacks: no dirpath option to disagree with it
        for key, help in CHECKPOINT_GROUPS.items():
            parser.add_class_arguments(Checkpoint, key, fail_untyped=False, sub_configs=True, skip={"dirpath"})
            parser.callback_keys.append(key)
            parser.groups[key].title, parser.groups[key].description = help
        # always on, also when a config gives its own trainer.callbacks list (which replaces the defaults)
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt_checkpoint")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(LossChart, "loss_chart")
        parser.set_defaults(
            {
                # best.ckpt (lowest val/loss), written at an evaluation that improves it
                "checkpoint.filename": "best",
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": False,
                "checkpoint.enable_version_counter": False,
                # step-N.ckpt every 1000 steps, all kept; last.ckpt with each, after every evaluation and at the end
                "periodic_checkpoint.filename": "step-{step}",
                "periodic_checkpoint.auto_insert_metric_name": False,
                "periodic_checkpoint.every_n_train_steps": 1000,
                "periodic_checkpoint.save_top_k": -1,
                "periodic_checkpoint.save_last": True,
                "periodic_checkpoint.enable_version_counter": False,
            }
        )

    @staticmethod
    def _is_child() -> bool:
        """A process other than rank 0 of a multi-process job: it joins the run rank 0 claims, and claims nothing.
        Lightning's own DDP processes re-run rank 0's command and learn the run's name from RUN_ENV."""
        return any(os.environ.get(var, "0") != "0" for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.ckpt_path in ("hpc", "registry"):
            raise LitGPTCharError(f"--ckpt_path {config.ckpt_path} is not supported here; pass last, best or a file")
        run_name = config.run_name
        if self._is_child():  # the run rank 0 chose: from Lightning's environment or the torchrun/srun store
            run_name = os.environ.get(RUN_ENV) or (published_run_name() if subcommand == "fit" else None) or run_name
        elif subcommand == "fit":
            self._names_the_run = True
            # inside a SLURM job an unnamed run is the job's own, which a requeued job continues with --ckpt_path last
            run_name = run_name or slurm_run_name()
        run = plan_run(config.ckpt_path, run_name)
        if subcommand == "fit" and not run.name and self._is_child():
            raise LitGPTCharError(
                "this process was started by an outside launcher that does not say which run rank 0 chose: "
                "give the job a --run_name"
            )
        if subcommand != "fit" and run.resume_from is None:
            which = f"run {run_name}" if run_name else "no run in checkpoints/"
            raise LitGPTCharError(
                f"{subcommand} evaluates a checkpoint: pass --ckpt_path last or best (the newest run's), or a "
                f"checkpoint file" + (f"; --ckpt_path {config.ckpt_path}: {which} has one" if config.ckpt_path else "")
            )
        if run.resume_from is not None:
            # check the file first, so that a missing, truncated or foreign file is one clear error
            self._ckpt = read_checkpoint(run.resume_from)
            self._apply_checkpoint(config, self._ckpt["hyper_parameters"], run.resume_from)
        config.ckpt_path = str(run.resume_from) if run.resume_from is not None else None
        self._run = run if subcommand == "fit" else None
        before = {key: config.model[key] for key in MAY_CHANGE_ON_RESUME}
        super()._parse_ckpt_path()  # LightningCLI puts the checkpoint's hyperparameters into the model's options
        config = self.config[subcommand]
        for key, value in before.items():
            config.model[key] = value

    def _apply_checkpoint(self, config: Namespace, hparams: dict, path: Path) -> None:
        """The checkpoint decides the model: an option given on the command line that differs from it is an error."""
        ckpt_values = {f"model.{key}": value for key, value in _flatten(hparams).items() if key != "vocab"}
        ckpt_values["data.block_size"] = ckpt_values.pop("model.config.block_size")
        del ckpt_values["model.config.vocab_size"]  # the corpus decides it; its vocabulary is checked on its own
        for key, theirs in ckpt_values.items():
            if key.rsplit(".", 1)[-1] in MAY_CHANGE_ON_RESUME or key not in config:
                continue
            ours = config[key]
            if _plain(ours) != _plain(theirs) and self._given(key):
                raise LitGPTCharError(
                    f"--{key} {_plain(ours)} conflicts with checkpoint {path}, trained with {_plain(theirs)}: when "
                    f"resuming, the checkpoint decides the model; pass --{key} {_plain(theirs)} or drop it, or start "
                    f"a new run without --ckpt_path"
                )
        config.data.block_size = ckpt_values["data.block_size"]

    def _given(self, key: str) -> bool:
        """Whether option ``key``, or a group holding it, is on the command line (a config file's does not count)."""
        given = (token[2:].split("=", 1)[0] for token in self._argv if token.startswith("--"))
        return any(key == g or key.startswith(g + ".") for g in given)

    def _score_as_trained(self, data: Namespace) -> None:
        """An evaluation scores the run's own validation set: its corpus and windows, saved in the checkpoint,
        unless given on the command line (not those of the --config given, e.g. small.yaml's 3,200 windows)."""
        saved = self._ckpt.get(ShakespeareDataModule.CHECKPOINT_HYPER_PARAMS_KEY, {}) if self._ckpt else {}
        for key, value in saved.items():
            if key not in ("cache_dir", "on_device") and key in data and not self._given(f"data.{key}"):
                data[key] = value  # cache_dir and on_device: where this machine keeps and reads the corpus

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except LitGPTCharError as err:  # the model's own checks name its arguments: say which option to change
            raise LitGPTCharError(_name_options(str(err))) from None

    def before_instantiate_classes(self) -> None:
        # the progress bar redraws every 10 steps: redrawing every step costs a small CPU step measurably.
        # Lightning's TQDMProgressBar reads this variable; set it to 1 for every step
        os.environ.setdefault("TQDM_MINITERS", "10")
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision == "auto":
            self._precision, why = _auto_precision(config.trainer.accelerator)
            self._notes.append(f"precision auto: {self._precision} ({why})")
        if self.subcommand is None:
            return
        self._check_trainer(config.trainer)
        logger = config.trainer.logger
        tensorboard = isinstance(logger, Namespace) and logger.class_path.endswith("TensorBoardLogger")
        if self.subcommand != "fit":
            self._score_as_trained(config.data)
            # an evaluation prints its table; it is no run of its own and writes no logs or config
            config.trainer.logger = False
            self.save_config_callback = None
            return
        log_root = Path(logger.init_args.save_dir) / logger.init_args.name if tensorboard else None
        if not self._is_child():
            created_root = not CHECKPOINTS.is_dir()
            self._run = claim(self._run, log_root)
            if not self._run.continues:
                self._claimed = [self._run.checkpoint_dir] + ([CHECKPOINTS] if created_root else [])
            self._release = hold(self._run)  # one process at a time trains a run
            publish_run_name(self._run.name)  # under torchrun or srun the other ranks wait for it
        run = self._run
        if tensorboard:
            logger.init_args.version = run.name
            if run.continues:
                # one series per run: TensorBoard drops what was logged after the checkpoint resumed from
                logger.init_args.purge_step = self._resume_step() + 1
        # The run owns its log folder (claimed atomically), so writing the config never overwrites another run's.
        # Always overwrite: otherwise Lightning's SaveConfigCallback broadcasts from rank 0 whether the file exists,
        # a collective that a rank joining a just-claimed run (which it sees as continued) would skip: a hang.
        self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}
        if run.continues and run.resume_from:  # the first config.yaml stays; each resume records its command beside it
            name = f"config-resumed-at-step-{self._resume_step()}.yaml"
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self._precision is not None:  # what "auto" resolved to; the saved config keeps "auto"
            kwargs["precision"] = self._precision
        return super().instantiate_trainer(**kwargs)

    def _resume_step(self) -> int:
        return int(self._ckpt["global_step"]) if self._ckpt is not None else 0

    @staticmethod
    def _check_trainer(trainer: Namespace) -> None:
        """Trainer options Lightning would reject with a message that does not say what to do."""
        # "gpu" is also Apple's MPS to Lightning
        if (
            trainer.accelerator in ("gpu", "cuda")
            and not torch.cuda.is_available()
            and not (trainer.accelerator == "gpu" and torch.backends.mps.is_available())
        ):
            raise LitGPTCharError(
                f"--trainer.accelerator {trainer.accelerator}: no CUDA GPU is visible here; use --trainer.accelerator "
                f"cpu (configs/small.yaml is sized for a CPU)"
            )
        devices = trainer.devices
        if isinstance(devices, int) and devices != -1 and devices < 1 or devices in ("0", ""):
            raise LitGPTCharError(f"--trainer.devices {devices}: use at least 1 (or -1 / auto for all of them)")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        strategy = self.trainer.strategy
        strategy.precision_plugin = allow_clipping_with_fused_optimizers(strategy.precision_plugin)
        bar = self.trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # Lightning's default bar, or one configured: the one that reads on resume
            self.trainer.callbacks[self.trainer.callbacks.index(bar)] = ProgressBar(
                bar.refresh_rate, bar.process_position
            )
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
        self._check_optimization()
        if self._ckpt is not None:
            _check_vocabulary(self._ckpt["hyper_parameters"]["vocab"], self.datamodule)
        if self.subcommand is not None:  # the run's folder; for an evaluation, that of its checkpoint
            config = self.config[self.subcommand]
            folder = self._run.checkpoint_dir if self._run is not None else Path(config.ckpt_path).parent
            for callback in self.trainer.callbacks:
                if isinstance(callback, Checkpoint):
                    callback.dirpath = os.path.realpath(folder)
        self._held.release(self._announce())
        if self._notes and not self._is_child():
            print(*self._notes, sep="\n", flush=True)
        if self.subcommand == "fit" and not self._is_child():
            self._warn_if_sized_for_a_gpu()
        if self._run is not None:
            os.environ[RUN_ENV] = self._run.name

    def before_fit(self) -> None:
        self._fit_start = time.monotonic()

    def after_fit(self) -> None:
        """The run's result in one line (rank 0). A run stopped by a signal or a divergence raises before this."""
        trainer = self.trainer
        if not trainer.is_global_zero or self._run is None:
            return
        start, step = self._resume_step(), trainer.global_step
        steps = f"steps {start} to {step}" if start else f"{step} steps"
        line = f"run {self._run.name} done: {steps} in {timedelta(seconds=round(time.monotonic() - self._fit_start))}"
        ckpt = next((c for c in trainer.callbacks if isinstance(c, Checkpoint) and c.monitor == "val/loss"), None)
        val = trainer.callback_metrics.get("val/loss")
        if ckpt is not None and ckpt.evaluated_step is not None and val is not None:
            line += f"; val/loss {float(val):.4f} at step {ckpt.evaluated_step}"
        if ckpt is not None and ckpt.best_model_score is not None:  # None: this run has not evaluated yet
            best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            line += f" (best {float(ckpt.best_model_score):.4f} at step {best}); {shown(ckpt.best_model_path)}"
        last = self._run.checkpoint_dir / "last.ckpt"
        print(line + (f", {shown(last)}" if last.is_file() else ""), flush=True)

    def _check_optimization(self) -> None:
        """Settings that LitGPT or Lightning would reject only once training has started."""
        hp, trainer = self.model.hparams, self.trainer
        scheduled = hp.lr_schedule != "constant" or hp.warmup_steps > 0
        if self.subcommand == "fit" and scheduled and not hp.decay_steps and not (trainer.max_steps or 0) > 0:
            raise LitGPTCharError(
                f"--model.lr_schedule {hp.lr_schedule} needs to know where it ends: set --trainer.max_steps or "
                f"--model.decay_steps"
            )
        if scaled_and_clipped(trainer) and hp.fused_adamw:
            raise LitGPTCharError(
                "--trainer.precision 16-mixed scales the loss, so a fused AdamW step cannot be clipped "
                "(--trainer.gradient_clip_val): use --trainer.precision bf16-mixed, or --model.fused_adamw false"
            )
        if hp.fused_adamw is None and scaled_and_clipped(trainer):
            self._notes.append(
                "note: 16-mixed scales the loss, and a fused AdamW step cannot be clipped: AdamW takes its plain step"
            )

    def _announce(self) -> Optional[str]:
        """The run's first line: its name and folders, and where it resumes from."""
        if self._is_child() or self.subcommand is None:
            return None
        config = self.config[self.subcommand]
        if self._run is None:
            return f"{self.subcommand} {config.ckpt_path} (step {self._resume_step()}) on {self.datamodule.scored()}"
        run = self._run
        logger = self.trainer.logger
        logs = f"logs in {shown(logger.log_dir)}{os.sep}" if isinstance(logger, TensorBoardLogger) else "no logs"
        resumed = ""
        if run.resume_from is not None:
            how = "resumed from" if run.continues else "starting from the weights of"
            resumed = f", {how} {run.resume_from} at step {self._resume_step()}"
            resumed += " (the newest run)" if run.picked else ""
        line = f"run {run.name}{resumed}: checkpoints in {shown(run.checkpoint_dir)}{os.sep}, {logs}"
        before = _trained_world_size(self._ckpt) if run.continues and self._ckpt is not None else None
        if before is not None and before != self.trainer.world_size:
            line += (
                f"\nnote: this run trained with {before} process(es) and resumes with {self.trainer.world_size}: each "
                f"rank's window stream continues from step {self._resume_step()} (ranks the checkpoint has no state "
                f"for start their own), so the steps from here differ from an unbroken run's"
            )
        return line

    def _warn_if_sized_for_a_gpu(self) -> None:
        """One line when a run on a CPU would take hours: the expected time per step, and the CPU config."""
        if not isinstance(self.trainer.accelerator, CPUAccelerator):
            return
        gpt = self.model.model
        windows = self.config["fit"].data.batch_size * self.trainer.accumulate_grad_batches
        # training FLOPs of one step: under ~1e11 a step is well under a second on any CPU
        if gpt.flops_per_token() * windows * gpt.config.block_size < 1e11:
            return
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            start = time.perf_counter()
            gpt(torch.zeros(2, gpt.config.block_size, dtype=torch.long))  # two windows, in the run's precision
            forward = time.perf_counter() - start
        seconds = 3 * forward * windows / 2  # the backward pass costs about twice the forward
        if seconds < 1:
            return
        steps = self.trainer.max_steps
        total = f" ({steps} steps: ~{steps * seconds / 3600:.1f} h)" if steps and steps > 0 else ""
        print(
            f"note: this run is sized for a GPU: on this CPU one step takes ~{seconds:.0f} s{total}; "
            f"configs/small.yaml is the CPU config",
            flush=True,
        )


CHECKPOINT_GROUPS = {  # title and description of each group in fit --help
    "checkpoint": (
        "best checkpoint",
        "best.ckpt (lowest val/loss), written at each evaluation that improves on it, in the run's folder "
        "checkpoints/RUN/ (Lightning's ModelCheckpoint).",
    ),
    "periodic_checkpoint": (
        "periodic and last checkpoints",
        "step-N.ckpt every every_n_train_steps optimizer steps, all kept (save_top_k -1; 0 turns "
        "them off), in the same folder; last.ckpt, the newest state, with each, after every evaluation and "
        "at the end of fit (Lightning's ModelCheckpoint).",
    ),
}
# settings of the checkpoint's model that a resumed run may change: how the step is computed, not what
MAY_CHANGE_ON_RESUME = ("compile", "fused_adamw")


PRECISION_HELP = (
    "Lightning's (32-true, bf16-mixed, 16-mixed: fp16 with loss scaling, ...; null: 32-true), or auto: bf16-mixed on "
    "a GPU that computes bf16 natively, 16-mixed on an older one (T4, V100), 32-true on a CPU or Apple MPS"
)


def _auto_precision(accelerator: Any) -> tuple[str, str]:
    """--trainer.precision auto on the device --trainer.accelerator picks: its facts, read here, decide."""
    gpu = accelerator in ("auto", "gpu", "cuda")
    if gpu and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return auto_precision("cuda", native_bf16(device), torch.cuda.get_device_capability(device))
    if accelerator in ("auto", "gpu", "mps") and torch.backends.mps.is_available():
        return auto_precision("mps", False)
    return auto_precision("cpu", False)


def _name_options(message: str) -> str:
    """``message`` with the first mention of each model argument written as its option (--model.config.n_head);
    a word inside a path (``runs/init/dropout.txt``) is no mention."""
    options = {
        f.name: f"--model.config.{f.name}" for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size")
    }
    options |= {
        name: f"--model.{name}" for name in inspect.signature(LitGPT).parameters if name not in ("vocab", "config")
    }
    for name, option in options.items():
        message = re.sub(rf"(?<![\w./\\-]){name}(?![\w/\\-]|\.\w)", option, message, count=1)
    return message


def _set_help(parser: LightningArgumentParser, dest: str, help: str) -> Action:
    action = next(action for action in parser_actions(parser) if action.dest == dest)
    action.help = help
    return action


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _trained_world_size(checkpoint: dict) -> Optional[int]:
    """How many processes wrote ``checkpoint``'s run (it holds one RNG state per rank), or None if it does not say
    (written before the states were kept per rank)."""
    states = checkpoint.get("rng_states")
    return len(states) if isinstance(states, list) else None


def _check_vocabulary(ckpt_vocab: str, data: ShakespeareDataModule) -> None:
    if ckpt_vocab == data.vocab:
        return
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


class HeldOutput:
    """Keeps Lightning's log lines and warnings back until :meth:`release`, so that when a check of the user's
    input fails, its error is the only line printed (:meth:`discard`)."""

    def __init__(self) -> None:
        self.released = False
        self._records: dict[int, logging.LogRecord] = {}
        self._handlers = {
            handler
            for name in ("lightning.pytorch", "lightning.fabric", "")
            for handler in logging.getLogger(name).handlers
        }
        for handler in self._handlers:
            handler.addFilter(self)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()

    def filter(self, record: logging.LogRecord) -> bool:
        self._records[id(record)] = record
        return False

    def _stop(self) -> None:
        for handler in self._handlers:
            handler.removeFilter(self)
        self._warnings.__exit__(None, None, None)
        self.released = True

    def release(self, first_line: Optional[str] = None) -> None:
        """Print ``first_line``, then what was held, in order."""
        self._stop()
        if first_line:
            print(first_line, flush=True)
        for record in self._records.values():
            logging.getLogger(record.name).handle(record)
        for w in self._caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)

    def discard(self) -> None:
        self._stop()


class QuietProfiler(PassThroughProfiler):
    """Lightning's default no-op profiler without its cost: Lightning wraps ~50 hook calls a step in
    ``profiler.profile(...)``, a generator-based context manager, even when profiling is off.
    Any --trainer.profiler replaces it."""

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return _NULL_CONTEXT


_NULL_CONTEXT = contextlib.nullcontext()

TRAINER_DEFAULTS = {  # with the DataModule's and SampleTextCallback's own defaults: configs/small.yaml
    "max_steps": 5000,  # Lightning's default trains 1000 nominal epochs: ~2 million steps
    "num_sanity_val_steps": 0,
    "devices": 1,
    "enable_model_summary": True,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
    },
    "check_val_every_n_epoch": None,  # count val_check_interval in steps across epochs
    "val_check_interval": 100,
    "log_every_n_steps": 50,
    "plugins": {"class_path": "lit_gpt_char.checkpoints.AtomicCheckpointIO"},  # no half-written checkpoint files
    "profiler": {"class_path": "lit_gpt_char.cli.QuietProfiler"},
}


class _Quiet(logging.Filter):
    """Lightning's lines that say nothing to act on: tips, and on an interrupt the three lines before the one of
    InterruptCheckpoint that says what was saved and how to resume."""

    LOGGERS = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.signal_connector",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    )
    MESSAGES = ("💡 Tip", "\nDetected KeyboardInterrupt", "[rank: ", "`weights_only` was not set")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)


_QUIET = _Quiet()


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lit_gpt_char" if name == "__main__.py" else name


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> LitGPTCLI:
    """Parse ``args`` (default: sys.argv[1:]) and, with ``run``, run the subcommand (fit/validate/test);
    without, ``args`` has no subcommand and the CLI only builds the model, data and Trainer."""
    for name in _Quiet.LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)
    # noise on every run: a torch deprecation inside Lightning, and the reuse of a run's folder on resume
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # under DDP: LitGPT's val/loss is synced by torchmetrics and "step" is the same on every rank
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('((val|test)/\w+|step)'")
    return LitGPTCLI(
        LitGPT,
        ShakespeareDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1337,
        parser_kwargs={"description": DESCRIPTION.replace("PROG", _prog()), "prog": _prog()},
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
        if not args:
            raise LitGPTCharError(
                f"give a subcommand: fit, validate, test or sample (what each does: {_prog()} --help)"
            )
        if args[:1] == ["sample"]:
            sample_cli(args[1:], _prog())
        else:
            job_store()  # under torchrun or srun: join the store rank 0 hosts (rank 0: host it) first thing
            build_cli(argv)
    except (LitGPTCharError, MisconfigurationException) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException as stop:  # InterruptCheckpoint has saved and said how to resume (Ctrl-C or SIGTERM)
        sys.exit(128 + getattr(stop, "signum", signal.SIGTERM))
