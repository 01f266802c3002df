"""Text sources → cached character ids: finding the files, streamed tokenizing, the cache and its lock.

    a file, a folder of files, or the packaged Tiny Shakespeare
      ──pass 1, in chunks──▶ checked to be UTF-8 text; its characters, sorted: the vocabulary
      ──pass 2, in chunks──▶ each character's index in the vocabulary ▶ ids.bin.tmp (uint8 / uint16 / int32)
      ──rename──▶ <cache_dir>/<name>-<key>/ids.bin + meta.json  (vocabulary, dtype, count, fingerprint)
    a later run: fingerprint unchanged ─▶ memory map of ids.bin: no tokenizing, memory independent of size

The ids are those of ``CharTokenizer.from_text`` on the whole text. A pure-ASCII chunk is never decoded:
``bytes.translate`` finds its new characters and writes its ids. A build holds a few chunks in memory.

The fingerprint holds each file's path, size, modification time, status change time and inode: a
same-size copy that keeps the modification time (``cp -p``, ``rsync -t``) still moves the status change
time, which no one can set back (a ``chmod`` moves it too: one more build).

Concurrency and crashes: a build holds the cache entry's lock (``filelock``: flock, or a lock file where
the filesystem has no flock); other preparers wait, then find the cache built. It writes temporary files
and renames them into place, metadata last, so a process killed while tokenizing leaves nothing a later
run trusts, and the next holder of the lock deletes what it left. A cache whose id file does not have
the size its metadata records is rebuilt, with a line saying so.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import mmap
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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

Say = Callable[[str], None]
SAY: Say = functools.partial(print, flush=True)

# ---- what to tokenize ----


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # as shown in messages: the path, or the path relative to a corpus directory
    version: tuple[int, int, int, int]  # size, modification time, status change time, inode

    @classmethod
    def of(cls, path: Path, name: str, st: os.stat_result) -> SourceFile:
        return cls(path, name, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))


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

    def _hash(self, *more: object) -> str:
        spec = [self.kind, str(self.root.resolve()), self.glob, self.separator, self.sha256, self.strict, *more]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    @property
    def key(self) -> str:
        """The cache entry's name: what the corpus is (not its contents, which the fingerprint covers)."""
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', self.root.name)[:40] or 'corpus'}-{self._hash()[:16]}"

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed or rewritten, or the cache format changes."""
        return self._hash(FORMAT, [[f.name, *f.version] for f in self.files])


def single_file(path: Path, sha256: Optional[str] = None) -> Corpus:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LitGPTCharError(
            f"corpus path {path} does not exist; pass --data.path a text file or a folder of them"
        ) from None
    except OSError as err:
        raise LitGPTCharError(f"cannot read corpus path {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a pipe is read once (or waits for a writer forever), /dev/zero never ends
        raise LitGPTCharError(
            f"corpus file {path} is not a regular file (a pipe or a device can be read only once, or never ends); "
            f"write it to a file first, e.g. cat a.txt b.txt > corpus.txt, and pass --data.path corpus.txt"
        )
    if st.st_size == 0:
        raise LitGPTCharError(f"corpus file {path} is empty; pass a UTF-8 text file with --data.path")
    return Corpus("file", path, [SourceFile.of(path, str(path), st)], sha256=sha256)


def packaged_tiny_shakespeare() -> Corpus:
    path = PACKAGED_TINY_SHAKESPEARE
    if not path.is_file():
        raise LitGPTCharError(
            f"the packaged Tiny Shakespeare ({path}) is missing: reinstall lit_gpt_char, "
            f"or pass --data.path FILE to train on a local text file"
        )
    return Corpus("package", path, [SourceFile.of(path, path.name, path.stat())], sha256=TINY_SHAKESPEARE_SHA256)


def tiny_shakespeare_text() -> str:
    """The packaged Tiny Shakespeare, decompressed and checked against its sha256."""
    data = gzip.decompress(packaged_tiny_shakespeare().root.read_bytes())
    if hashlib.sha256(data).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise LitGPTCharError(f"the packaged Tiny Shakespeare ({PACKAGED_TINY_SHAKESPEARE}) is damaged: reinstall")
    return data.decode("utf-8")


_GLOB_PARTS = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def _glob_part(match: re.Match[str]) -> str:
    part = match.group()
    if len(part) > 2 and part[0] == "[":  # a class; [!...] is its complement
        return "[" + ("^" + part[2:-1] if part[1] == "!" else part[1:-1]).replace("\\", "\\\\") + "]"
    return _GLOB_PARTS.get(part) or re.escape(part)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over paths relative to the corpus directory: ``*`` and ``?`` stay within one folder, ``**``
    spans folders, ``[...]`` is a class. A pattern without ``/`` matches file names at any depth."""
    pattern = pattern.strip("/")
    if "/" not in pattern and not pattern.startswith("**"):
        pattern = "**/" + pattern
    return re.compile(re.sub(r"\*\*/|\*\*|\*|\?|\[.[^]]*\]|.", _glob_part, pattern, flags=re.S) + r"\Z")


