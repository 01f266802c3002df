"""Tokenizer, corpus handling (find, download, verify), the 90/10 split, training and validation windows."""

from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import resource
import socket
import threading
from pathlib import Path

import pytest
import torch

from lit_gpt_char.corpus import TINY_SHAKESPEARE_SHA256
from lit_gpt_char.data import CharTokenizer, FixedWindows, RandomWindows, ShakespeareDataModule
from lit_gpt_char.errors import LitGPTCharError

from .conftest import TINY, files_under, make_text, run_subprocess, tokenize


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data module's default cache (./data/cache) lands there, not in the checkout pytest runs in."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def test_tokenizer_matches_the_lectures_encoding() -> None:
    text = make_text(5000) + "ü€—"
    tokenizer, ids = tokenize(text)
    chars = sorted(set(text))
    assert tokenizer.vocab == "".join(chars)
    assert ids.tolist() == [chars.index(c) for c in text]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("the €").tolist() == [chars.index(c) for c in "the €"]


def test_unknown_characters_are_named() -> None:
    tokenizer = CharTokenizer(" abc")
    with pytest.raises(LitGPTCharError, match=r"2 character\(s\) not in the model's vocabulary of 4: 'x', 'Z'"):
        tokenizer.encode("a xZ x")


def test_real_corpus_is_65_characters_in_one_byte_each(real_corpus: Path) -> None:
    tokenizer, ids = tokenize(real_corpus.read_text(encoding="utf-8"))
    assert tokenizer.vocab_size == 65 and tokenizer.vocab[0] == "\n"
    assert ids.dtype == torch.uint8 and ids.numel() == 1_115_394  # ~1 MB resident


def test_split_is_90_10_and_windows_are_real_slices(corpus: Path) -> None:
    dm = ShakespeareDataModule(path=str(corpus), block_size=16, batch_size=8)
    ids = dm.store.ids
    train, val = dm._split_ids()
    assert len(train) == int(0.9 * len(ids)) and torch.equal(torch.cat([train, val]), ids)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    text, tokenizer = corpus.read_text(), CharTokenizer(dm.vocab)
    for row_x, row_y in zip(x, y):
        window = tokenizer.decode(row_x) + tokenizer.decode(row_y[-1:])
        assert window in text[: len(train) + 1]


def test_training_stream_is_per_rank_and_resumable(corpus: Path) -> None:
    ids = tokenize(corpus.read_text())[1]
    rank0 = RandomWindows(ids, 4, 8, seed=1, rank=0)
    batches = [b for _, b in zip(range(6), rank0)]
    again = [b for _, b in zip(range(6), RandomWindows(ids, 4, 8, seed=1, rank=0))]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    rank1 = [b for _, b in zip(range(6), RandomWindows(ids, 4, 8, seed=1, rank=1))]
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(batches, rank1))
    resumed = RandomWindows(ids, 4, 8, seed=1, rank=0)
    resumed.load_state_dict({"next_batch": 3})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], resumed))
    assert rank0.state_dict() == {"next_batch": 6}


def test_a_pickled_data_module_carries_no_corpus(corpus: Path, tmp_path: Path) -> None:
    """ddp_spawn pickles the data module for each process it starts: the cache travels as its path, not its ids,
    also after a training stream was made (a second launch in one process)."""
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path / "cache"), block_size=8)
    next(iter(dm.train_dataloader()))
    sent = pickle.dumps(dm)
    assert len(sent) < len(corpus.read_bytes()) // 10, len(sent)
    received = pickle.loads(sent)
    assert received.store.inode == dm.store.inode and torch.equal(received.store.ids, dm.store.ids)
    assert received.train_dataloader().next_batch == 0


def test_validation_windows_are_fixed_and_sharded(corpus: Path) -> None:
    ids = tokenize(corpus.read_text())[1]
    whole = FixedWindows(ids, 16, 100, batch_size=32, rank=0, world_size=1)
    first, second = list(whole), list(whole)
    assert len(first) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    shards = [torch.cat([x for x, _ in FixedWindows(ids, 16, 100, 32, r, 2)]) for r in (0, 1)]
    assert sum(len(s) for s in shards) == 100
    together = torch.cat([x for x, _ in first])
    assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, together.tolist()))


def test_whole_split_predicts_every_character_once(corpus: Path) -> None:
    ids = tokenize(corpus.read_text())[1][:1000]
    targets = torch.cat([y.reshape(-1) for _, y in FixedWindows(ids, 16, None, 7, 0, 1)])
    assert torch.equal(targets, ids[1:].long())


