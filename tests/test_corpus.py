"""The token store: streamed tokenizing, the cache and when it is trusted, directory corpora, the packaged corpus."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

import lit_gpt_char.corpus as corpus_module
import lit_gpt_char.data as data_module
from lit_gpt_char.corpus import (
    IDS,
    META,
    TINY_SHAKESPEARE_SHA256,
    glob_match,
    open_store,
    single_file,
    tiny_shakespeare_text,
)
from lit_gpt_char.data import CharTokenizer, RandomWindows, ShakespeareDataModule
from lit_gpt_char.errors import LitGPTCharError

from .conftest import ROOT, TINY, make_text, outputs_under, run_main, run_subprocess, tokenize


def quiet(message: str) -> None:
    pass


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def write_tree(root: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def reference(text: str) -> tuple[str, torch.Tensor]:
    """Vocabulary and ids as the lecture computes them (and as this project did before the store)."""
    tokenizer, ids = tokenize(text)
    return tokenizer.vocab, ids


# ---- the ids: the same as encoding the whole text at once ----


def test_store_ids_equal_the_lectures_encoding_of_tiny_shakespeare(tmp_path: Path) -> None:
    """The packaged corpus through the store: the ids configs/small.yaml trained on before (uint8, sorted)."""
    dm = ShakespeareDataModule(data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"))
    tokenizer, ids = CharTokenizer(dm.vocab), dm.store.ids
    vocab, expected = reference(tiny_shakespeare_text())
    assert tokenizer.vocab == vocab and len(vocab) == 65
    assert ids.dtype == torch.uint8 and torch.equal(ids, expected) and len(ids) == 1_115_394
    assert dm.store.meta["sha256"] == TINY_SHAKESPEARE_SHA256
    assert not (tmp_path / "d").exists()  # nothing downloaded, nothing written beside the cache


@pytest.mark.parametrize(
    "kind", ["ascii", "latin", "cjk-uint16", "late-newcomers", "wider-then-narrower", "int32", "crlf-and-bom"]
)
def test_streamed_ids_equal_the_whole_text_encoded_at_once(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks cut inside multi-byte characters, ids widened as new characters arrive, renumbered at the end."""
    monkeypatch.setattr(corpus_module, "CHUNK", 4096)
    rng = random.Random(0)
    base = make_text(60_000)
    cjk = [chr(0x4E00 + i) for i in range(300)]
    many = [c for c in range(0x100, 0x30000) if not 0xD800 <= c < 0xE000][:70_000]
    rng.shuffle(many)
    text = {
        "ascii": base,
        "latin": base.replace("e", "é").replace("o", "ö"),
        "cjk-uint16": "".join(rng.choice([*cjk, "a", " ", "\n"]) for _ in range(30_000)),
        "late-newcomers": base[:30_000] + "".join(rng.choice(cjk) for _ in range(3000)) + base[30_000:] + "~",
        "wider-then-narrower": "ab" * 5000 + "".join(chr(0x100 + i) for i in range(200)),  # 202 characters
        "int32": "abc" + "".join(map(chr, many)) + "xyz😀",
        "crlf-and-bom": "\ufeff" + base.replace("\n", "\r\n"),
    }[kind]
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8", newline="")
    store = open_store(single_file(path), tmp_path / "cache", say=quiet)
    vocab, expected = reference(text)
    assert store.vocab == vocab and store.ids.dtype == expected.dtype and torch.equal(store.ids, expected)
    widths = {torch.uint8: (1, 256), torch.uint16: (257, 65536), torch.int32: (65537, 1 << 21)}
    low, high = widths[store.ids.dtype]
    assert low <= len(vocab) <= high