def directory(
    root: Path, glob: Optional[str] = None, separator: str = "\n", strict: bool = False, exclude: Optional[Path] = None
) -> Corpus:
    """Every regular file under ``root`` (recursively; names starting with "." skipped, as are ``exclude``
    and what is under it), sorted by relative path, those matching ``glob`` if given."""
    skip_dir = None
    if exclude is not None:
        with contextlib.suppress(ValueError):
            skip_dir = exclude.resolve().relative_to(root.resolve()).as_posix()
    matches = glob_regex(glob).match if glob else None
    found: list[tuple[tuple[str, ...], SourceFile]] = []
    listed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (rel_dir / d).as_posix() != skip_dir]
        for name in filenames:
            path = Path(dirpath, name)
            try:
                st = path.stat()  # follows a link to a file
            except OSError:
                continue  # a dangling link
            if name.startswith(".") or not stat.S_ISREG(st.st_mode):
                continue
            listed += 1
            rel = (rel_dir / name).as_posix()
            if matches is None or matches(rel):
                found.append((tuple(rel.split("/")), SourceFile.of(path, rel, st)))
    if listed == 0:
        raise LitGPTCharError(
            f"corpus directory {root} has no files (names starting with '.' are skipped); "
            f"pass --data.path with a text file or a folder of text files"
        )
    if not found:
        raise LitGPTCharError(
            f"no file under corpus directory {root} matches --data.glob {glob!r} ({listed} files there); "
            f"a pattern without '/' matches file names at any depth, e.g. '*.txt'"
        )
    found.sort(key=lambda item: item[0])
    return Corpus("directory", root, [f for _, f in found], separator, glob, strict=strict)


# ---- tokenizing ----


class _NotText(Exception):
    """A file that is not UTF-8 text (``offset``: where) or cannot be read (``offset`` -1)."""

    def __init__(self, offset: int, what: str) -> None:
        super().__init__(f"unreadable ({what})" if offset < 0 else f"{what} at byte offset {offset}")
        self.offset, self.what = offset, what


def _utf8_cut(data: bytes) -> int:
    """Where to cut ``data`` so that no character is split (the rest waits for the next chunk)."""
    i, n = len(data) - 1, len(data)
    while i >= max(0, n - 4) and data[i] & 0xC0 == 0x80:
        i -= 1
    if i < 0:
        return n
    lead = data[i]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return i if i + need > n else n


def _chunks(file: SourceFile, gz: bool, forbid_nul: bool) -> Iterator[tuple[bytes, Optional[str]]]:
    """``file`` in chunks cut between characters: (bytes, None) for ASCII, else (bytes, their text)."""
    offset, carry = 0, b""
    try:
        with gzip.open(file.path) if gz else open(file.path, "rb") as stream:
            while data := carry + (chunk := stream.read(CHUNK)):
                text, carry = None, b""
                if not data.isascii():
                    cut = _utf8_cut(data) if chunk else len(data)
                    data, carry = data[:cut], data[cut:]
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise _NotText(offset + err.start, "an invalid UTF-8 byte") from None
                if forbid_nul and (i := data.find(b"\0")) >= 0:  # in a folder, a NUL byte marks a binary
                    raise _NotText(offset + i, "a NUL byte")
                yield data, text
                offset += len(data)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise _NotText(-1, getattr(err, "strerror", None) or str(err)) from None


