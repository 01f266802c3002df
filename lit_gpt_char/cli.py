"""The command line: ``lightning``, ``lit-gpt-char`` and ``python -m lit_gpt_char`` are all :func:`main`.

    fit | validate | test   LightningCLI over LitGPT + ShakespeareDataModule (every option: --help)
    sample                  text from a checkpoint alone (lit_gpt_char.sampling)

A mistake the user can fix (:class:`LitGPTCharError`, or Lightning's own misconfiguration
errors) is printed as one line, ``error: ...``, with exit status 2 and no traceback.
"""

import logging
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gpt_char import internals
from lit_gpt_char.checkpoints import Checkpoint, read_checkpoint, step_of
from lit_gpt_char.checks import HeldOutput, check_built, check_trainer, follow_checkpoint, name_options, sized_for_a_gpu
from lit_gpt_char.data import ShakespeareDataModule
from lit_gpt_char.distributed import is_child, job_store, publish
from lit_gpt_char.errors import LitGPTCharError, shown
from lit_gpt_char.module import LitGPT
from lit_gpt_char.monitor import LossChart, ProgressBar, Throughput
from lit_gpt_char.parser import CLIParser
from lit_gpt_char.precision import allow_clipping_with_fused_optimizers, auto_precision
from lit_gpt_char.runs import Run, start, this_run
from lit_gpt_char.sampling import SampleTextCallback, sample_cli
from lit_gpt_char.signals import InterruptCheckpoint

DESCRIPTION = (
    "Train and evaluate a character-level GPT (Karpathy's 'Let's build GPT') with PyTorch Lightning. "
    "Subcommands: fit (train), validate and test (evaluate a checkpoint), sample (text from a checkpoint: "
    "PROG sample --help). Each subcommand lists its options: PROG fit --help."
)
# Lightning's help is the first line of Trainer.fit's docstring, cut mid-sentence, and generic text about ckpt_path
# ("registry", "hpc"): say what these do here
SUBCOMMAND_HELP = {
    "fit": "Train: a new run, or resume one with --ckpt_path.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation windows.",
    "test": "The same as validate, as the test stage (the lecture has no test split).",
}
CKPT_PATH_HELP = (
    "The checkpoint fit resumes from, or validate and test evaluate: last or best (the newest run's, or that of "
    "--run_name; fit with no run yet starts one), or a file. fit continues run RUN from a file in checkpoints/RUN/."
)
PRECISION_HELP = "Lightning's, or auto: bf16-mixed on a GPU with native bf16, 16-mixed on older GPUs, else 32-true"
# the run decides the folder of both checkpoint callbacks (Lightning's ModelCheckpoint): no dirpath to disagree with it
CHECKPOINT_GROUPS = {  # their titles in fit --help (README.md's table says what each writes), and the defaults
    "checkpoint": ("best checkpoint", {"filename": "best", "monitor": "val/loss", "mode": "min", "save_last": False}),
    "periodic_checkpoint": (
        "periodic and last checkpoints",
        {"filename": "step-{step}", "every_n_train_steps": 1000, "save_top_k": -1, "save_last": True},
    ),
}


