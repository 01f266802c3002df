"""Text sources → cached character ids: finding the files, streamed tokenizing, the cache and its lock.

    a file, a folder of files, or the packaged Tiny Shakespeare
      ──pass 1, in chunks──▶ checked to be UTF-8 text; its characters, sorted: the vocabulary
      ──pass 2, in chunks──▶ each character's index in the vocabulary ▶ ids.bin.tmp (uint8 / uint16 / int32)
      ──rename──▶ <cache_dir>/<name>-<key>/ids.bin + meta.json  (vocabulary, dtype, count, fingerprint)
    a later run: fingerprint unchanged ─▶ memory map of ids.bin: no tokenizing, memory independent of size

The ids are the lecture's (``stoi`` over the sorted characters of the whole text). An incremental UTF-8
decoder reads the chunks (a character a chunk cuts waits for the next); pass 1 finds a pure-ASCII chunk's new
characters by deleting the bytes already seen (``bytes.translate``), the one fast path that pays. A build holds a
few chunks in memory.

The fingerprint holds each file's path, size, modification time, status change time and inode: a
same-size copy that keeps the modification time (``cp -p``, ``rsync -t``) still moves the status change
time, which no one can set back (a ``chmod`` moves it too: one more build).

Concurrency and crashes: pass 1 checks the corpus before anything is written, so an unusable one leaves no
trace. Pass 2 holds the cache entry's lock (``filelock``: flock, or a lock file where the filesystem has no
flock); other preparers wait, then find the cache built. It writes temporary files and renames them into
place, metadata last, so a process killed while tokenizing leaves nothing a later run trusts (the next holder
of the lock deletes what it left), and a built cache is mapped without the lock. A cache whose id file does
not have the size its metadata records is rebuilt; the ``tokenized`` line says why (damaged, with the sizes of
its files, or the corpus changed).
"""

import codecs
import contextlib
import fnmatch
import functools
import gzip
import hashlib
import json
import mmap
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from lit_gpt_char.errors import LitGPTCharError

FORMAT = 2  # bump when the cache layout or the ids change meaning: older caches are rebuilt
CHUNK = 256 << 10  # bytes read at a time: small enough to stay in the CPU cache and keep a build's memory small
IDS, META, LOCK, TMP = "ids.bin", "meta.json", "lock", ".tmp"

PACKAGED_TINY_SHAKESPEARE = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt.gz"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

SAY = functools.partial(print, flush=True)
# where flock fails (NFS without its lock service, Lustre's noflock), filelock uses a lock file: fine, as it says
warnings.filterwarnings("ignore", "flock not supported", UserWarning)

# ---- what to tokenize ----


class SourceFile(NamedTuple):
    path: Path
    name: str  # as shown in messages: the path, or the path relative to a corpus directory
    stat: os.stat_result  # as listed: its size, times and inode make the fingerprint


