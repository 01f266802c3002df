"""Checkpoint files: which ones a run writes and when (Checkpoint), written atomically (AtomicCheckpointIO), and read
back without Lightning (read_checkpoint, load_checkpoint: model + vocabulary alone)."""

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError, shown
from lit_gpt_char.internals import evaluation_follows, every_n_train_steps, mark_saved, save_last, saved_step
from lit_gpt_char.model import GPT, GPTConfig
from lit_gpt_char.runs import CHECKPOINTS


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``{step}`` in filenames the optimizer step being saved (LitGPT logs a "step"
    value, TensorBoard's x-axis, only at log points: ModelCheckpoint would take that stale value), a save due at an
    evaluation step made after that evaluation, and two rules Lightning does not keep:

    - with ``save_last``, last.ckpt is the newest state: also written after an evaluation and at the end of fit when
      this callback saved nothing else there (Lightning writes it only beside one of its own saves);
    - with a ``monitor``, resuming an older checkpoint of the run keeps the scores of the files on disk, not those of
      the step resumed from, so a worse model never replaces a better one.
    """

    _after_evaluation: Optional[tuple] = None  # a step's save waiting for the evaluation at that step
    evaluated_step: Optional[int] = None  # of fit's latest evaluation: its val/loss is in trainer.callback_metrics

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._trainer = trainer  # for format_checkpoint_name: this callback saves only from here on
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
            paths = set(self.best_k_models)
            if self.filename and "{" not in self.filename:  # a fixed name (best.ckpt) is this run's, wherever resumed
                paths.add(os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION))
            for path in filter(os.path.isfile, paths):
                saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                scores[path] = saved.get("callbacks", {}).get(self.state_key, {}).get("current_score")
        self.best_k_models = scores = trainer.strategy.broadcast({p: s for p, s in scores.items() if s is not None})
        ranked = sorted(scores, key=scores.get, reverse=self.mode == "max") or [""]  # best first
        self.best_model_path, self.best_model_score = ranked[0], scores.get(ranked[0])
        self.kth_best_model_path, self.kth_value = ranked[-1], scores.get(ranked[-1], self.kth_value)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        n = every_n_train_steps(self)
        if n and trainer.global_step % n == 0 and evaluation_follows(trainer):
            # save after the evaluation at this step: Lightning resumes from a file written before the evaluation by
            # skipping it, so a run killed during that evaluation would never have it
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

    def format_checkpoint_name(self, metrics: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> str:
        if hasattr(self, "_trainer"):
            metrics = {**metrics, "step": torch.tensor(self._trainer.global_step)}
        return super().format_checkpoint_name(metrics, *args, **kwargs)


def last_checkpoint(trainer: Trainer) -> str:
    """The path of the newest last.ckpt this run wrote, or ""."""
    return next((cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path), "")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, syncs it, then renames it into place.

    A crash or kill at any moment leaves either the previous file or the new one, never a partial file (Lightning's
    own writer moves a file from the system temp dir, a copy across filesystems). The file gets the permissions of
    any file the user creates (open() applies the umask; mkstemp would make it private, 0600).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer per process: rank 0's checkpoint saves
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write (a full disk) as a RuntimeError
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError):
                raise
            raise LitGPTCharError(_not_saved(path, checkpoint.get("global_step"), cause)) from None
        finally:
            tmp.unlink(missing_ok=True)


def step_of(path: str | Path) -> int:
    """The optimizer step a checkpoint file was written at (memory-mapped: its weights are not read)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def _not_saved(path: Path, step: Optional[int], cause: OSError) -> str:
    """What a failed save cost (the steps since the newest checkpoint, which is intact) and what to do."""
    message = f"could not save {shown(path)} at step {step}: {cause.strerror or cause}. "
    saved = list(path.parent.glob("*.ckpt"))  # not the temporary files (.NAME.ckpt.PID.tmp)
    if not saved:
        return message + "Nothing was saved before: free space (or fix the folder), then run again"
    newest = max(saved, key=lambda p: p.stat().st_mtime)
    since = shown(newest)
    with contextlib.suppress(Exception):  # its step, if it reads
        since += f" (step {step_of(newest)})"
    return message + (
        f"The checkpoints saved before are intact; the steps since {since} are lost: free space, then resume by "
        f"running the same command with --ckpt_path {shown(newest)}"
    )


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a lit_gpt_char checkpoint, checked: a clear error for anything else.

    Loads with ``weights_only=True``: a checkpoint holds tensors and plain values only, so reading one runs no code
    from the file; and memory-mapped, since the CLI reads it here only to check it before Lightning loads it.
    """
    path = Path(path)
    forms = "last or best (the newest run's), or a file such as checkpoints/RUN/last.ckpt"
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        runs = sorted({p.parent.name for p in CHECKPOINTS.glob("*/*.ckpt")})
        listed = f" (runs in {CHECKPOINTS}/: {', '.join(runs[:10])}{', ...' if len(runs) > 10 else ''})" if runs else ""
        raise LitGPTCharError(f"checkpoint {path} {what}; pass --ckpt_path {forms}{listed}")
    if path.suffix in (".yaml", ".yml"):
        raise LitGPTCharError(f"{path} is a config: pass it with --config; --ckpt_path takes a checkpoint: {forms}")
    try:  # anything but an intact zip archive (what torch.save writes) fails to memory-map: a RuntimeError
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        raise LitGPTCharError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is truncated or damaged; pass "
            f"--ckpt_path {forms}"
        ) from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not {"vocab", "config"} <= set(hparams) or "state_dict" not in ckpt:
        raise LitGPTCharError(f"{path} is not a lit_gpt_char checkpoint (no vocabulary, model config or weights)")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT (in eval mode) and tokenizer stored in a lit_gpt_char checkpoint."""
    ckpt = read_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["hyper_parameters"]["config"]))
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise LitGPTCharError(
            f"the weights in {path} do not fit its model config: {str(err).splitlines()[0]}"
        ) from None
    return model.to(device).eval(), CharTokenizer(ckpt["hyper_parameters"]["vocab"])