class LitGPTCLI(LightningCLI):
    """LightningCLI with the data → model links, the run, the sampling and checkpoint callbacks, and every check of
    the user's input (checks.py) made before Lightning prints or writes anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        self._held = HeldOutput()  # Lightning's lines wait until the input is checked: an error is the only line
        self._run: Optional[Run] = None  # fit's
        self._ckpt: Optional[dict] = None  # the checkpoint to load, read and checked
        self._step = 0  # the step of the checkpoint resumed or evaluated
        self._precision: Optional[str] = None  # what --trainer.precision auto resolved to
        self._notes: list[str] = []  # lines printed after the run's first line, once the input is checked
        self._end = lambda undo: None  # rank 0 of a fit: lets the run go (runs.start)
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self._end(not self._held.released)  # input rejected before the run began: remove its folders first
            if getattr(self, "subcommand", None) == "fit" and not is_child():  # the job's other ranks wait for it
                publish(str(err) if isinstance(err, LitGPTCharError) else f"global rank 0 failed: {err!r}", error=True)
            self._held.release(show=False)  # what Lightning printed for rejected input
            raise
        self._end(False)  # the run is over: let it go

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # ckpt_path is this CLI's own option (add_arguments_to_parser), with one help for every subcommand
        return {name: skip | {"ckpt_path"} for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        parser.usage = "%(prog)s [-h] [-c CONFIG] {fit,validate,test,sample} ..."  # main() runs sample itself
        for choice in internals.subcommand_choices(parser):
            choice.help = SUBCOMMAND_HELP[choice.dest]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=Optional[str], default=None, help=(
            "The run's name: its checkpoints go to checkpoints/NAME/ and its logs to lightning_logs/NAME/. "
            "Unset: the next free version_N. With --ckpt_path last or best: that run's file."
        ))  # fmt: skip
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help=CKPT_PATH_HELP)
        # the data decides the vocabulary and the context length; the model follows
        parser.link_arguments("data.block_size", "model.config.block_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.config.vocab_size", compute_fn=len, apply_on="instantiate")
        # always on, also when a config gives its own trainer.callbacks list (which replaces the defaults)
        for callback, key in ((SampleTextCallback, "sampling"), (InterruptCheckpoint, "interrupt_checkpoint"),
                              (Throughput, "throughput"), (LossChart, "loss_chart")):  # fmt: skip
            parser.add_lightning_class_args(callback, key)
        options = internals.parser_options(parser)
        options["trainer.precision"].help = PRECISION_HELP
        internals.also_accept(options["trainer.precision"], Literal["auto"])  # beside Lightning's values
        # its default, a newline, would print as an invisible "default: \n": write it out
        options["sampling.prompt"].help = "Text the samples continue (type: str, default: '\\n', a newline)"
        internals.keep_help_as_written(options["sampling.prompt"])
        for key, (title, defaults) in CHECKPOINT_GROUPS.items():
            parser.add_class_arguments(Checkpoint, key, fail_untyped=False, sub_configs=True, skip={"dirpath"})
            parser.callback_keys.append(key)
            parser.groups[key].title = title
            defaults = {**defaults, "enable_version_counter": False, "auto_insert_metric_name": False}  # not step=N
            parser.set_defaults({f"{key}.{k}": v for k, v in defaults.items()})

    def _parse_ckpt_path(self) -> None:
        """Off: Lightning's would load the checkpoint again and put its hyperparameters over the options given;
        before_instantiate_classes reads it once and checks the two against each other (checks.follow_checkpoint)."""

    def before_instantiate_classes(self) -> None:
        # the progress bar redraws every 10 steps: redrawing every step slows a small CPU step (RESULTS.md).
        # tqdm reads this variable; set it to 1 for every step
        os.environ.setdefault("TQDM_MINITERS", "10")
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision == "auto":
            self._precision, why = auto_precision(config.trainer.accelerator)
            self._notes.append(f"precision auto: {self._precision} ({why})")
        if self.subcommand is None:
            return
        check_trainer(config.trainer)
        run = this_run(self.subcommand, config.ckpt_path, config.run_name)
        if run.resume_from is not None:  # a missing, truncated or foreign file is one clear error
            self._ckpt = read_checkpoint(run.resume_from)
            self._step = int(self._ckpt["global_step"])
            follow_checkpoint(config, self._ckpt, run.resume_from, self._argv, evaluate=self.subcommand != "fit")
        config.ckpt_path = str(run.resume_from) if run.resume_from is not None else None
        if self.subcommand != "fit":  # an evaluation prints its table; it is no run of its own and writes nothing
            config.trainer.logger = False
            self.save_config_callback = None
            return
        logger = config.trainer.logger
        tensorboard = isinstance(logger, Namespace) and logger.class_path.endswith("TensorBoardLogger")
        log_root = Path(logger.init_args.save_dir) / logger.init_args.name if tensorboard else None
        if not is_child():
            run, self._end = start(run, log_root)
        self._run = run
        if tensorboard:
            logger.init_args.version = run.name
            if run.continues:  # one series per run: TensorBoard drops what was logged after the checkpoint
                logger.init_args.purge_step = self._step + 1
        # The run owns its log folder (claimed atomically), so writing the config never overwrites another run's.
        # Always overwrite: otherwise Lightning's SaveConfigCallback broadcasts from rank 0 whether the file exists,
        # a collective that a rank joining a just-claimed run (which it sees as continued) would skip: a hang.
        self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}
        if run.continues and run.resume_from:  # the first config.yaml stays; each resume records its command beside it
            self.save_config_kwargs["config_filename"] = f"config-resumed-at-step-{self._step}.yaml"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except LitGPTCharError as err:  # the model's own checks name its arguments: say which option to change
            raise LitGPTCharError(name_options(str(err))) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self._precision is not None:  # what "auto" resolved to; the saved config keeps "auto"
            kwargs["precision"] = self._precision
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        trainer = self.trainer
        trainer.strategy.precision_plugin = allow_clipping_with_fused_optimizers(trainer.strategy.precision_plugin)
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # Lightning's default bar, or one configured: the one that reads on resume
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar(bar.refresh_rate, bar.process_position)
        self._notes += check_built(trainer, self.model, self.datamodule, self._ckpt, self.subcommand == "fit")
        if self.subcommand is not None:
            trainer.ckpt_path = self.config[self.subcommand].ckpt_path  # the file this_run resolved --ckpt_path to
            # the checkpoints go to the run's folder; for an evaluation, to that of its checkpoint
            folder = self._run.checkpoint_dir if self._run else Path(trainer.ckpt_path).parent
            for callback in trainer.callbacks:
                if isinstance(callback, Checkpoint):
                    callback.dirpath = os.path.realpath(folder)
        if self.subcommand == "fit" and not is_child():
            self._notes.append(sized_for_a_gpu(trainer, self.model, self.datamodule.batch_size))
        self._held.release(*([] if is_child() else [self.subcommand and self._announce(), *self._notes]))

    def _announce(self) -> str:
        """The run's first line: its name and folders, and where it resumes from."""
        run, trainer = self._run, self.trainer
        if run is None:
            return f"{self.subcommand} {trainer.ckpt_path} (step {self._step}) on {self.datamodule.scored()}"
        line = f"run {run.name}"
        if run.resume_from is not None:
            how = "resumed from" if run.continues else "starting from the weights of"
            line += f", {how} {run.resume_from} at step {self._step}" + (" (the newest run)" if run.picked else "")
        logs = "no logs"
        if isinstance(trainer.logger, TensorBoardLogger):
            logs = f"logs in {shown(trainer.logger.log_dir)}{os.sep}"
        line += f": checkpoints in {shown(run.checkpoint_dir)}{os.sep}, {logs}"
        states = self._ckpt.get("rng_states") if run.continues and self._ckpt else None  # one per rank that wrote it
        trained_with = len(states) if isinstance(states, list) else 0  # older checkpoints: one dict, rank 0's
        if trained_with and trained_with != trainer.world_size:  # each rank's window stream: policy.py
            line += (
                f"\nnote: this run trained with {trained_with} process(es) and resumes with {trainer.world_size}: "
                f"its steps from here differ from an unbroken run's"
            )
        return line

    def before_fit(self) -> None:
        self._fit_start = time.monotonic()

    def after_fit(self) -> None:
        """The run's result in one line (rank 0). A run stopped by a signal or a divergence raises before this."""
        trainer, step = self.trainer, self.trainer.global_step
        if not trainer.is_global_zero:
            return
        steps = f"steps {self._step} to {step}" if self._step else f"{step} steps"
        line = f"run {self._run.name} done: {steps} in {timedelta(seconds=round(time.monotonic() - self._fit_start))}"
        best = next((c for c in trainer.callbacks if isinstance(c, Checkpoint) and c.monitor == "val/loss"), None)
        if best is not None and best.evaluated_step is not None:  # None: no evaluation since the run (re)started
            line += f"; val/loss {float(trainer.callback_metrics['val/loss']):.4f} at step {best.evaluated_step}"
        if best is not None and best.best_model_score is not None:  # None: this run has not evaluated yet
            at = step_of(best.best_model_path)
            line += f" (best {float(best.best_model_score):.4f} at step {at}); {shown(best.best_model_path)}"
        last = self._run.checkpoint_dir / "last.ckpt"
        print(line + (f", {shown(last)}" if last.is_file() else ""), flush=True)


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
}


def _quiet(record: logging.LogRecord) -> bool:
    """Drops Lightning's lines that say nothing to act on: tips, and on an interrupt the lines before the one of
    InterruptCheckpoint that says what was saved and how to resume."""
    return not str(record.msg).startswith(
        ("💡 Tip", "\nDetected KeyboardInterrupt", "[rank: ", "`weights_only` was not set")
    )


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m lit_gpt_char" if name == "__main__.py" else name


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> LitGPTCLI:
    """Parse ``args`` (default: sys.argv[1:]) and, with ``run``, run the subcommand (fit/validate/test);
    without, ``args`` has no subcommand and the CLI only builds the model, data and Trainer."""
    for name in (
        "utilities.rank_zero",
        "trainer.connectors.signal_connector",
        "trainer.connectors.checkpoint_connector",
    ):
        logging.getLogger(f"lightning.pytorch.{name}").addFilter(_quiet)
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
            raise LitGPTCharError(f"give a subcommand: fit, validate, test or sample (see {_prog()} --help)")
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