@dataclass
class Corpus:
    """The files of a corpus, in order; their texts joined with ``separator`` make the token stream."""

    kind: str  # "file" | "directory" | "package" (gzip)
    root: Path
    files: list[SourceFile]
    separator: str = "\n"
    glob: Optional[str] = None
    sha256: Optional[str] = None  # expected sha256 of the text (a single file or the packaged corpus)
    strict: bool = False  # directory: a file that is not UTF-8 text is an error instead of being skipped

    @property
    def label(self) -> str:
        return "Tiny Shakespeare (packaged)" if self.kind == "package" else f"{self.kind} {self.root}"

    @property
    def key(self) -> str:
        """The cache entry's name: what the corpus is (not its contents, which the fingerprint covers)."""
        spec = [self.kind, str(self.root.resolve()), self.glob, self.separator, self.sha256, self.strict]
        return f"{self.root.name[:40] or 'corpus'}-{hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]}"

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed or rewritten, or the cache format changes (the corpus's entry,
        its key, already says what the corpus is)."""
        versions = [[f.name, f.stat.st_size, f.stat.st_mtime_ns, f.stat.st_ctime_ns, f.stat.st_ino] for f in self.files]
        return hashlib.sha256(json.dumps([FORMAT, versions]).encode()).hexdigest()


def _unusable(what: str) -> LitGPTCharError:
    """The error of a corpus that cannot be used: ``what`` is wrong, and what to pass instead."""
    return LitGPTCharError(f"{what}; pass --data.path a text file or a folder of them")


def single_file(path: Path, sha256: Optional[str] = None, kind: str = "file") -> Corpus:
    try:
        st = path.stat()
    except OSError as err:
        why = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({err.strerror})"
        raise _unusable(f"corpus path {path} {why}") from None
    if not path.is_file():  # a pipe is read once (or waits for a writer forever), /dev/zero never ends
        raise _unusable(f"corpus file {path} is not a regular file (a pipe or a device): write it to a file first")
    return Corpus(kind, path, [SourceFile(path, str(path), st)], sha256=sha256)


def tiny_shakespeare_text() -> str:
    """The packaged Tiny Shakespeare, decompressed (its sha256 is checked when it is tokenized)."""
    return gzip.decompress(PACKAGED_TINY_SHAKESPEARE.read_bytes()).decode("utf-8")


def glob_match(pattern: str, path: str) -> bool:
    """A glob over paths relative to the corpus directory: ``*``, ``?`` and ``[...]`` stay within one folder,
    ``**`` spans folders. A pattern without ``/`` matches file names at any depth."""
    globs = pattern.strip("/").split("/")

    def match(parts: list[str], globs: list[str]) -> bool:
        if not globs or globs[0] == "**":
            return not globs or any(match(parts[i:], globs[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], globs[0]) and match(parts[1:], globs[1:])

    return match(path.split("/"), globs if len(globs) > 1 else ["**", *globs])


def directory(root: Path, glob: Optional[str], separator: str, strict: bool, exclude: Path) -> Corpus:
    """Every regular file under ``root`` (recursively; names starting with "." skipped, as are ``exclude``
    and what is under it), sorted by relative path, those matching ``glob`` if given."""
    skip, found = exclude.resolve(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != skip]
        for path in (Path(dirpath, name) for name in filenames if not name.startswith(".")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and (glob is None or glob_match(glob, rel)):  # a regular file, or a link to one
                found.append(SourceFile(path, rel, path.stat()))
    if not found:
        if glob:
            raise LitGPTCharError(
                f"corpus directory {root} has no files matching --data.glob {glob!r}; change it (a pattern without "
                f"'/' matches file names at any depth, e.g. '*.txt')"
            )
        raise _unusable(f"corpus directory {root} has no files (names starting with '.' are skipped)")
    found.sort(key=lambda f: f.name.split("/"))
    return Corpus("directory", root, found, separator, glob, strict=strict)


# ---- tokenizing ----


class _NotText(Exception):
    """A file that is not UTF-8 text (the message says where) or that cannot be read (``unreadable``: it says why)."""

    def __init__(self, message: str, unreadable: bool = False) -> None:
        super().__init__(message)
        self.what = "cannot be read" if unreadable else "is not UTF-8 text"


def _texts(file: SourceFile, gz: bool, forbid_nul: bool) -> Iterator[tuple[bytes, str]]:
    """``file`` in chunks: the bytes read and their text (a character a chunk cuts is decoded with the next)."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with gzip.open(file.path) if gz else open(file.path, "rb") as stream:
            while True:
                data, held = stream.read(CHUNK), len(decoder.getstate()[0])
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as err:  # err.start counts from the bytes the decoder held
                    raise _NotText(f"an invalid UTF-8 byte at byte offset {offset - held + err.start}") from None
                if forbid_nul and (i := data.find(b"\0")) >= 0:  # in a folder, a NUL byte marks a binary
                    raise _NotText(f"a NUL byte at byte offset {offset + i}")
                if not data:
                    return
                yield data, text
                offset += len(data)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise _NotText(getattr(err, "strerror", None) or str(err), unreadable=True) from None


def _points(text: str, known: bytes = b"") -> np.ndarray:
    """The code points of ``text``; of an ASCII text, those not in ``known`` (deleting bytes is the fast path)."""
    if text.isascii():
        return np.frombuffer(text.encode().translate(None, known), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _encode(text: str, table: np.ndarray) -> bytes:
    """The ids of a chunk: ``table`` maps a code point to its id."""
    # not _points(): numpy takes with 4-byte indices faster than with the 1-byte ones of an ASCII chunk
    return table.take(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)).tobytes()


