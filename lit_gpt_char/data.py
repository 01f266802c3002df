"""Corpus → character ids → random training windows and fixed validation windows.

    text file or folder ──streamed once into a cache (lit_gpt_char.corpus)──▶ memory-mapped 1-D ids
    ids ──split train_fraction──▶ train ids │ val ids
    train ids ──batch n of rank r: generator seeded (seed + rank, n)──▶ offsets ──one gather──▶ (x, y)
    val ids   ──fixed offsets (or the whole split, tiled)──▶ (x, y), the same every evaluation

The ids take 1 byte a character for vocabularies up to 256 (2 up to 65,536, else 4) and are read
from a memory map: only the pages windows touch are in memory. No window is materialised beyond the
batch being drawn.
"""

import contextlib
import functools
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only

from lit_gpt_char import corpus
from lit_gpt_char.errors import LitGPTCharError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# windows read from the memory map between releases of its pages: the kernel maps 64-256 KiB around each
# window read, so at most 16-64 MiB of the map stays resident
RELEASE_EVERY_WINDOWS = 256
_say = rank_zero_only(corpus.SAY)


class CharTokenizer:
    """Characters ↔ ids, ids ordered by code point (``sorted(set(text))``, as in the lecture)."""

    def __init__(self, vocab: str) -> None:
        self.vocab, self.vocab_size = vocab, len(vocab)
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    def encode(self, text: str) -> torch.Tensor:
        """Ids (int64) of ``text``; a character outside the vocabulary is an error naming it."""
        if new := list(dict.fromkeys(ch for ch in text if ch not in self.stoi)):
            show = ", ".join(map(repr, new[:20]))
            raise LitGPTCharError(f"{len(new)} character(s) not in the model's vocabulary of {self.vocab_size}: {show}")
        return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.vocab[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


def download(url: str, dest: Path, sha256: Optional[str]) -> None:
    """Fetch ``url`` to ``dest`` (torch.hub streams it to a temporary file beside ``dest`` and renames it into
    place once its sha256 checks out): a failed download leaves nothing behind, nor the folders made for it."""
    created, timeout = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()], socket.getdefaulttimeout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    socket.setdefaulttimeout(60)  # torch.hub sets none: a stalled server would hang the run
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256, progress=False)
    except (RuntimeError, OSError, ValueError) as err:  # RuntimeError: the sha256; urllib's URLError is an OSError
        why = f"sha256 is not the expected {sha256}" if isinstance(err, RuntimeError) else getattr(err, "reason", err)
        raise LitGPTCharError(
            f"could not download the corpus from {url} ({why}); nothing was saved. Put the file at {dest}, or pass "
            f"--data.path FILE (a local text file), --data.url URL (another source) or --data.sha256 null (no check)"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)
        with contextlib.suppress(OSError):  # the folders made for it, unless the file is there (not empty)
            for d in created:
                d.rmdir()


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


