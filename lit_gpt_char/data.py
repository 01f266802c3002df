"""Corpus → character ids → random training windows and fixed validation windows.

    text file or folder ──streamed once into a cache (lit_gpt_char.corpus)──▶ memory-mapped 1-D ids
    ids ──split train_fraction──▶ train ids │ val ids
    train ids ──batch n of rank r: generator seeded (seed + rank, n)──▶ offsets ──one gather──▶ (x, y)
    val ids   ──fixed offsets (or the whole split, tiled)──▶ (x, y), the same every evaluation

The ids take 1 byte a character for vocabularies up to 256 (2 up to 65,536, else 4) and are read
from a memory map: only the pages windows touch are in memory. No window is materialised beyond the
batch being drawn.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only

from lit_gpt_char.corpus import (
    PACKAGED_TINY_SHAKESPEARE,
    TINY_SHAKESPEARE_SHA256,
    Corpus,
    TokenStore,
    directory,
    make_dirs,
    open_store,
    packaged_tiny_shakespeare,
    single_file,
)
from lit_gpt_char.errors import LitGPTCharError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# windows read from the memory map between releases of its pages: the kernel maps 64-256 KiB around each
# window read, so at most 16-64 MiB of the map stays resident
RELEASE_EVERY_WINDOWS = 256


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


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
        """The smallest dtype that holds every id (the token store's: uint8, uint16 or int32)."""
        return torch.uint8 if self.vocab_size <= 256 else torch.uint16 if self.vocab_size <= 65536 else torch.int32

    def encode(self, text: str) -> torch.Tensor:
        """Ids (int64) of ``text``; a character outside the vocabulary is an error naming it."""
        missing = list(dict.fromkeys(ch for ch in text if ch not in self.vocab))
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


def download(url: str, dest: Path, sha256: Optional[str]) -> None:
    """Fetch ``url`` to ``dest`` (torch.hub streams it to a temporary file beside ``dest`` and renames it into
    place once its sha256 checks out): a failed download leaves nothing behind, nor the folders made for it."""
    created = make_dirs(dest.parent)
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # torch.hub sets none: a stalled server would hang the run
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256, progress=False)
    except RuntimeError:  # the hash
        raise LitGPTCharError(
            f"the file downloaded from {url} does not have the sha256 expected {sha256}; nothing was saved. "
            f"Check --data.url, or pass --data.sha256 null to skip the check"
        ) from None
    except (OSError, ValueError) as err:  # urllib's URLError is an OSError
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise LitGPTCharError(
            f"could not download the corpus from {url} ({reason}). Put the file at {dest}, "
            f"or pass --data.path FILE to train on a local text file, or --data.url URL for another source"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)
        if not dest.exists():
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def _unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r``, ``\0`` and ``\\`` typed on a command line, as the characters they name."""
    return re.sub(r"\\([ntr0\\])", lambda m: _ESCAPES[m.group(1)], text)


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
        self.ids, self.batch_size, self.block_size = ids, batch_size, block_size
        self.seed, self.rank, self.accumulate = seed, rank, accumulate
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
        self.ids, self.block_size = ids, block_size
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
    """Tiny Shakespeare, or any UTF-8 text file or folder of text files, character-level.

    The corpus is tokenized once, in a stream, into a cache (``cache_dir``) that later runs reuse while
    the corpus is unchanged; training and validation windows are read from a memory map of it, so a
    run's memory does not grow with the corpus (see :mod:`lit_gpt_char.corpus`).

    Args:
        path: Corpus: a UTF-8 text file, or a directory (every file under it, recursively, in sorted
            path order; names starting with "." are skipped). Unset: ``data_dir/input.txt`` if it
            exists, else the Tiny Shakespeare that ships with the package (no network needed), or,
            with another ``url``, that file downloaded to ``data_dir/input.txt``.
        data_dir: Folder of the default corpus file (``input.txt``) and of downloads.
        url: Where to download the corpus from when ``path`` is unset and ``data_dir/input.txt`` is
            missing. The default (Tiny Shakespeare) is not downloaded: its packaged copy is used.
        sha256: Expected sha256 of the corpus found or downloaded in ``data_dir`` (null: no check).
            A file given with ``path`` is the user's own and is not checked.
        glob: Directory corpus: only files whose path (relative to ``path``) matches, e.g. ``'**/*.c'``;
            a pattern without "/" matches file names at any depth (``'*.txt'``). Unset: every file.
        separator: Directory corpus: text put between consecutive files (default: a newline; escapes
            such as ``\\n`` and ``\\t`` are understood, so they can be typed on a command line).
        strict: Directory corpus: a file that is not UTF-8 text (invalid bytes, or NUL bytes as in a
            binary) is an error naming it and the byte offset, instead of being skipped.
        cache_dir: Folder of tokenized corpora (one entry per corpus; delete it to reclaim the space).
        max_vocab: Most distinct characters allowed (the model embeds each one); more is an error.
        block_size: Context length; linked to the model's block_size.
        batch_size: Training windows per step (per device).
        train_fraction: Leading fraction of the corpus used for training; the rest validates.
        val_windows: Validation windows, drawn once (fixed seed) and reused at every evaluation.
            Unset (null): the whole validation split, tiled into non-overlapping windows.
        val_batch_size: Windows per validation batch (more is faster; memory grows with it).
        seed: Seed of the training-window stream; rank r draws from its own stream (seed, r).
        on_device: Copy the training ids to the accelerator (when they fit in half its free memory; a
            line says which) and draw windows there. Otherwise windows are gathered on the host and
            sent through pinned memory.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        data_dir: str = "data/tinyshakespeare",
        url: str = TINY_SHAKESPEARE_URL,
        sha256: Optional[str] = TINY_SHAKESPEARE_SHA256,
        glob: Optional[str] = None,
        separator: str = "\\n",
        strict: bool = False,
        cache_dir: str = "data/cache",
        max_vocab: int = 65536,
        block_size: int = 32,
        batch_size: int = 16,
        train_fraction: float = 0.9,
        val_windows: Optional[int] = 3200,
        val_batch_size: int = 200,
        seed: int = 1337,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        for name in ("block_size", "batch_size", "val_batch_size", "max_vocab"):
            if (value := locals()[name]) < 1:
                raise LitGPTCharError(f"--data.{name} must be at least 1, got {value}")
        if val_windows is not None and val_windows < 1:
            raise LitGPTCharError(f"--data.val_windows must be >= 1 (or null: the whole split), got {val_windows}")
        if not 0.0 < train_fraction < 1.0:
            raise LitGPTCharError(f"--data.train_fraction must be strictly between 0 and 1, got {train_fraction}")
        self.save_hyperparameters()  # into checkpoints: an evaluation scores the run's own validation windows
        self.given_path = path
        self.path = Path(path) if path is not None else Path(data_dir) / "input.txt"  # shown in messages
        self.data_dir, self.url = Path(data_dir), url
        self.sha256 = sha256 if path is None else None
        self.glob, self.separator, self.strict = glob, _unescape(separator), strict
        self.cache_dir, self.max_vocab, self.on_device = Path(cache_dir), max_vocab, on_device
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.train_fraction, self.val_windows, self.val_batch_size = train_fraction, val_windows, val_batch_size
        self._store: Optional[TokenStore] = None
        self._tokenizer: Optional[CharTokenizer] = None
        self._ids: Optional[torch.Tensor] = None
        self._train: Optional[RandomWindows] = None
        self._device_train: Optional[torch.Tensor] = None
        self._windows_read = 0

    def __getstate__(self) -> dict:
        # spawned processes (ddp_spawn) map the cache themselves instead of receiving a copy of the corpus
        state = {**self.__dict__, "_store": None, "_tokenizer": None, "_ids": None, "_device_train": None}
        if self._train is not None:
            state.update(_train=None, _resume_next_batch=self._train.next_batch)
        return state

    def _corpus(self) -> Corpus:
        """What to tokenize: the user's file or directory, the default file, the packaged or a downloaded corpus."""
        if self.given_path is not None:
            path = Path(self.given_path)
            if path.is_dir():
                return directory(path, self.glob, self.separator, self.strict, exclude=self.cache_dir)
            if self.glob is not None:
                raise LitGPTCharError(f"--data.glob selects files in a directory, but --data.path {path} is a file")
            return single_file(path)
        default = self.path = self.data_dir / "input.txt"
        if not default.exists():
            if self.url == TINY_SHAKESPEARE_URL:
                corpus = packaged_tiny_shakespeare()
                self.path = corpus.root
                return corpus
            download(self.url, default, self.sha256)
        return single_file(default, self.sha256)

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache unless an up-to-date one is there, and check the splits (Lightning
        calls this once per node, on local rank 0; the CLI has usually done it already, to give the model its
        vocabulary). Mapping the cache costs nothing: this process maps it too."""
        self._load()

    @property
    def store(self) -> TokenStore:
        """The corpus's token store (its cache entry and memory map), built first if needed."""
        if self._store is None:
            store = open_store(self._corpus(), self.cache_dir)
            if len(store.vocab) > self.max_vocab:
                raise LitGPTCharError(
                    f"corpus {self.path} has {len(store.vocab):,} distinct characters, more than --data.max_vocab "
                    f"{self.max_vocab:,} (the model embeds each one); check that the corpus is the text you mean, "
                    f"or raise --data.max_vocab"
                )
            self._store = store
        return self._store

    def _load(self) -> tuple[CharTokenizer, torch.Tensor]:
        """The tokenizer and the memory-mapped ids, once."""
        if self._tokenizer is None:
            self._tokenizer, self._ids = CharTokenizer(self.store.vocab), self.store.ids
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
        ids = self._load()[1]
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

    def scored(self) -> str:
        """What an evaluation scores, in words."""
        _, val = self._split_ids()
        corpus = "the packaged Tiny Shakespeare" if self.path == PACKAGED_TINY_SHAKESPEARE else self.path
        if self.val_windows is None:
            n = -(-(len(val) - 1) // self.block_size)
            return f"the whole validation split of {corpus} ({n:,} windows of {self.block_size} characters)"
        return f"{self.val_windows:,} fixed windows of {self.block_size} characters of the validation split of {corpus}"

    def setup(self, stage: str) -> None:
        self._load()  # maps the cache on every rank
        self.val_dataloader()  # too few validation windows for the world size: the error comes now, not mid-run

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _on(self, train: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``train`` on ``device`` if it fits there, copied in slices (host memory stays small); else ``train``."""
        if device.type == "cpu":
            return train  # the memory map already is in host memory
        if self._device_train is not None and self._device_train.device == device:
            return self._device_train
        size = train.numel() * train.element_size()
        if device.type == "cuda" and size > (free := torch.cuda.mem_get_info(device)[0]) // 2:
            _say(
                f"data: the training ids ({size / 1e9:.2f} GB) do not fit in half of {device}'s free memory "
                f"({free / 1e9:.2f} GB): windows are gathered on the host and sent through pinned memory"
            )
            return train
        on_device = torch.empty(train.shape, dtype=train.dtype, device=device)
        step = 64 << 20
        for i in range(0, train.numel(), step):
            on_device[i : i + step].copy_(train[i : i + step])
            if self._store is not None:
                self._store.release()  # what the copy read of the map does not stay resident
        _say(f"data: the training ids ({size / 1e6:,.1f} MB) are on {device}; windows are drawn there")
        self._device_train = on_device
        return on_device

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Every RELEASE_EVERY_WINDOWS windows drawn from the memory map, let its pages go: the map's resident
        part stays small however large the corpus and however long the run."""
        if self._store is not None:
            self._windows_read += len(batch[0])
            if self._windows_read >= RELEASE_EVERY_WINDOWS:
                self._store.release()
                self._windows_read = 0
        return batch

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Windows gathered on the host reach a GPU through pinned memory, without blocking the host."""
        if device.type == "cuda" and all(t.device.type == "cpu" for t in batch):  # (x, y), from our loaders
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> RandomWindows:
        train, _ = self._split_ids()
        if self.on_device and self.trainer is not None:
            train = self._on(train, self.trainer.strategy.root_device)
        rank, _ = self._rank()
        next_batch = self._train.next_batch if self._train is not None else self.__dict__.pop("_resume_next_batch", 0)
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        self._train = RandomWindows(train, self.batch_size, self.block_size, self.seed, rank, accumulate)
        self._train.next_batch = next_batch  # a new loader (another epoch, a resumed run) goes on where it was
        return self._train

    def val_dataloader(self) -> FixedWindows:
        _, val = self._split_ids()
        rank, world_size = self._rank()
        return FixedWindows(val, self.block_size, self.val_windows, self.val_batch_size, rank, world_size)

    def test_dataloader(self) -> FixedWindows:
        # the lecture has no test split: `test` evaluates the validation windows
        return self.val_dataloader()