def _scan(corpus: Corpus, bar: tqdm) -> tuple[list[SourceFile], dict]:
    """Pass 1: the files that are text (the others skipped in a directory, else an error) and the cache's metadata
    but the dtype: their characters (the vocabulary), counts, the files skipped."""
    is_dir, gz = corpus.kind == "directory", corpus.kind == "package"
    seen, texts, skipped, tokens, size = np.zeros(0x110000, dtype=bool), [], [], 0, 0
    hasher = hashlib.sha256() if corpus.sha256 is not None else None
    for file in corpus.files:
        mine, n, b = np.zeros_like(seen), 0, 0  # a file that turns out not to be text adds nothing
        try:
            for data, text in _texts(file, gz, forbid_nul=is_dir):
                mine[_points(text, np.flatnonzero(mine[:128]).astype(np.uint8).tobytes())] = True
                if hasher is not None:
                    hasher.update(data)
                n, b = n + len(text), b + len(data)
                bar.update(len(data))
        except _NotText as err:
            if is_dir and not corpus.strict:
                skipped.append(f"{file.name} ({err})")
                continue
            where = f"file {file.name} in corpus directory {corpus.root}" if is_dir else f"corpus {corpus.label}"
            skips = "; --data.strict false skips such files" if is_dir else ""
            raise _unusable(f"{where} {err.what}: {err}{skips}") from None
        seen |= mine
        texts.append(file)
        tokens, size = tokens + n, size + b
    if hasher is not None and (got := hasher.hexdigest()) != corpus.sha256:
        fix = "reinstall lit_gpt_char" if gz else "delete it to download it again"
        raise _unusable(f"{corpus.label} has sha256 {got}, expected {corpus.sha256} (damaged, or another text): {fix}")
    if len(texts) > 1:
        seen[[ord(c) for c in corpus.separator]] = True
        tokens += len(corpus.separator) * (len(texts) - 1)
    if tokens == 0:  # every file empty or, in a directory, not UTF-8 text
        not_text = f" (skipped, not UTF-8 text: {', '.join(skipped[:3])})" if skipped else ""
        raise _unusable(f"corpus {corpus.label} is empty{not_text}")
    vocab = "".join(map(chr, np.flatnonzero(seen).tolist()))
    return texts, dict(
        fingerprint=corpus.fingerprint,
        source=str(corpus.root),
        files=len(texts),
        skipped=skipped,
        bytes=size,
        tokens=tokens,
        vocab=vocab,
        sha256=corpus.sha256,
    )


def _write(corpus: Corpus, texts: list[SourceFile], meta: dict, entry: Path, bar: tqdm) -> None:
    """Pass 2: each character's id into a temporary file, then renamed into place with the metadata."""
    chars, n = _points(meta["vocab"]), len(meta["vocab"])
    table = np.zeros(0x110000, np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.int32)
    table[chars], meta["dtype"] = np.arange(n), table.dtype.name
    with open(entry / (IDS + TMP), "wb") as out:
        with contextlib.suppress(_NotText):  # a file gone or unreadable since pass 1: the count below tells
            for i, file in enumerate(texts):
                out.write(_encode(corpus.separator, table) if i else b"")
                for data, text in _texts(file, corpus.kind == "package", forbid_nul=False):
                    out.write(_encode(text, table))
                    bar.update(len(data))
        if out.tell() != meta["tokens"] * table.itemsize:  # a file grew or shrank since pass 1
            raise LitGPTCharError(f"{corpus.label} changed while it was being tokenized; run again")
    # metadata out, ids in, metadata in: at every instant, either no metadata or a matching pair
    (entry / (META + TMP)).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (entry / META).unlink(missing_ok=True)
    os.replace(entry / (IDS + TMP), entry / IDS)
    os.replace(entry / (META + TMP), entry / META)


# ---- the cache ----


