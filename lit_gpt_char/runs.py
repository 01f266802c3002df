"""Runs: each `fit` has one identity naming its checkpoint folder and its TensorBoard log folder.

    checkpoints/version_3/{best,last,step-N}.ckpt   beside   lightning_logs/version_3/events…

A new run claims its checkpoint folder with one atomic ``mkdir`` (two runs started together get
different names), so it never writes into another run's folders. Resuming a run's checkpoint continues
that run: the same folders, and TensorBoard is told to drop what was logged after the checkpoint. While a
run trains, its process holds a lock in its checkpoint folder, so no second process continues it at once.
The other processes of a multi-process job join the run global rank 0 claims: Lightning's own DDP processes
learn its name from ``RUN_ENV``, those of torchrun or srun from rank 0's store (distributed.py).
"""

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock, Timeout

from lit_gpt_char.distributed import is_child, publish, published_run_name, slurm_run_name
from lit_gpt_char.errors import LitGPTCharError

CHECKPOINTS = Path("checkpoints")  # the home of every run's checkpoint folder, relative to the working directory
# rank 0 hands the run's name to the processes Lightning starts for DDP, which re-run the same command
RUN_ENV = "LIT_GPT_CHAR_RUN"


@dataclass(frozen=True)
class Run:
    """A run's identity and where it writes.

    Args:
        name: The run's name: ``version_N`` or the user's ``--run_name``.
        checkpoint_dir: Where its checkpoints go (``checkpoints/<name>``).
        resume_from: The checkpoint file training continues from, if any.
        continues: Whether this run is the one ``resume_from`` belongs to (same folders), rather than a new
            run started from another's weights.
        picked: Whether ``--ckpt_path last`` chose the run (the message says so).
    """

    name: str
    checkpoint_dir: Path
    resume_from: Optional[Path] = None
    continues: bool = False
    picked: bool = False


def plan_run(ckpt_path: Optional[str], run_name: Optional[str]) -> Run:
    """Which run ``--ckpt_path`` and ``--run_name`` ask for, before anything is written.

    "last" / "best" name that file of run ``run_name``, or of the newest run when no name is given; "last"
    with no such run starts a new one (so one command both starts and resumes a job). A checkpoint file
    inside ``checkpoints/<name>/`` continues run <name> unless another ``run_name`` is given; then, as for any
    other file, a new run starts from its weights.
    """
    if run_name is not None and (
        run_name in ("", ".", "..") or {"/", os.sep} & set(run_name) or run_name != run_name.strip()
    ):
        raise LitGPTCharError(f"--run_name {run_name!r} must be a plain folder name (e.g. --run_name baseline)")
    new = Run(run_name or "", CHECKPOINTS / (run_name or ""))  # a new run; unnamed ones are numbered when claimed
    if ckpt_path in ("last", "best"):
        # the run named, or the newest: the one whose last.ckpt was written most recently
        lasts = (p for p in CHECKPOINTS.glob("*/last.ckpt") if p.is_file())
        newest = max(lasts, key=lambda p: p.stat().st_mtime, default=None)
        folder = CHECKPOINTS / run_name if run_name else newest.parent if newest else None
        if folder and (folder / f"{ckpt_path}.ckpt").is_file():
            return Run(folder.name, folder, folder / f"{ckpt_path}.ckpt", continues=True, picked=run_name is None)
        if ckpt_path == "best":
            where = f"run {run_name}" if run_name else f"the newest run in {CHECKPOINTS}/"
            raise LitGPTCharError(f"--ckpt_path best: {where} has no best.ckpt; pass a checkpoint file instead")
        if folder and folder.is_dir():  # the named run stopped before its first checkpoint
            return Run(folder.name, folder, None, continues=True)
        return new
    if ckpt_path is None:
        return new
    folder = Path(ckpt_path).resolve().parent
    if folder.parent == CHECKPOINTS.resolve() and run_name in (None, folder.name):
        return Run(folder.name, CHECKPOINTS / folder.name, Path(ckpt_path), continues=True)
    return Run(new.name, new.checkpoint_dir, Path(ckpt_path))