@dataclass(eq=False)  # eq=False: compared and hashed by identity, as Lightning expects of a loader
class RandomWindows:
    """Endless training batches of random windows; batch ``n`` on rank ``r`` depends only on (seed, r, n).

    That makes the stream resumable exactly from one number, on every rank at once: the state is the
    index of the next batch. ``len()`` is a nominal epoch (one pass worth of tokens) so that Lightning
    shows progress and does not prefetch ahead of the state it saves, rounded up to whole gradient
    accumulation windows of ``accumulate`` batches (Lightning steps early on an epoch's last batch).
    """

    ids: torch.Tensor
    batch_size: int
    block_size: int
    seed: int
    rank: int
    accumulate: int = 1
    next_batch: int = 0

    def __len__(self) -> int:
        return max(1, -(-(len(self.ids) // (self.batch_size * self.block_size)) // self.accumulate)) * self.accumulate

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``n`` of this rank's stream: x (B, T) and y, x shifted by one (int64)."""
        device = self.ids.device
        generator = torch.Generator(device).manual_seed(_mix(self.seed, self.rank, n))
        start = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=generator, device=device)
        windows = self.ids[start[:, None] + torch.arange(self.block_size + 1, device=device)].long()  # one gather
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            self.next_batch += 1
            yield self.batch(self.next_batch - 1)

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
            starts = torch.randint(len(ids) - block_size, (count,), generator=torch.Generator().manual_seed(0))
        if len(starts) < world_size:
            # a rank with nothing to evaluate would leave the others waiting in the val/loss sync
            raise LitGPTCharError(
                f"validation has {len(starts)} window(s) for {world_size} processes, each of which needs at least "
                f"one; use --data.val_windows {world_size} or more (null: the whole split), or fewer --trainer.devices"
            )
        self.ids, self.block_size = ids, block_size
        # the last tile may be short: batches keep one length, so a ragged tail comes as its own batch
        mine = starts[rank::world_size]
        full = mine[mine + block_size < len(ids)]  # all but a short last tile (the starts ascend)
        self._batches = [*full.split(batch_size), *([mine[len(full) :]] if len(mine) > len(full) else [])]

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
            line says which) and draw windows there. Otherwise windows are gathered on the host.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        data_dir: str = "data/tinyshakespeare",
        url: str = TINY_SHAKESPEARE_URL,
        sha256: Optional[str] = corpus.TINY_SHAKESPEARE_SHA256,
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
        for name in ("block_size", "batch_size", "val_batch_size", "max_vocab", "val_windows"):
            if (value := locals()[name]) is not None and value < 1:
                raise LitGPTCharError(f"--data.{name} must be at least 1, got {value}")
        if not 0.0 < train_fraction < 1.0:
            raise LitGPTCharError(f"--data.train_fraction must be strictly between 0 and 1, got {train_fraction}")
        self.save_hyperparameters()  # into checkpoints: an evaluation scores the run's own validation windows
        vars(self).update(self.hparams)  # every argument an attribute; those below in the form used
        self.given_path, self.data_dir, self.cache_dir = path, Path(data_dir), Path(cache_dir)
        self.path = Path(path) if path is not None else self.data_dir / "input.txt"  # shown in messages
        self.sha256 = sha256 if path is None else None  # a file given with path is the user's own: not checked
        try:  # as typed on a command line: \\n is a newline
            self.separator = separator.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as err:
            raise LitGPTCharError(f"--data.separator {separator!r}: {err.reason} (escapes as in Python)") from None
        self._train, self._windows_read = None, 0  # the training stream, windows read since the last release

    def __getstate__(self) -> dict:
        # pickled for the processes ddp_spawn starts: the training stream's view of the ids would pickle the whole
        # corpus (its store travels as the path of its cache: corpus.TokenStore.__reduce__)
        return {**vars(self), "_train": None}

    def _corpus(self) -> corpus.Corpus:
        """What to tokenize: the user's file or directory, the default file, the packaged or a downloaded corpus."""
        if self.given_path is not None and self.path.is_dir():
            return corpus.directory(self.path, self.glob, self.separator, self.strict, exclude=self.cache_dir)
        if self.given_path is not None and self.glob is not None:
            raise LitGPTCharError(f"--data.glob selects files in a directory, but --data.path {self.path} is a file")
        if self.given_path is None and not (self.data_dir / "input.txt").exists():
            if self.url == TINY_SHAKESPEARE_URL:
                self.path = corpus.PACKAGED_TINY_SHAKESPEARE
                return corpus.single_file(self.path, corpus.TINY_SHAKESPEARE_SHA256, kind="package")
            download(self.url, self.path, self.sha256)
        return corpus.single_file(self.path, self.sha256)

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache unless an up-to-date one is there, and check the splits (Lightning
        calls this once per node, on local rank 0; the CLI has usually done it already, to give the model its
        vocabulary). Mapping the cache costs nothing: this process maps it too."""
        self._split_ids()

    @functools.cached_property
    def store(self) -> corpus.TokenStore:
        """The corpus's token store (its cache entry and memory map), built first if needed."""
        store = corpus.open_store(self._corpus(), self.cache_dir)
        if len(store.vocab) > self.max_vocab:
            raise LitGPTCharError(
                f"corpus {self.path} has {len(store.vocab):,} distinct characters, more than --data.max_vocab "
                f"{self.max_vocab:,} (the model embeds each one): is it the text you mean? Or raise --data.max_vocab"
            )
        return store

    @property
    def vocab(self) -> str:
        """Every character of the corpus, sorted: the model's vocabulary (linked to the model)."""
        self._split_ids()  # fail on a too-short split now, before the model is built or anything written
        return self.store.vocab

    def _split_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        train, val = self.store.ids.tensor_split([int(self.train_fraction * len(self.store.ids))])
        for name, split in (("training", train), ("validation", val)):
            if len(split) < self.block_size + 1:
                raise LitGPTCharError(
                    f"the {name} split of {self.path} has {len(split)} characters, fewer than block_size + 1 = "
                    f"{self.block_size + 1}; use a longer corpus, a smaller --data.block_size or --data.train_fraction"
                )
        return train, val

    def scored(self) -> str:
        """What an evaluation scores, in words."""
        _, val = self._split_ids()
        source = "the packaged Tiny Shakespeare" if self.path == corpus.PACKAGED_TINY_SHAKESPEARE else self.path
        if self.val_windows is None:
            n = -(-(len(val) - 1) // self.block_size)
            return f"the whole validation split of {source} ({n:,} windows of {self.block_size} characters)"
        return f"{self.val_windows:,} fixed windows of {self.block_size} characters of the validation split of {source}"

    def setup(self, stage: str) -> None:
        # maps the cache on every rank; too few validation windows for the world size: the error comes now, not mid-run
        self.val_dataloader()

    def _on(self, train: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``train`` copied to ``device`` if it fits there (the map's pages it read are let go with the next
        release), else ``train``. Lightning asks for the training loader once a fit: one copy."""
        size = train.numel() * train.element_size()
        if device.type == "cuda" and size > (free := torch.cuda.mem_get_info(device)[0]) // 2:
            _say(
                f"data: the training ids ({size / 1e9:.2f} GB) do not fit in half of {device}'s free memory "
                f"({free / 1e9:.2f} GB): windows are gathered on the host"
            )
            return train
        _say(f"data: the training ids ({size / 1e6:,.1f} MB) are on {device}; windows are drawn there")
        return train.to(device)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Every RELEASE_EVERY_WINDOWS windows drawn from the memory map, let its pages go: the map's resident
        part stays small however large the corpus and however long the run."""
        self._windows_read += len(batch[0])
        if self._windows_read >= RELEASE_EVERY_WINDOWS:
            self.store.release()
            self._windows_read = 0
        return batch

    def train_dataloader(self) -> RandomWindows:
        train, _ = self._split_ids()
        if self.on_device and self.trainer is not None:
            train = self._on(train, self.trainer.strategy.root_device)
        rank, accumulate = (self.trainer.global_rank, self.trainer.accumulate_grad_batches) if self.trainer else (0, 1)
        next_batch = self._train.next_batch if self._train is not None else 0  # a new epoch goes on
        self._train = RandomWindows(train, self.batch_size, self.block_size, self.seed, rank, accumulate, next_batch)
        return self._train

    def val_dataloader(self) -> FixedWindows:
        _, val = self._split_ids()
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return FixedWindows(val, self.block_size, self.val_windows, self.val_batch_size, rank, world_size)

    test_dataloader = val_dataloader  # the lecture has no test split: `test` evaluates the validation windows