class TokenStore:
    """A built cache entry, its ids memory-mapped (copy-on-write: nothing is ever written back).

    Reading a window faults its pages into the process (the kernel maps pages around each one), so the
    resident part of the map grows with the windows read; :meth:`release` lets it go (the pages stay in
    the page cache), which keeps a run's memory the same whatever the corpus size.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory, self.meta, self.vocab = directory, meta, meta["vocab"]
        self.ids_path = directory / IDS
        with open(self.ids_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.inode = os.fstat(f.fileno()).st_ino  # of the file mapped (a later rebuild replaces the name)
        self.ids = torch.from_numpy(np.frombuffer(self._map, dtype=meta["dtype"], count=meta["tokens"]))

    def __reduce__(self) -> tuple:
        # pickled (ddp_spawn sends the data module to new processes): the receiver maps the file itself
        return TokenStore, (self.directory, self.meta)

    def release(self) -> None:
        """Drop the map's pages from this process (they are read again from the page cache when needed)."""
        self._map.madvise(mmap.MADV_DONTNEED)


def _cached(entry: Path, corpus: Corpus) -> tuple[Optional[dict], str]:
    """The metadata of a usable cache entry, or None and why it is rebuilt ("" when there was none)."""
    expected = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no metadata or no ids, or unreadable ones
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        if meta["fingerprint"] != corpus.fingerprint:
            return None, "the corpus changed since it was cached"
        expected = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
        if (entry / IDS).stat().st_size == expected:
            return meta, ""
    sizes = []
    for name in (IDS, META):
        with contextlib.suppress(OSError):  # absent, or not ours to read: building it then says so in one line
            sizes.append(f"{name} {(entry / name).stat().st_size:,} bytes")
    said = f"; its metadata says {IDS} {expected:,}" if expected is not None else ""
    return None, f"the cache was damaged: {', '.join(sizes)}{said}" if sizes else ""


def open_store(corpus: Corpus, cache_dir: Path, say: Callable[[str], None] = SAY) -> TokenStore:
    """The token store of ``corpus`` in ``cache_dir``: reused when its fingerprint matches, else (re)built.

    A build reads the corpus once (pass 1, its checks) before anything is written, so an unusable corpus leaves
    no trace, then writes under the entry's lock; a preparer that waited for the lock finds the cache built.
    """
    entry = cache_dir / corpus.key
    if (meta := _cached(entry, corpus)[0]) is not None:  # metadata is renamed into place last: no lock needed
        return TokenStore(entry, meta)
    start, n = time.perf_counter(), 2 * sum(f.stat.st_size for f in corpus.files)
    with tqdm(total=n, desc=f"tokenizing {corpus.label}", unit="B", unit_scale=True, leave=False, disable=None) as bar:
        texts, meta = _scan(corpus, bar)
        try:
            entry.mkdir(parents=True, exist_ok=True)
            lock = FileLock(entry / LOCK)
            try:
                held = lock.acquire(timeout=0)
            except Timeout:
                say(f"waiting for another process that is preparing the corpus cache {entry}")
                held = lock.acquire()
            with held:
                try:
                    found, why = _cached(entry, corpus)
                    if found is not None:
                        return TokenStore(entry, found)
                    _write(corpus, texts, meta, entry, bar)
                finally:  # no partial ids file (GBs) stays: of this build (a full disk, a changed corpus, Ctrl-C), or
                    # of builds that died (only the holder of the lock writes any; a build renames its own into place)
                    for path in entry.glob(f"*{TMP}*"):
                        path.unlink(missing_ok=True)
        except OSError as err:  # not writable, full, or without file locks (NFS without its lock service)
            raise LitGPTCharError(
                f"cannot use the corpus cache {entry}: {err.strerror or err}; "
                f"pass --data.cache_dir DIR (a writable folder with room, on a local disk)"
            ) from None
    mb, seconds, skipped = meta["bytes"] / 1e6, time.perf_counter() - start, meta["skipped"]
    files = f"{meta['files']:,} file{'s' * (meta['files'] != 1)}, " if corpus.kind == "directory" else ""
    say(
        f"tokenized {corpus.label}{f' again ({why})' if why else ''}: {files}{mb:,.1f} MB in {seconds:.2f} s "
        f"({mb / max(seconds, 1e-9):,.0f} MB/s), {meta['tokens']:,} characters, vocabulary {len(meta['vocab']):,}, "
        f"{meta['dtype']} ids in {entry}"
    )
    if skipped:
        say(
            f"skipped {len(skipped)} of {len(corpus.files)} files under {corpus.root} that are not UTF-8 text: "
            f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}; --data.strict true makes this an error"
        )
    return TokenStore(entry, meta)