def this_run(subcommand: str, ckpt_path: Optional[str], run_name: Optional[str]) -> Run:
    """The run ``subcommand`` works on in this process: :func:`plan_run`'s, or for a process other than rank 0 of a
    job, the run rank 0 chose (waits until it has). Inside a SLURM job an unnamed run is the job's own, which a
    requeued job continues with --ckpt_path last."""
    if is_child():
        run_name = os.environ.get(RUN_ENV) or (published_run_name() if subcommand == "fit" else None) or run_name
    elif subcommand == "fit":
        run_name = run_name or slurm_run_name()
    run = plan_run(ckpt_path, run_name)
    if subcommand == "fit" and not run.name and is_child():
        raise LitGPTCharError(
            "this process was started by an outside launcher that does not say which run rank 0 chose: "
            "give the job a --run_name"
        )
    if subcommand != "fit" and run.resume_from is None:
        raise LitGPTCharError(
            f"{subcommand} evaluates a checkpoint: pass --ckpt_path last or best (the newest run's, or --run_name's), "
            f"or a checkpoint file" + (f"; --ckpt_path {ckpt_path} finds none" if ckpt_path else "")
        )
    return run


def start(run: Run, log_root: Optional[Path]) -> tuple[Run, Callable[[bool], None]]:
    """Rank 0 of a fit: claim ``run``, hold it while this process trains it, and hand its name to the job's other
    processes. Returns the run and the function that ends this; with ``undo`` (the command's input was rejected
    before the run began) it also removes the folders it created.

    A new run creates its checkpoint folder with one atomic ``mkdir``: the run that creates it owns it. A new named
    run fails if the name is taken; a new numbered run takes the next free ``version_N`` (counting log folders too,
    so no old log folder is reused), trying the next number if another run claimed that one first. The lock is the
    operating system's (flock): it dies with the process, also with a ``kill -9``.
    """
    root_created = not CHECKPOINTS.is_dir()
    if run.name and not run.continues:
        if log_root is not None and (log_root / run.name).exists() and not run.checkpoint_dir.exists():
            raise LitGPTCharError(
                f"run {run.name} has logs ({log_root / run.name}) but no checkpoints ({run.checkpoint_dir}): "
                f"there is nothing to resume; choose another --run_name, or delete its logs to start it over"
            )
        try:
            run.checkpoint_dir.mkdir(parents=True)
        except FileExistsError:
            raise LitGPTCharError(
                f"run {run.name} exists already ({run.checkpoint_dir}); resume it with --ckpt_path last "
                f"--run_name {run.name}, or choose another --run_name"
            ) from None
    elif not run.continues:
        taken = [
            p.name for root in (CHECKPOINTS, log_root) if root is not None and root.is_dir() for p in root.iterdir()
        ]
        version = 1 + max((int(m[1]) for name in taken if (m := re.fullmatch(r"version_(\d+)", name))), default=-1)
        while True:
            run = Run(f"version_{version}", CHECKPOINTS / f"version_{version}", run.resume_from)
            with contextlib.suppress(FileExistsError):
                if log_root is None or not (log_root / run.name).exists():
                    run.checkpoint_dir.mkdir(parents=True)
                    break
            version += 1
    created = [] if run.continues else [run.checkpoint_dir, CHECKPOINTS] if root_created else [run.checkpoint_dir]
    lock = FileLock(run.checkpoint_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LitGPTCharError(
            f"run {run.name} is in use: another process is training it ({run.checkpoint_dir / '.lock'} is locked); "
            f"wait until it ends, or choose another --run_name"
        ) from None
    publish(run.name)  # under torchrun or srun the other ranks wait for it
    os.environ[RUN_ENV] = run.name  # Lightning's DDP processes re-run this command

    def end(undo: bool) -> None:
        # while still held, so no other process locks the file that goes
        (run.checkpoint_dir / ".lock").unlink(missing_ok=True)
        lock.release()
        os.environ.pop(RUN_ENV, None)
        for folder in created if undo else ():
            with contextlib.suppress(OSError):  # only if still empty
                folder.rmdir()

    return run, end