def _points(data: bytes, text: Optional[str]) -> np.ndarray:
    if text is None:
        return np.frombuffer(data, dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.intp)  # faster to index with


def _encode(data: bytes, text: Optional[str], table: np.ndarray) -> bytes:
    """The ids of a chunk: ``table`` maps a code point to its id."""
    if text is None and table.itemsize == 1:
        return data.translate(table[:256].tobytes())
    return table[_points(data, text)].tobytes()


@dataclass
class _Scan:
    files: list[SourceFile]  # those that are text, in order
    skipped: list[tuple[str, str]]  # (file name, why)
    chars: np.ndarray  # the vocabulary's code points, sorted
    tokens: int
    bytes: int


def _scan(corpus: Corpus, bar: tqdm) -> _Scan:
    """Pass 1: which files are text (the others skipped in a directory, else an error) and their characters."""
    seen = np.zeros(0x110000, dtype=bool)
    seen_ascii = b""
    scan = _Scan([], [], np.empty(0, dtype=np.intp), 0, 0)
    hasher = hashlib.sha256() if corpus.sha256 is not None else None
    is_dir = corpus.kind == "directory"
    for file in corpus.files:
        added, tokens, size = [], 0, 0  # a file that turns out not to be text adds nothing
        try:
            for data, text in _chunks(file, corpus.kind == "package", forbid_nul=is_dir):
                if text is None:  # its new characters: the bytes left once those seen are deleted
                    new = np.unique(np.frombuffer(data.translate(None, seen_ascii), dtype=np.uint8))
                else:
                    points = _points(data, text)
                    new = np.unique(points[~seen[points]])
                if len(new):
                    seen[new] = True
                    added.append(new)
                    seen_ascii = np.flatnonzero(seen[:128]).astype(np.uint8).tobytes()
                if hasher is not None:
                    hasher.update(data)
                tokens += len(data) if text is None else len(text)
                size += len(data)
                bar.update(len(data))
        except _NotText as err:
            for new in added:
                seen[new] = False
            seen_ascii = np.flatnonzero(seen[:128]).astype(np.uint8).tobytes()
            if not is_dir:
                name = "the packaged Tiny Shakespeare" if corpus.kind == "package" else f"corpus file {file.name}"
                if err.offset < 0:
                    raise LitGPTCharError(f"cannot read {name}: {err.what}") from None
                where = "invalid byte" if "invalid" in err.what else "NUL byte"
                raise LitGPTCharError(
                    f"{name} is not UTF-8 text ({where} at offset {err.offset}); "
                    f"pass a UTF-8 text file with --data.path"
                ) from None
            if corpus.strict:
                raise LitGPTCharError(
                    f"file {file.name} in corpus directory {corpus.root} is not UTF-8 text: {err} "
                    f"(--data.strict true; without it, such files are skipped)"
                ) from None
            scan.skipped.append((file.name, str(err)))
            continue
        scan.files.append(file)
        scan.tokens += tokens
        scan.bytes += size
    if len(scan.files) > 1:
        seen[[ord(c) for c in corpus.separator]] = True
        scan.tokens += len(corpus.separator) * (len(scan.files) - 1)
    if is_dir and not scan.files:
        shown = "; ".join(f"{name}: {why}" for name, why in scan.skipped[:3])
        raise LitGPTCharError(
            f"none of the {len(corpus.files)} files under corpus directory {corpus.root} is UTF-8 text ({shown})"
        )
    if hasher is not None and (got := hasher.hexdigest()) != corpus.sha256:
        fix = "reinstall lit_gpt_char" if corpus.kind == "package" else "delete it to download it again"
        raise LitGPTCharError(
            f"{corpus.label} has sha256 {got}, expected {corpus.sha256}: it is damaged or not the expected text; "
            f"{fix}, or pass --data.path FILE for your own text"
        )
    if scan.tokens == 0:
        where = f"corpus file {corpus.root}" if corpus.kind != "directory" else f"corpus directory {corpus.root}"
        raise LitGPTCharError(f"{where} is empty; pass a UTF-8 text file with --data.path")
    scan.chars = np.flatnonzero(seen)
    return scan