def test_vocabularies_over_256_and_65536_through_the_data_module(tmp_path: Path) -> None:
    big = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300)) * 3
    huge = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))
    for text, dtype, limit in ((big, torch.uint16, 65536), (huge, torch.int32, 100_000)):
        path = tmp_path / f"{dtype}.txt"
        path.write_text(text * 2, encoding="utf-8")
        dm = ShakespeareDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), max_vocab=limit, block_size=8)
        tokenizer, ids = CharTokenizer(dm.vocab), dm.store.ids
        assert ids.dtype == dtype and torch.equal(ids, reference(text * 2)[1])
        x, y = next(iter(dm.train_dataloader()))
        assert x.dtype == torch.int64 and int(x.max()) < tokenizer.vocab_size
    with pytest.raises(LitGPTCharError, match=r"70,000 distinct characters, more than --data.max_vocab 65,536"):
        ShakespeareDataModule(path=str(tmp_path / "torch.int32.txt"), cache_dir=str(tmp_path / "cache")).prepare_data()


# ---- directory corpora ----


TREE = {
    "b.txt": "bee\n" * 5,
    "a/z.txt": "zed " * 5,
    "a/b/c.txt": "sea é\n" * 5,
    "c.md": "# markdown\n" * 3,
    "empty.txt": "",
    ".hidden.txt": "hidden\n",
    ".git/config": "[core]\n",
}


@pytest.mark.parametrize(
    ("glob", "names"),
    [
        (None, ["a/b/c.txt", "a/z.txt", "b.txt", "c.md", "empty.txt"]),
        ("*.txt", ["a/b/c.txt", "a/z.txt", "b.txt", "empty.txt"]),
        ("**/*.md", ["c.md"]),
        ("a/*.txt", ["a/z.txt"]),
        ("a/**", ["a/b/c.txt", "a/z.txt"]),
        ("[bc].*", ["a/b/c.txt", "b.txt", "c.md"]),  # a pattern without "/": file names at any depth
    ],
)
def test_directory_is_its_files_sorted_and_joined(glob: str | None, names: list[str], tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root, TREE)
    dm = ShakespeareDataModule(
        path=str(root), glob=glob, separator="\\n~\\n", cache_dir=str(tmp_path / "cache"), block_size=1
    )
    assert dm.separator == "\n~\n"  # a separator typed on a command line: escapes understood
    text = "\n~\n".join(TREE[name] for name in names)
    tokenizer, ids = CharTokenizer(dm.vocab), dm.store.ids
    assert tokenizer.decode(ids) == text and torch.equal(ids, reference(text)[1])
    assert dm.store.meta["files"] == len(names)


def test_glob_semantics() -> None:
    assert glob_match("*.c", "drivers/net/x.c") and not glob_match("*.c", "x.h")
    assert glob_match("src/*.c", "src/x.c") and not glob_match("src/*.c", "src/y/x.c")
    assert glob_match("src/**/*.c", "src/x.c") and glob_match("src/**/*.c", "src/y/z/x.c")
    assert glob_match("**", "any/thing") and glob_match("?.txt", "a.txt")
    assert glob_match("[!a]*", "b") and not glob_match("[!a]*", "a")


