"""Checkpoint files: written atomically during `fit`, read back without Lightning (model + vocabulary alone)."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lit_gpt_char.data import CharTokenizer
from lit_gpt_char.errors import LitGPTCharError, shown
from lit_gpt_char.model import GPT, GPTConfig
from lit_gpt_char.runs import CHECKPOINTS


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, syncs it, then renames it into place.

    A crash or kill at any moment leaves either the previous file or the new one, never a partial
    file (Lightning's own writer moves a file from the system temp dir, a copy across filesystems).
    The file gets the permissions of any file the user creates (the umask), not mkstemp's private 0600.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
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
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _not_saved(path: Path, step: Optional[int], cause: OSError) -> str:
    """What a failed save cost (the steps since the newest checkpoint, which is intact) and what to do."""
    message = f"could not save {shown(path)} at step {step}: {cause.strerror or cause}. "
    saved = [p for p in path.parent.glob("*.ckpt") if not p.name.startswith(".")]
    if not saved:
        return message + "Nothing was saved before: free space (or fix the folder), then run again"
    newest = max(saved, key=lambda p: p.stat().st_mtime)
    since = shown(newest)
    with contextlib.suppress(Exception):  # its step, if it reads
        since += f" (step {torch.load(newest, map_location='cpu', weights_only=True, mmap=True)['global_step']})"
    return message + (
        f"The checkpoints saved before are intact; the steps since {since} are lost: free space, then resume by "
        f"running the same command with --ckpt_path {shown(newest)}"
    )


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a lit_gpt_char checkpoint, checked: a clear error for anything else.

    Loads with ``weights_only=True``: a checkpoint holds tensors and plain values only, so reading
    one runs no code from the file.
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
    unreadable = LitGPTCharError(
        f"cannot read checkpoint {path}: it is not a PyTorch checkpoint, or it is truncated or damaged; pass "
        f"--ckpt_path {forms}"
    )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one loses its directory
        raise unreadable
    try:
        # mmap: the CLI reads a checkpoint here only to check it, before Lightning loads it for real
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        raise unreadable from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not {"vocab", "config"} <= set(hparams) or "state_dict" not in ckpt:
        raise LitGPTCharError(
            f"{path} is a PyTorch file but not a lit_gpt_char checkpoint (no vocabulary, model config or weights)"
        )
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT (in eval mode) and tokenizer stored in a lit_gpt_char checkpoint."""
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    model = GPT(GPTConfig(**hparams["config"]))
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise LitGPTCharError(f"the weights in {path} do not fit its model config: {first_line}") from None
    return model.to(device).eval(), CharTokenizer(hparams["vocab"])