def _tokenize(corpus: Corpus, ids_path: Path) -> tuple[_Scan, str, np.dtype]:
    """Both passes, ``ids_path`` written; what was read, the vocabulary and the dtype of the ids."""
    total = 2 * sum(f.version[0] for f in corpus.files)
    with tqdm(
        total=total, desc=f"tokenizing {corpus.label}", unit="B", unit_scale=True, leave=False, disable=None
    ) as bar:
        scan = _scan(corpus, bar)
        n = len(scan.chars)
        table = np.zeros(0x110000, dtype=np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.int32)
        table[scan.chars] = np.arange(n)
        separator = (corpus.separator.encode("utf-8"), None if corpus.separator.isascii() else corpus.separator)
        try:
            with open(ids_path, "wb") as out:
                for i, file in enumerate(scan.files):
                    if i:
                        out.write(_encode(*separator, table))
                    for data, text in _chunks(file, corpus.kind == "package", forbid_nul=False):
                        out.write(_encode(data, text, table))
                        bar.update(len(data))
                if out.tell() != scan.tokens * table.itemsize:  # a file grew or shrank since pass 1
                    raise _NotText(-1, "changed")
        except _NotText:
            raise LitGPTCharError(f"{corpus.label} changed while it was being tokenized; run again") from None
    return scan, "".join(map(chr, scan.chars.tolist())), table.dtype


# ---- the cache ----


class TokenStore:
    """A built cache entry, its ids memory-mapped (copy-on-write: nothing is ever written back).

    Reading a window faults its pages into the process (the kernel maps pages around each one), so the
    resident part of the map grows with the windows read; :meth:`release` lets it go (the pages stay in
    the page cache), which keeps a run's memory the same whatever the corpus size.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory, self.meta = directory, meta
        self.vocab: str = meta["vocab"]
        self.ids_path = directory / IDS
        with open(self.ids_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written back
            self.inode = os.fstat(f.fileno()).st_ino  # of the file mapped (a later rebuild replaces the name)
        self.ids: torch.Tensor = torch.from_numpy(np.frombuffer(self._map, dtype=meta["dtype"], count=meta["tokens"]))

    def release(self) -> None:
        """Drop the map's pages from this process (they are read again from the page cache when needed)."""
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def make_dirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; the ones this call created, deepest first."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def _locked(entry: Path, say: Say) -> Iterator[list[Path]]:
    """Hold the entry's lock (making the entry first); yields the folders made for it, deepest first.

    A build that gives up (the corpus is unusable) removes the entry while it holds the lock; a process
    waiting for it then finds the folder gone and starts over.
    """
    while True:
        created = make_dirs(entry)
        lock = FileLock(entry / LOCK)
        try:
            with warnings.catch_warnings():  # without flock, filelock falls back to a lock file: fine here
                warnings.filterwarnings("ignore", "flock not supported", UserWarning)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    say(f"waiting for another process that is preparing the corpus cache {entry}")
                    lock.acquire()
        except FileNotFoundError:
            continue
        try:
            yield created
            return
        finally:
            lock.release()


def _remove_temporaries(entry: Path) -> None:
    """Those of builds that died (killed while tokenizing): only the holder of the lock writes any."""
    for path in entry.glob(f"*{TMP}*"):
        path.unlink(missing_ok=True)