def test_changed_added_removed_files_invalidate_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write_tree(root, {"one.txt": "first file\n", "two/two.txt": "second file\n"})

    def load() -> tuple[int, str]:
        dm = ShakespeareDataModule(path=str(root), cache_dir=str(cache), block_size=2)
        tokenizer, ids = CharTokenizer(dm.vocab), dm.store.ids
        return dm.store.inode, tokenizer.decode(ids)

    inode, text = load()
    assert text == "first file\n\nsecond file\n"
    assert capsys.readouterr().out.count("tokenized") == 1
    assert load() == (inode, text)  # untouched: the same id file, no tokenizing
    assert "tokenized" not in capsys.readouterr().out

    (root / "one.txt").write_text("first file, changed\n")
    inode2, text = load()
    assert inode2 != inode and text == "first file, changed\n\nsecond file\n"
    assert "again (the corpus changed since it was cached)" in capsys.readouterr().out

    (root / "zz.txt").write_text("third\n")
    inode3, text = load()
    assert inode3 != inode2 and text.endswith("\nthird\n")

    (root / "two" / "two.txt").unlink()
    inode4, text = load()
    assert inode4 != inode3 and text == "first file, changed\n\nthird\n"
    assert len(entries(cache)) == 1  # one entry per corpus, rebuilt in place

    # a file's contents changed with the same size: its modification time tells
    (root / "zz.txt").write_text("THIRD\n")
    os.utime(root / "zz.txt", ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert load()[1] == "first file, changed\n\nTHIRD\n"


def test_a_same_size_replacement_that_keeps_the_mtime_invalidates_the_cache(tmp_path: Path) -> None:
    """`cp -p` (or `rsync -t`) of a same-size file with the same mtime, e.g. both unpacked from one archive;
    then a rewrite in place whose mtime is set back: neither changes the path, size or mtime."""
    path, other, cache = tmp_path / "corpus.txt", tmp_path / "other.txt", tmp_path / "cache"
    path.write_text("first text\n" * 100)
    other.write_text("other text\n" * 100)
    st = path.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))

    def text() -> str:
        store = open_store(single_file(path), cache, say=quiet)
        return CharTokenizer(store.vocab).decode(store.ids)

    assert text() == "first text\n" * 100
    time.sleep(0.02)  # the kernel's clock for ctime ticks every few ms
    subprocess.run(["cp", "-p", str(other), str(path)], check=True)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert text() == "other text\n" * 100
    time.sleep(0.02)
    path.write_text("third text\n" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert text() == "third text\n" * 100


def test_non_utf8_files_are_skipped_and_strict_makes_them_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_module, "CHUNK", 4096)  # so that big.bin is streamed, and undone at its bad byte
    root, cache = tmp_path / "tree", tmp_path / "cache"
    good = make_text(20_000)
    write_tree(
        root,
        {
            "a.txt": "alpha\n",
            "b.bin": b"PK\x03\x04" + bytes(range(128, 256)),  # invalid UTF-8 at byte 4
            "big.bin": ("ő" + good).encode() + b"\xff\xfe tail",  # valid for 20 kB (and a new character), then not
            "c.txt": "gamma\n",
            "d.dat": b"ELF\x00\x01\x02 binary",  # valid UTF-8, but a NUL byte at 3
            "e.txt": good,
        },
    )
    dm = ShakespeareDataModule(path=str(root), cache_dir=str(cache), block_size=4)
    tokenizer, ids = CharTokenizer(dm.vocab), dm.store.ids
    text = "\n".join(["alpha\n", "gamma\n", good])
    assert tokenizer.decode(ids) == text and tokenizer.vocab == reference(text)[0]  # no "ő", "\0"
    out = capsys.readouterr().out.strip().splitlines()
    summary = [line for line in out if line.startswith("skipped")]
    assert len(summary) == 1
    assert summary[0].startswith(f"skipped 3 of 6 files under {root} that are not UTF-8 text: ")
    assert "b.bin (an invalid UTF-8 byte at byte offset 4)" in summary[0]
    assert f"big.bin (an invalid UTF-8 byte at byte offset {len(('ő' + good).encode())})" in summary[0]
    assert "d.dat (a NUL byte at byte offset 3)" in summary[0] and "--data.strict true" in summary[0]

    # strict: the first such file is an error, whether the cache is there already or not
    for cache_dir in (cache, tmp_path / "fresh"):
        strict = ShakespeareDataModule(path=str(root), cache_dir=str(cache_dir), strict=True)
        with pytest.raises(LitGPTCharError) as info:
            strict.prepare_data()
        assert str(info.value).startswith(f"file b.bin in corpus directory {root} is not UTF-8 text: ")
        assert "an invalid UTF-8 byte at byte offset 4" in str(info.value)
    assert not (tmp_path / "fresh").exists()  # the failed build left nothing


