"""Shared fixtures: tiny corpora made in tmp_path, and the real CLI run in-process or as a subprocess."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gpt_char.cli import main
from lit_gpt_char.corpus import tiny_shakespeare_text
from lit_gpt_char.data import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "configs" / "small.yaml")

# the small config shrunk to seconds: the real CLI, Trainer, callbacks and logger, a tiny model
TINY = [
    "--config", SMALL,
    "--model.config.n_layer", "2", "--model.config.n_head", "2", "--model.config.n_embd", "32",
    "--data.block_size", "16", "--data.batch_size", "8", "--data.val_windows", "64", "--data.val_batch_size", "32",
    "--trainer.max_steps", "20", "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "5",
    "--sampling.every_n_steps", "10", "--sampling.max_new_tokens", "20", "--sampling.final_max_new_tokens", "40",
]  # fmt: skip

WORDS = (
    "the king queen lord lady sword crown night day love death blood heart hand eye sweet fair good "
    "noble gentle speak hear come go stand fall rise sleep dream honour grace"
).split()


def make_text(n_chars: int, seed: int = 0) -> str:
    """Play-like text: NAME: lines of random words (a deterministic stand-in for Shakespeare)."""
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < n_chars:
        line = rng.choice(["ROMEO:", "JULIET:", "KING HENRY:"]) if rng.random() < 0.2 else ""
        line = line or " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,;!?")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars] + "\n"


def tokenize(text: str) -> tuple[CharTokenizer, torch.Tensor]:
    """The lecture's tokenizer of ``text`` (its characters, sorted) and ``text`` encoded with it, in the dtype the
    token cache stores: what the cache of a corpus must hold. Vectorised (the texts are up to megabytes): the sorted
    unique code points, and each character's index among them."""
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
    chars, ids = torch.unique(points, sorted=True, return_inverse=True)
    dtype = torch.uint8 if len(chars) <= 256 else torch.uint16 if len(chars) <= 65536 else torch.int32
    return CharTokenizer("".join(map(chr, chars.tolist()))), ids.to(dtype)


@pytest.fixture(scope="session")
def real_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Shakespeare as a plain file, from the copy that ships with the package (no download)."""
    path = tmp_path_factory.mktemp("tinyshakespeare") / "input.txt"
    path.write_text(tiny_shakespeare_text(), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(30_000), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory, so checkpoints/, lightning_logs/ and data/ land in tmp_path."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run_main(args: list[str]) -> int:
    """Run the CLI in this process; the exit status (0 when main returns)."""
    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def run_subprocess(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m lit_gpt_char ARGS`` as a user would, with tests.probes importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lit_gpt_char", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs,
    )  # fmt: skip


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def outputs_under(path: Path) -> list[str]:
    """files_under, less the corpus cache (data/cache): a run that stops on an error after the corpus was
    tokenized keeps it, as a later run would use it; logs, checkpoints and partial downloads are outputs."""
    return [p for p in files_under(path) if p != "data" and not p.startswith(("data/cache", "data\\cache"))]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/version_0/last.ckpt of one 20-step tiny run, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("tiny_run")
    corpus = work / "corpus.txt"
    corpus.write_text(make_text(30_000), encoding="utf-8")
    previous = os.getcwd()
    os.chdir(work)
    try:
        assert run_main(["fit", *TINY, "--data.path", str(corpus)]) == 0
    finally:
        os.chdir(previous)
    return work / "checkpoints" / "version_0" / "last.ckpt"


def printed(output: str) -> list[str]:
    """The lines a command printed, less the corpus cache's (``tokenized …``, or waiting for another process that
    builds it): they come before any check that needs the vocabulary, and the cache is kept for the next run."""
    cache = ("tokenized ", "waiting for another process that is preparing the corpus cache")
    return [line for line in output.strip().splitlines() if not line.startswith(cache)]