def _read_valid(entry: Path, corpus: Corpus) -> tuple[Optional[dict], Optional[str]]:
    """(metadata, None) for a usable cache; (None, why) otherwise, why None when nothing is damaged."""
    meta_path, ids_path = entry / META, entry / IDS
    if not meta_path.exists():
        return None, (f"has {IDS} but no {META}" if ids_path.exists() else None)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        itemsize, tokens = np.dtype(meta["dtype"]).itemsize, int(meta["tokens"])
        if meta["fingerprint"] != corpus.fingerprint:
            return None, None  # the corpus changed (or the cache's format)
    except (ValueError, KeyError, TypeError, OSError):
        return None, f"has unreadable metadata ({META})"
    try:
        size = ids_path.stat().st_size
    except FileNotFoundError:
        return None, f"has {META} but no {IDS}"
    if size != tokens * itemsize or tokens == 0:
        expected = f"{tokens:,} × {itemsize} = {tokens * itemsize:,}"
        return None, f"is damaged: {IDS} has {size:,} bytes, its metadata says {expected}"
    return meta, None


def _build(corpus: Corpus, entry: Path, changed: bool, say: Say) -> dict:
    start = time.perf_counter()
    try:
        scan, vocab, dtype = _tokenize(corpus, entry / (IDS + TMP))
        seconds = time.perf_counter() - start
        meta = {
            "fingerprint": corpus.fingerprint,
            "source": str(corpus.root),
            "files": len(scan.files),
            "skipped": scan.skipped,
            "bytes": scan.bytes,
            "tokens": scan.tokens,
            "dtype": dtype.name,
            "vocab": vocab,
            "sha256": corpus.sha256,
        }
        # metadata out, ids in, metadata in: at every instant, either no metadata or a matching pair
        (entry / (META + TMP)).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (entry / META).unlink(missing_ok=True)
        os.replace(entry / (IDS + TMP), entry / IDS)
        os.replace(entry / (META + TMP), entry / META)
    finally:
        _remove_temporaries(entry)
    mb, kept = scan.bytes / 1e6, len(scan.files)
    files = f"{kept:,} file{'s' * (kept != 1)}, " if corpus.kind == "directory" else ""
    why = " again (the corpus changed since it was cached)" if changed else ""
    say(
        f"tokenized {corpus.label}{why}: {files}{mb:,.1f} MB in {seconds:.2f} s ({mb / max(seconds, 1e-9):,.0f} MB/s), "
        f"{scan.tokens:,} characters, vocabulary {len(vocab):,}, {dtype.name} ids in {entry}"
    )
    if scan.skipped:
        shown = ", ".join(f"{name} ({why})" for name, why in scan.skipped[:3])
        more = f" and {len(scan.skipped) - 3} more" if len(scan.skipped) > 3 else ""
        say(
            f"skipped {len(scan.skipped)} of {len(corpus.files)} files under {corpus.root} that are not UTF-8 text: "
            f"{shown}{more}; --data.strict true makes this an error"
        )
    return meta


def open_store(corpus: Corpus, cache_dir: Path, say: Say = SAY) -> TokenStore:
    """The token store of ``corpus`` in ``cache_dir``: reused when its fingerprint matches, else (re)built."""
    entry = cache_dir / corpus.key
    try:
        with _locked(entry, say) as created:
            try:
                _remove_temporaries(entry)
                meta, damaged = _read_valid(entry, corpus)
                if meta is None:
                    if damaged:
                        say(f"corpus cache {entry} {damaged}: rebuilding it")
                    meta = _build(corpus, entry, (entry / META).exists() and not damaged, say)
                return TokenStore(entry, meta)
            except BaseException:
                if not (entry / META).exists():  # nothing built (the corpus is unusable): leave no trace
                    with contextlib.suppress(OSError):
                        (entry / LOCK).unlink(missing_ok=True)
                        for d in created:
                            d.rmdir()
                raise
    except OSError as err:  # not writable, full, or without file locks (NFS without its lock service)
        raise LitGPTCharError(
            f"cannot use the corpus cache {entry}: {err.strerror or err}; "
            f"pass --data.cache_dir DIR (a writable folder with room, on a local disk)"
        ) from None