def test_a_single_file_that_is_not_utf8_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_module, "CHUNK", 4096)
    path = tmp_path / "c.txt"
    path.write_bytes(make_text(10_000).encode() + b"\xc3(")  # 10,001 characters, then a broken one
    with pytest.raises(
        LitGPTCharError, match=r"corpus file .*c.txt is not UTF-8 text: an invalid UTF-8 byte at byte offset 10001"
    ):
        ShakespeareDataModule(path=str(path), cache_dir=str(tmp_path / "cache")).prepare_data()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("files", "kwargs", "message"),
    [
        ({}, {}, "has no files"),
        ({".only-hidden": "x"}, {}, "has no files"),
        ({"a.txt": "x"}, {"glob": "*.c"}, r"corpus directory .* has no files matching --data.glob '\*.c'"),
        ({"a.bin": b"\xff", "b.bin": b"\x00"}, {}, r"corpus directory .* is empty \(skipped, not UTF-8 text: a.bin"),
        ({"a.txt": "", "b.txt": ""}, {"separator": ""}, "is empty"),
    ],
)
def test_unusable_directories(tmp_path: Path, files: dict, kwargs: dict, message: str) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    write_tree(root, files)
    with pytest.raises(LitGPTCharError, match=message):
        ShakespeareDataModule(path=str(root), cache_dir=str(tmp_path / "cache"), **kwargs).prepare_data()
    assert not (tmp_path / "cache").exists()


def test_glob_on_a_single_file_is_an_error(corpus: Path) -> None:
    with pytest.raises(LitGPTCharError, match="--data.glob selects files in a directory"):
        ShakespeareDataModule(path=str(corpus), glob="*.txt").prepare_data()


