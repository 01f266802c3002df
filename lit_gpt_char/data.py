"""Corpus → character ids → random training windows and fixed validation windows.

    text file ──CharTokenizer──▶ 1-D uint8 ids ──split train_fraction──▶ train ids │ val ids
    train ids ──batch n of rank r: generator seeded (seed + rank, n)──▶ offsets ──one gather──▶ (x, y)
    val ids   ──fixed offsets (or the whole split, tiled)──▶ (x, y), the same every evaluation

The corpus stays one small tensor (1 byte a character for vocabularies up to 256); no window is
ever materialised beyond the batch being drawn.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule

from lit_gpt_char.errors import LitGPTCharError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def _codepoints(text: str) -> torch.Tensor:
    """Unicode code points of ``text`` as an int32 tensor, without a Python loop over characters."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


class CharTokenizer:
    """Characters ↔ ids, ids ordered by code point (``sorted(set(text))``, as in the lecture)."""

    def __init__(self, vocab: str) -> None:
        if not vocab:
            raise LitGPTCharError("the vocabulary is empty: the corpus has no characters")
        if len(set(vocab)) != len(vocab) or list(vocab) != sorted(vocab):
            raise LitGPTCharError("a vocabulary must list distinct characters in sorted order")
        self.vocab = vocab
        self._points = _codepoints(vocab)

    @classmethod
    def from_text(cls, text: str) -> tuple["CharTokenizer", torch.Tensor]:
        """The tokenizer of ``text`` and ``text`` encoded with it, in one pass over the code points."""
        points, ids = torch.unique(_codepoints(text), sorted=True, return_inverse=True)
        tokenizer = cls("".join(map(chr, points.tolist())))
        return tokenizer, ids.to(tokenizer.dtype)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def dtype(self) -> torch.dtype:
        """The smallest dtype that holds every id."""
        return torch.uint8 if self.vocab_size <= 256 else torch.int32

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` that the vocabulary lacks, each once, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.vocab))

    def encode(self, text: str) -> torch.Tensor:
        """Ids (int64) of ``text``; a character outside the vocabulary is an error naming it."""
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:20])
            raise LitGPTCharError(
                f"{len(missing)} character(s) not in the model's vocabulary of {self.vocab_size}: {shown}"
            )
        return torch.searchsorted(self._points, _codepoints(text)).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.vocab[i] for i in ids)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(url: str, dest: Path, sha256: Optional[str]) -> None:
    """Fetch ``url`` to ``dest``; nothing is written unless the whole file arrived and its hash checks out.

    The file is held in memory (a text corpus is small), verified, written beside ``dest`` and
    renamed into place, so an interrupted or failed download never leaves a partial corpus.
    """
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise LitGPTCharError(
            f"could not download the corpus from {url} ({reason}). Put the file at {dest}, "
            f"or pass --data.path FILE to train on a local text file, or --data.url URL for another source"
        ) from None
    if sha256 is not None and (got := hashlib.sha256(payload).hexdigest()) != sha256:
        raise LitGPTCharError(
            f"the file downloaded from {url} has sha256 {got}, expected {sha256}; nothing was saved. "
            f"Check --data.url, or pass --data.sha256 null to skip the check"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def read_corpus(path: Path) -> str:
    """The text of ``path``, with one clear error for each way it can be unusable."""
    if path.is_dir():
        raise LitGPTCharError(f"corpus path {path} is a directory; pass a UTF-8 text file with --data.path")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LitGPTCharError(f"corpus file {path} does not exist; pass --data.path FILE") from None
    except OSError as err:
        raise LitGPTCharError(f"cannot read corpus file {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LitGPTCharError(
            f"corpus file {path} is not UTF-8 text (invalid byte at offset {err.start}); "
            f"pass a UTF-8 text file with --data.path"
        ) from None
    if not text:
        raise LitGPTCharError(f"corpus file {path} is empty; pass a UTF-8 text file with --data.path")
    return text


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class RandomWindows:
    """Endless training batches of random windows; batch ``n`` on rank ``r`` depends only on (seed, r, n).

    That makes the stream resumable exactly from one number, on every rank at once: the state is the
    index of the next batch. ``len()`` is a nominal epoch (one pass worth of tokens) so that Lightning
    shows progress and does not prefetch ahead of the state it saves, rounded up to whole gradient
    accumulation windows of ``accumulate`` batches (Lightning steps early on an epoch's last batch).
    """

    def __init__(
        self, ids: torch.Tensor, batch_size: int, block_size: int, seed: int, rank: int, accumulate: int = 1
    ) -> None:
        self.ids = ids
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.rank = rank
        self.accumulate = accumulate
        self.next_batch = 0
        self._offsets = torch.arange(block_size + 1, device=ids.device)
        self._generator = torch.Generator(device=ids.device)

    def __len__(self) -> int:
        windows = max(1, -(-(len(self.ids) // (self.batch_size * self.block_size)) // self.accumulate))
        return windows * self.accumulate

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``n`` of this rank's stream: x (B, T) and y, x shifted by one (int64)."""
        self._generator.manual_seed(_mix(self.seed, self.rank, n))
        start = torch.randint(
            len(self.ids) - self.block_size, (self.batch_size,), generator=self._generator, device=self.ids.device
        )
        windows = self.ids[start[:, None] + self._offsets].long()  # one gather: (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            n = self.next_batch
            self.next_batch += 1
            yield self.batch(n)

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_batch = int(state["next_batch"])


class FixedWindows:
    """The same validation windows at every evaluation, in batches, sharded across ranks.

    ``count`` windows at offsets drawn once from a fixed seed (the lecture's estimate_loss draws
    200 × 16 random ones each time); ``count=None`` tiles the whole split with non-overlapping
    windows, so every character after the first is predicted exactly once. ``len()`` is the number
    of batches ``iter()`` yields, the short last tile's own batch included: Lightning stops after len().
    """

    def __init__(
        self, ids: torch.Tensor, block_size: int, count: Optional[int], batch_size: int, rank: int, world_size: int
    ) -> None:
        if count is None:
            starts = torch.arange(0, len(ids) - 1, block_size)
        else:
            generator = torch.Generator().manual_seed(0)
            starts = torch.randint(len(ids) - block_size, (count,), generator=generator)
        if len(starts) < world_size:
            # a rank with nothing to evaluate would leave the others waiting in the val/loss sync
            raise LitGPTCharError(
                f"validation has {len(starts)} window(s) for {world_size} processes, each of which needs at least "
                f"one; use --data.val_windows {world_size} or more (null: the whole split), or fewer --trainer.devices"
            )
        self.ids = ids
        self.block_size = block_size
        # the last tile may be short: batches keep one length, so a ragged tail comes as its own batch
        self._batches: list[torch.Tensor] = []
        for chunk in starts[rank::world_size].split(batch_size):
            full = chunk[chunk + block_size < len(ids)]
            self._batches += [group for group in (full, chunk[len(full) :]) if len(group)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in self._batches:
            span = min(self.block_size, len(self.ids) - 1 - int(group[0]))
            windows = self.ids[group[:, None] + torch.arange(span + 1)].long()
            yield windows[:, :-1], windows[:, 1:]


class ShakespeareDataModule(LightningDataModule):
    """Tiny Shakespeare (or any UTF-8 text file), character-level.

    Args:
        path: Corpus file. Unset: ``data_dir/input.txt``, downloaded from ``url`` if missing.
        data_dir: Folder for the downloaded corpus.
        url: Where to download the corpus from when ``path`` is unset and the file is missing.
        sha256: Expected sha256 of the corpus found or downloaded in ``data_dir`` (null: no check).
            A file given with ``path`` is the user's own and is not checked.
        block_size: Context length; linked to the model's block_size.
        batch_size: Training windows per step (per device).
        train_fraction: Leading fraction of the corpus used for training; the rest validates.
        val_windows: Validation windows, drawn once (fixed seed) and reused at every evaluation.
            Unset (null): the whole validation split, tiled into non-overlapping windows.
        val_batch_size: Windows per validation batch (more is faster; memory grows with it).
        seed: Seed of the training-window stream; rank r draws from its own stream (seed, r).
        on_device: Keep the encoded corpus on the training device and draw windows there (GPU).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        data_dir: str = "data/tinyshakespeare",
        url: str = TINY_SHAKESPEARE_URL,
        sha256: Optional[str] = TINY_SHAKESPEARE_SHA256,
        block_size: int = 32,
        batch_size: int = 16,
        train_fraction: float = 0.9,
        val_windows: Optional[int] = 3200,
        val_batch_size: int = 512,
        seed: int = 1337,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise LitGPTCharError(f"--data.{name} must be at least 1, got {value}")
        if val_windows is not None and val_windows < 1:
            raise LitGPTCharError(f"--data.val_windows must be >= 1 (or null: the whole split), got {val_windows}")
        if not 0.0 < train_fraction < 1.0:
            raise LitGPTCharError(f"--data.train_fraction must be strictly between 0 and 1, got {train_fraction}")
        self.path = Path(path) if path is not None else Path(data_dir) / "input.txt"
        self.download_url = url if path is None else None
        self.sha256 = sha256 if path is None else None
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_fraction = train_fraction
        self.val_windows = val_windows
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.on_device = on_device
        self._tokenizer: Optional[CharTokenizer] = None
        self._ids: Optional[torch.Tensor] = None
        self._train: Optional[RandomWindows] = None

    def _load(self) -> tuple[CharTokenizer, torch.Tensor]:
        """Find (or download) the corpus, verify and encode it, once."""
        if self._tokenizer is None:
            if not self.path.exists() and self.download_url is not None:
                download(self.download_url, self.path, self.sha256)
            text = read_corpus(self.path)
            if self.sha256 is not None and (got := _sha256(self.path)) != self.sha256:
                raise LitGPTCharError(
                    f"corpus file {self.path} has sha256 {got}, expected {self.sha256}: it is not the expected "
                    f"file or is damaged. Delete it to download again, or pass --data.path for your own text"
                )
            self._tokenizer, self._ids = CharTokenizer.from_text(text)
            self._split_ids()  # fail on a too-short split now, before anything is built or written
        assert self._ids is not None
        return self._tokenizer, self._ids

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._load()[0]

    @property
    def vocab(self) -> str:
        """Every character of the corpus, sorted: the model's vocabulary (linked to the model)."""
        return self.tokenizer.vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _split_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._ids
        assert ids is not None
        n = int(self.train_fraction * len(ids))
        train, val = ids[:n], ids[n:]
        for name, split in (("training", train), ("validation", val)):
            if len(split) < self.block_size + 1:
                raise LitGPTCharError(
                    f"the {name} split of {self.path} has {len(split)} characters, fewer than block_size + 1 = "
                    f"{self.block_size + 1}; use a longer corpus, a smaller --data.block_size or another "
                    f"--data.train_fraction"
                )
        return train, val

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str) -> None:
        self._load()
        self.val_dataloader()  # too few validation windows for the world size: the error comes now, not mid-run

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> RandomWindows:
        self._load()
        train, _ = self._split_ids()
        if self.on_device and self.trainer is not None:
            train = train.to(self.trainer.strategy.root_device)
        rank, _ = self._rank()
        state = self._train.state_dict() if self._train is not None else None
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        self._train = RandomWindows(train, self.batch_size, self.block_size, self.seed, rank, accumulate)
        if state is not None:
            self._train.load_state_dict(state)
        return self._train

    def val_dataloader(self) -> FixedWindows:
        self._load()
        _, val = self._split_ids()
        rank, world_size = self._rank()
        return FixedWindows(val, self.block_size, self.val_windows, self.val_batch_size, rank, world_size)

    def test_dataloader(self) -> FixedWindows:
        # the lecture has no test split: `test` evaluates the validation windows
        return self.val_dataloader()