# ---- finding, downloading and verifying the corpus ----


class _Server:
    """A one-file HTTP server on 127.0.0.1 (no internet needed)."""

    def __init__(self, payload: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/input.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/input.txt"


def test_download_verifies_and_saves(tmp_path: Path) -> None:
    payload = make_text(3000).encode()
    server = _Server(payload)
    try:
        dm = ShakespeareDataModule(
            data_dir=str(tmp_path / "d"), url=server.url, sha256=hashlib.sha256(payload).hexdigest()
        )
        dm.prepare_data()
    finally:
        server.close()
    assert (tmp_path / "d" / "input.txt").read_bytes() == payload
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["input.txt"]  # no temporary file left
    assert dm.vocab == "".join(sorted(set(payload.decode())))


def test_download_from_a_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text(make_text(2000))
    dm = ShakespeareDataModule(data_dir=str(tmp_path / "d"), url=src.as_uri(), sha256=None)
    assert len(dm.vocab) == len(set(src.read_text()))


def test_default_corpus_is_checked_against_tiny_shakespeares_hash(tmp_path: Path) -> None:
    dm = ShakespeareDataModule(data_dir=str(tmp_path))
    assert dm.sha256 == TINY_SHAKESPEARE_SHA256
    assert ShakespeareDataModule(path="mine.txt").sha256 is None  # a user's own file is not checked


def test_download_with_wrong_hash_saves_nothing(tmp_path: Path) -> None:
    server = _Server(b"not shakespeare\n" * 100)
    try:
        dm = ShakespeareDataModule(data_dir=str(tmp_path / "d"), url=server.url)
        with pytest.raises(LitGPTCharError, match="expected 86c4e6aa.*nothing was saved"):
            dm.prepare_data()
    finally:
        server.close()
    assert not (tmp_path / "d").exists()


def test_no_network_says_where_to_put_the_file(tmp_path: Path) -> None:
    dm = ShakespeareDataModule(data_dir=str(tmp_path / "d"), url=_closed_port_url())
    with pytest.raises(LitGPTCharError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "could not download" in message and str(tmp_path / "d" / "input.txt") in message
    assert "--data.path" in message and "\n" not in message
    assert not (tmp_path / "d").exists()


def test_existing_default_file_with_wrong_hash(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("some other text\n" * 10)
    with pytest.raises(LitGPTCharError, match="has sha256 .* expected 86c4e6aa"):
        ShakespeareDataModule(data_dir=str(tmp_path)).prepare_data()


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (b"", {}, "is empty"),
        (b"\x80\x81\xfe\xff binary", {}, "not UTF-8"),
        (b"short text\n" * 3, {"block_size": 16}, "validation split .* fewer than block_size"),
        (b"x" * 100, {"block_size": 8, "train_fraction": 0.01}, "training split"),
    ],
)
def test_unusable_corpora(tmp_path: Path, content: bytes, kwargs: dict, message: str) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(LitGPTCharError, match=message):
        ShakespeareDataModule(path=str(path), **kwargs).prepare_data()


def test_corpus_path_that_is_an_empty_directory_or_missing(tmp_path: Path) -> None:
    with pytest.raises(LitGPTCharError, match="corpus directory .* has no files"):
        ShakespeareDataModule(path=str(tmp_path)).prepare_data()
    with pytest.raises(LitGPTCharError, match="does not exist"):
        ShakespeareDataModule(path=str(tmp_path / "nope.txt")).prepare_data()


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_a_corpus_path_that_is_not_a_regular_file_is_refused(source: str, tmp_path: Path) -> None:
    """A named pipe (as `--data.path <(cat a.txt b.txt)` passes) or a device: read until killed, if at all."""
    work = tmp_path / "work"
    work.mkdir()
    path = Path(source)
    if source == "fifo":
        path = tmp_path / "corpus.fifo"
        os.mkfifo(path)

    def at_most_4_gb() -> None:  # reading /dev/zero to its end would take all the memory there is
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    result = run_subprocess(["fit", *TINY, "--data.path", str(path)], work, timeout=60, preexec_fn=at_most_4_gb)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: corpus file {path} is not a regular file (a pipe or a device): write it to a file first; "
        f"pass --data.path a text file or a folder of them"
    ]
    assert files_under(work) == []  # no cache, logs or checkpoints


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"val_windows": 0}, "val_windows"),
    ],
)
def test_bad_data_options(kwargs: dict, message: str) -> None:
    with pytest.raises(LitGPTCharError, match=message):
        ShakespeareDataModule(**kwargs)