def test_the_cache_inside_the_corpus_directory_is_not_read_as_corpus(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    (workdir / "notes.txt").write_text(make_text(3000))
    first = ShakespeareDataModule(path=".", block_size=8)  # cache: ./data/cache, under the corpus
    text = CharTokenizer(first.vocab).decode(first.store.ids)
    again = ShakespeareDataModule(path=".", block_size=8)
    assert again.store.inode == first.store.inode and CharTokenizer(again.vocab).decode(again.store.ids) == text
    assert capsys.readouterr().out.count("tokenized") == 1


# ---- the cache survives kills, races and damage ----


SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import lit_gpt_char.corpus as corpus

    corpus.CHUNK = 4096
    encode = corpus._encode
    def slowly(*args):
        time.sleep(0.01)
        return encode(*args)
    corpus._encode = slowly  # writing the ids: ~2.5 s for 1 MB, time to act while it tokenizes
    store = corpus.open_store(corpus.single_file(Path(sys.argv[1])), Path(sys.argv[2]))
    print("mapped", store.inode, flush=True)
    """
)


def _slow_build(path: Path, cache: Path, prefix: tuple[str, ...] = (), pythonpath: str = str(ROOT)) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", SLOW_BUILD, str(path), str(cache)],
        env={**os.environ, "PYTHONPATH": pythonpath}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_temporary_ids(cache: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 60
    while True:
        found = [p for p in cache.glob(f"*/{IDS}.tmp*") if p.stat().st_size > 20_000]
        if found:
            return found[0]
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def test_sigkill_while_tokenizing_leaves_nothing_trusted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    text = make_text(1_000_000)
    path.write_text(text)

    # killed during the first build: no cache; the next run builds one and clears the dead build's file
    proc = _slow_build(path, cache)
    tmp = _wait_for_temporary_ids(cache, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert tmp.exists() and not (tmp.parent / META).exists()
    store = open_store(single_file(path), cache)
    assert torch.equal(store.ids, reference(text)[1]) and not tmp.exists()
    assert capsys.readouterr().out.count("tokenized") == 1

    # killed while rebuilding a changed corpus: the old cache is not taken for the new text
    text2 = text.replace("king", "KING")
    path.write_text(text2 + "!")
    proc = _slow_build(path, cache)
    _wait_for_temporary_ids(cache, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    store = open_store(single_file(path), cache)
    assert torch.equal(store.ids, reference(text2 + "!")[1])
    assert "again (the corpus changed since it was cached)" in capsys.readouterr().out
    assert sorted(p.name for p in store.directory.iterdir()) == [IDS, "lock", META]


# a cluster node's name (we run as root: a UTS namespace of our own); exec keeps the pid, so a kill reaches Python
ON_NODE_GPU_NODE_01 = ("unshare", "-u", "sh", "-c", 'hostname gpu-node-01 && exec "$0" "$@"')


def test_a_build_killed_on_a_cluster_node_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    if subprocess.run([*ON_NODE_GPU_NODE_01, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -u (root)")
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    path.write_text(make_text(300_000))
    proc = _slow_build(path, cache, ON_NODE_GPU_NODE_01)
    tmp = _wait_for_temporary_ids(cache, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again = _slow_build(path, cache, ON_NODE_GPU_NODE_01)  # the next run, on the same node
    assert again.communicate(timeout=120) and again.returncode == 0, again.stderr
    assert not tmp.exists() and sorted(p.name for p in tmp.parent.iterdir()) == [IDS, "lock", META]


NO_FLOCK = textwrap.dedent(
    """
    import errno, fcntl

    def flock(fd, operation):  # as on a filesystem mounted without flock (Lustre's noflock, some FUSE mounts)
        raise OSError(errno.ENOSYS, "Function not implemented")

    fcntl.flock = flock
    """
)


def test_a_filesystem_without_flock_still_tokenizes_once(tmp_path: Path) -> None:
    """flock fails with ENOSYS everywhere (a sitecustomize, as the filesystem would): a build killed there does
    not block the next ones, and two preparers at once tokenize once."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_FLOCK)
    pythonpath = f"{tmp_path / 'site'}{os.pathsep}{ROOT}"
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    text = make_text(300_000)
    path.write_text(text)
    proc = _slow_build(path, cache, pythonpath=pythonpath)
    tmp = _wait_for_temporary_ids(cache, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    procs = [_slow_build(path, cache, pythonpath=pythonpath) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(err == "" for _, err in results), results
    assert sum(out.count("tokenized") for out, _ in results) == 1 and not tmp.exists()
    assert torch.equal(open_store(single_file(path), cache, say=quiet).ids, reference(text)[1])


def test_a_cache_that_cannot_be_locked_is_one_line(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """NFS without its lock service: flock fails with ENOLCK (here in this process, as that filesystem would)."""

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(LitGPTCharError, match=r"^cannot use the corpus cache .*: No locks available; pass"):
        open_store(single_file(corpus), tmp_path / "cache", say=quiet)


def test_two_preparers_at_once_tokenize_once_and_both_get_the_cache(tmp_path: Path) -> None:
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    text = make_text(1_000_000)
    path.write_text(text)
    procs = [_slow_build(path, cache) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    assert sum(out.count("tokenized") for out in outs) == 1
    assert sum("waiting for another process" in out for out in outs) == 1
    store = open_store(single_file(path), cache, say=quiet)
    assert {out.split("mapped ")[1].split()[0] for out in outs} == {str(store.inode)}
    assert torch.equal(store.ids, reference(text)[1])


@pytest.mark.parametrize("damage", ["truncated", "metadata-disagrees", "metadata-missing", "ids-missing"])
def test_a_damaged_cache_is_rebuilt_with_a_line(damage: str, corpus: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    store = open_store(single_file(corpus), cache)
    entry, expected = store.directory, store.ids.clone()
    del store
    if damage == "truncated":
        with open(entry / IDS, "r+b") as f:
            f.truncate(1000)
    elif damage == "metadata-disagrees":
        meta = json.loads((entry / META).read_text())
        meta["tokens"] += 1
        (entry / META).write_text(json.dumps(meta))
    elif damage == "metadata-missing":
        (entry / META).unlink()
    else:
        (entry / IDS).unlink()
    capsys.readouterr()
    store = open_store(single_file(corpus), cache)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("tokenized file") and " again (the cache was damaged: " in out[0]
    if damage == "truncated":
        assert "damaged: ids.bin 1,000 bytes, meta.json " in out[0]
        assert f"; its metadata says ids.bin {len(expected):,}): " in out[0]  # uint8 ids: one byte each
    assert torch.equal(store.ids, expected)


# ---- memory map, offline default corpus, the CLI ----


def test_ids_are_a_memory_map_of_the_cache(corpus: Path, tmp_path: Path) -> None:
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path / "cache"), block_size=8)
    dm.setup("fit")
    train, _ = dm._split_ids()
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(dm.store.ids_path.resolve()) in maps.read_text()
    stream = RandomWindows(train, 4, 8, seed=1, rank=0)  # windows read straight from the map
    x, y = stream.batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_map_pages_are_released_as_windows_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resident part of the map stays small however many windows are read (Linux: /proc/self/status)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc")
    monkeypatch.setattr(data_module, "RELEASE_EVERY_WINDOWS", 16)  # every batch: a 20 MB corpus shows it
    path = tmp_path / "big.txt"
    path.write_text(make_text(200_000) * 100)  # 20 MB
    dm = ShakespeareDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), block_size=32, batch_size=16)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())

    def rss_file_mb() -> float:
        line = next(line for line in status.read_text().splitlines() if line.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    before = rss_file_mb()
    grew = 0.0
    for _ in range(2000):  # 32,000 windows: most of the 18 MB training split, were its pages kept
        dm.on_before_batch_transfer(next(stream), 0)
        grew = max(grew, rss_file_mb() - before)
    assert grew < 8  # the kernel maps up to 256 KiB around each window read: 16 windows, 4 MiB


def test_on_device_copies_the_ids_when_they_fit(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path / "cache"), on_device=True)
    dm.setup("fit")
    train, _ = dm._split_ids()
    assert dm._on(train, torch.device("cpu")) is train  # on a CPU the map already is in host memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (train.numel(), 8 * train.numel()))
    assert dm._on(train, torch.device("cuda", 0)) is train  # needs more than half the free memory: stays
    assert "do not fit in half of cuda:0's free memory" in capsys.readouterr().out
    moved = dm._on(train, torch.device("meta"))  # a device without a free-memory query: copied, in slices
    assert moved.device.type == "meta" and moved.shape == train.shape and moved.dtype == train.dtype
    assert "are on meta; windows are drawn there" in capsys.readouterr().out


def test_default_corpus_needs_no_network(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    args = ["fit", *TINY, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
    assert run_main(args) == 0
    assert not (workdir / "data" / "tinyshakespeare").exists()  # the packaged copy, read from the package
    (last,) = workdir.glob("checkpoints/*/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_cli_directory_corpus_and_its_errors(tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tree"
    write_tree(root, {f"part{i}.txt": make_text(8000, seed=i) for i in range(4)} | {"logo.png": b"\x89PNG\r\n\x1a\n"})
    assert run_main(["fit", *TINY, "--data.path", str(root), "--data.glob", "*.txt"]) == 0
    assert "tokenized directory" in capsys.readouterr().out
    for extra, message in (
        (["--data.glob", "*.c"], "has no files matching --data.glob"),
        (["--data.strict", "true"], "file logo.png in corpus directory"),
    ):
        assert run_main(["fit", *TINY, "--data.path", str(root), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---- DDP: tokenized once, every rank maps the same file ----


class StoreProbe(Callback):
    """Writes ``out_dir/rank{r}.json``: the id file this rank mapped."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        store = trainer.datamodule.store
        path = str(store.ids_path.resolve())
        maps = Path("/proc/self/maps")
        record = {"path": path, "inode": store.inode, "mapped": path in maps.read_text() if maps.exists() else None}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_tokenizes_once_and_every_rank_maps_the_same_file(corpus: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    probe = ["--trainer.callbacks+=tests.test_corpus.StoreProbe", "--trainer.callbacks.out_dir", str(tmp_path / "p")]
    result = run_subprocess(["fit", *TINY, *ddp, "--data.path", str(corpus), *probe, "--trainer.max_steps", "4"], work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tokenized file") == 1
    ranks = [json.loads((tmp_path / "p" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["mapped"] in (True, None)
    assert ranks[0]["path"].startswith(str((work / "data" / "cache").resolve()))


def test_bad_input_leaves_no_cache_behind(tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not text")
    assert run_main(["fit", *TINY, "--data.path", str(bad)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert outputs_under(workdir) == [] and not (workdir / "data").exists()


@pytest.mark.slow
def test_corpus_scale_benchmark_at_toy_size(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, {f"d{i}/f{i}.txt": make_text(20_000, seed=i) for i in range(3)})
    args = ["--sizes", "1", "--rounds", "1", "--steps", "30", "--tree", str(tree), "--workdir", str(tmp_path / "w")]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "corpus_scale.py"), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| Tiny") or line.startswith("| folder")]
    assert len(rows) == 2 and "(1.000×)" in rows[0] and "MB/s" in rows[1]
