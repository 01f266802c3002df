"""Corpus → token store: character ids tokenized once, in a stream, cached on disk and memory-mapped.

    a file, a folder of files, or the packaged Tiny Shakespeare
      ──fixed-size byte chunks, one pass──▶ provisional ids (ASCII byte = its own id; any other character
                                            numbered from 128 in order of first appearance) ▶ ids.bin.tmp
      ──renumber in place through a lookup table──▶ sorted-vocabulary ids (uint8 / uint16 / int32)
      ──rename──▶ <cache_dir>/<name>-<key>/ids.bin + meta.json  (vocabulary, dtype, count, fingerprint)
    a later run: fingerprint unchanged ─▶ np.memmap(ids.bin): no tokenizing, memory independent of size

A pure-ASCII chunk is never decoded: its bytes are its provisional ids, and the characters it adds to
the vocabulary are found with one ``bytes.translate`` (delete the ones already seen). Other chunks go
through code points and a lookup table. The renumbering pass reads the id file back in chunks, so the
memory of a build is a few chunks whatever the corpus size.

The ids are those of ``CharTokenizer.from_text`` on the whole text: ids index the sorted vocabulary.

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
import gzip
import hashlib
import json
import mmap
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
import torch
from filelock import FileLock, Timeout

from lit_gpt_char.errors import LitGPTCharError

FORMAT = 1  # bump when the cache layout or the ids change meaning: older caches are rebuilt
CHUNK = 256 << 10  # bytes read (and ids written) at a time: small enough to stay in the CPU cache (2-3× faster
# than 8 MiB here) and to keep the memory of a build small; small files are joined up to this size
IDS, META, LOCK, TMP = "ids.bin", "meta.json", "lock", ".tmp"

PACKAGED_TINY_SHAKESPEARE = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt.gz"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


# ---- what to tokenize ----


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # as shown in messages: the path, or the path relative to a corpus directory
    size: int
    version: tuple[int, int, int] = (0, 0, 0)  # modification time, status change time, inode (ns, ns, number)
    compressed: bool = False  # gzip (the packaged corpus)


def _source(path: Path, name: str, st: os.stat_result) -> SourceFile:
    return SourceFile(path, name, st.st_size, (st.st_mtime_ns, st.st_ctime_ns, st.st_ino))


@dataclass
class Corpus:
    """The files of a corpus, in order; their texts joined with ``separator`` make the token stream."""

    kind: str  # "file" | "directory" | "package"
    root: Path
    files: list[SourceFile]
    separator: str = "\n"
    glob: Optional[str] = None
    sha256: Optional[str] = None  # expected sha256 of the text (a single file or the packaged corpus)
    strict: bool = False  # directory: a file that is not UTF-8 text is an error instead of being skipped
    _fingerprint: Optional[str] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.kind == "package":
            return "Tiny Shakespeare (packaged)"
        return f"{self.kind} {self.root}"

    @property
    def key(self) -> str:
        """The cache entry's name: what the corpus is (not its contents, which the fingerprint covers)."""
        if self.kind == "package":
            spec = ["package", self.sha256]
            stem = "tinyshakespeare"
        else:
            spec = [self.kind, str(self.root.resolve()), self.glob, self.separator, self.sha256]
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.root.name)[:40] or "corpus"
        return f"{stem}-{hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]}"

    @property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed or rewritten (see the module's docstring)."""
        if self._fingerprint is None:
            if self.kind == "package":  # verified against its sha256 when tokenized
                listing: list = ["package", self.sha256]
            else:
                files = [[f.name, f.size, *f.version] for f in self.files]
                listing = [FORMAT, self.kind, str(self.root.resolve()), self.glob, self.separator, self.sha256, files]
            self._fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return self._fingerprint


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise LitGPTCharError(
            f"corpus path {path} does not exist; pass --data.path a text file or a folder of them"
        ) from None
    except OSError as err:
        raise LitGPTCharError(f"cannot read corpus path {path}: {err.strerror}") from None


def single_file(path: Path, sha256: Optional[str] = None) -> Corpus:
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):  # a pipe is read once (or waits for a writer forever), /dev/zero never ends
        raise LitGPTCharError(
            f"corpus file {path} is not a regular file (a pipe or a device can be read only once, or never ends); "
            f"write it to a file first, e.g. cat a.txt b.txt > corpus.txt, and pass --data.path corpus.txt"
        )
    if st.st_size == 0:
        raise LitGPTCharError(f"corpus file {path} is empty; pass a UTF-8 text file with --data.path")
    return Corpus("file", path, [_source(path, str(path), st)], sha256=sha256)


def packaged_tiny_shakespeare() -> Corpus:
    path = PACKAGED_TINY_SHAKESPEARE
    if not path.is_file():
        raise LitGPTCharError(
            f"the packaged Tiny Shakespeare ({path}) is missing: reinstall lit_gpt_char, "
            f"or pass --data.path FILE to train on a local text file"
        )
    files = [SourceFile(path, path.name, path.stat().st_size, compressed=True)]
    return Corpus("package", path, files, sha256=TINY_SHAKESPEARE_SHA256)


def tiny_shakespeare_text() -> str:
    """The packaged Tiny Shakespeare (1,115,394 characters), decompressed and checked against its sha256."""
    data = gzip.decompress(packaged_tiny_shakespeare().root.read_bytes())
    if hashlib.sha256(data).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise LitGPTCharError(f"the packaged Tiny Shakespeare ({PACKAGED_TINY_SHAKESPEARE}) is damaged: reinstall")
    return data.decode("utf-8")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over paths relative to the corpus directory: ``*`` and ``?`` stay within one folder, ``**``
    spans folders, ``[...]`` is a class. A pattern without ``/`` matches file names at any depth."""
    pattern = pattern.strip("/")
    if "/" not in pattern and not pattern.startswith("**"):
        pattern = "**/" + pattern
    out, i, n = [], 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body[0] == "!" else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def directory(
    root: Path, glob: Optional[str] = None, separator: str = "\n", strict: bool = False, exclude: Optional[Path] = None
) -> Corpus:
    """Every regular file under ``root`` (recursively; names starting with "." skipped, as are ``exclude``
    and what is under it), sorted by relative path, those matching ``glob`` if given."""
    root_real = root.resolve()
    skip_dir: Optional[str] = None
    if exclude is not None:
        with contextlib.suppress(ValueError):
            skip_dir = exclude.resolve().relative_to(root_real).as_posix()
    matches = glob_regex(glob).match if glob else None
    found: list[tuple[tuple[str, ...], SourceFile]] = []
    listed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (rel_dir / d).as_posix() != skip_dir]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            try:
                st = path.stat()  # follows a link to a file
            except OSError:
                continue  # a dangling link
            if not stat.S_ISREG(st.st_mode):
                continue
            listed += 1
            rel = (rel_dir / name).as_posix()
            if matches is None or matches(rel):
                found.append((tuple(rel.split("/")), _source(path, rel, st)))
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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(file: BinaryIO, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = file.write(view)
        view = view[written:]


class _IdWriter:
    """Writes provisional ids as characters arrive and renumbers them into sorted-vocabulary ids at the end.

    Provisional id of an ASCII character: its byte. Of any other: 128 + the order of its first
    appearance. The file starts as uint8 and is widened (rewritten once) if provisional ids outgrow it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed in close())
        self.dtype = np.dtype(np.uint8)
        self.tokens = 0
        self.table = np.full(0x110000, -1, dtype=np.int32)  # code point → provisional id
        self.ascii_seen = bytearray()
        self.others: list[int] = []  # code points of provisional ids 128, 129, ...

    def close(self) -> None:
        self.file.close()

    def _add(self, points: list[int]) -> None:
        for c in points:
            if c < 128:
                self.table[c] = c
                self.ascii_seen.append(c)
            else:
                self.table[c] = 128 + len(self.others)
                self.others.append(c)
        top = 127 + len(self.others)
        if top > np.iinfo(self.dtype).max:
            self._widen(np.dtype(np.uint16) if top <= 0xFFFF else np.dtype(np.int32))

    def _widen(self, dtype: np.dtype) -> None:
        wider = self.path.with_name(self.path.name + "w")
        self.file.seek(0)
        with open(wider, "wb", buffering=0) as out:
            while len(block := np.fromfile(self.file, dtype=self.dtype, count=CHUNK)):
                _write_all(out, block.astype(dtype))
        self.file.close()
        os.replace(wider, self.path)
        self.file = open(self.path, "r+b", buffering=0)  # noqa: SIM115
        self.file.seek(0, os.SEEK_END)
        self.dtype = dtype

    def ascii(self, data: bytes) -> None:
        """Append pure-ASCII text (bytes)."""
        new = data.translate(None, self.ascii_seen)  # the characters not seen before, if any
        if new:
            self._add(np.flatnonzero(np.bincount(np.frombuffer(new, dtype=np.uint8))).tolist())
        if self.dtype.itemsize == 1:
            _write_all(self.file, data)
        else:
            _write_all(self.file, np.frombuffer(data, dtype=np.uint8).astype(self.dtype))
        self.tokens += len(data)

    def text(self, text: str) -> None:
        """Append any text."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.intp)  # faster to index with
        ids = self.table[points]
        if len(ids) and ids.min() < 0:
            self._add(np.unique(points[ids < 0]).tolist())
            ids = self.table[points]
        _write_all(self.file, ids.astype(self.dtype, copy=False))
        self.tokens += len(points)

    def snapshot(self) -> tuple[int, int, int]:
        return self.tokens, len(self.ascii_seen), len(self.others)

    def rollback(self, snapshot: tuple[int, int, int]) -> None:
        """Forget everything appended since ``snapshot``: its ids and the characters it added."""
        tokens, n_ascii, n_others = snapshot
        for c in [*self.ascii_seen[n_ascii:], *self.others[n_others:]]:
            self.table[c] = -1
        del self.ascii_seen[n_ascii:], self.others[n_others:]
        self.tokens = tokens
        self.file.truncate(tokens * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)

    def finish(self) -> tuple[str, np.dtype]:
        """Renumber the file into ids of the sorted vocabulary; the vocabulary and the final dtype."""
        chars = sorted([*self.ascii_seen, *self.others])
        final = np.dtype(np.uint8 if len(chars) <= 256 else np.uint16 if len(chars) <= 65536 else np.int32)
        lut = np.zeros(max(256, 128 + len(self.others)), dtype=final)
        lut[self.table[np.array(chars, dtype=np.int64)]] = np.arange(len(chars), dtype=final)
        fd, size = self.file.fileno(), self.tokens * self.dtype.itemsize
        if self.dtype.itemsize == 1 and final.itemsize == 1:  # the common case: one translate per chunk
            table = lut[:256].tobytes()
            for pos in range(0, size, CHUNK):
                os.pwrite(fd, os.pread(fd, CHUNK, pos).translate(table), pos)
        elif self.dtype.itemsize == final.itemsize:
            step = CHUNK * self.dtype.itemsize
            for pos in range(0, size, step):
                os.pwrite(fd, lut[np.frombuffer(os.pread(fd, step, pos), dtype=self.dtype)].tobytes(), pos)
        else:  # provisional ids were wider than the final ones: write a new file
            narrower = self.path.with_name(self.path.name + "n")
            self.file.seek(0)
            with open(narrower, "wb", buffering=0) as out:
                while len(block := np.fromfile(self.file, dtype=self.dtype, count=CHUNK)):
                    _write_all(out, lut[block])
            self.file.close()
            os.replace(narrower, self.path)
            self.file = open(self.path, "r+b", buffering=0)  # noqa: SIM115
        return "".join(map(chr, chars)), final


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


@dataclass
class _Problem:
    offset: int
    what: str  # "an invalid UTF-8 byte" | "a NUL byte" | "unreadable (...)"

    def describe(self) -> str:
        return self.what if self.offset < 0 else f"{self.what} at byte offset {self.offset}"


def _check(data: bytes, forbid_nul: bool) -> tuple[bool, Optional[str], Optional[_Problem]]:
    """(is ASCII, the decoded text when not ASCII, the problem if ``data`` is not usable text)."""
    if data.isascii():
        if forbid_nul and (i := data.find(b"\0")) >= 0:
            return True, None, _Problem(i, "a NUL byte")
        return True, None, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return False, None, _Problem(err.start, "an invalid UTF-8 byte")
    if forbid_nul and (i := data.find(b"\0")) >= 0:
        return False, None, _Problem(i, "a NUL byte")
    return False, text, None


class _Progress:
    """One line: rewritten in place on a terminal; elsewhere (logs) a line every 10 s and the last one."""

    def __init__(self, label: str, total: int, say: Say) -> None:
        self.label, self.total, self.say = label, total, say
        self.start = self.last = time.perf_counter()
        self.tty = say is _say and sys.stdout.isatty()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e6
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        line = f"tokenizing {self.label}: {done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB{pct}, {rate:,.0f} MB/s"
        if self.tty:
            sys.stdout.write("\r" + line.ljust(100)[:100])
            sys.stdout.flush()
            self.shown = True
        else:
            self.say(line)

    def finish(self, line: str) -> None:
        if self.shown:
            sys.stdout.write("\r" + " " * 100 + "\r")
        self.say(line)


@dataclass
class _Build:
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, problem)
    bytes_in: int = 0


def _tokenize(corpus: Corpus, writer: _IdWriter, progress: _Progress) -> _Build:
    """Stream every file of ``corpus`` through ``writer``; files that are not UTF-8 text are skipped
    (directory) or an error (a single file, the packaged corpus, --data.strict)."""
    build = _Build()
    separator = corpus.separator.encode("utf-8")
    separator_text = None if separator.isascii() else corpus.separator
    is_dir = corpus.kind == "directory"
    hasher = hashlib.sha256() if corpus.sha256 is not None else None
    pending: list[tuple[bytes, Optional[str]]] = []  # small files (and separators) joined into one chunk
    pending_size, pending_ascii = 0, True

    def flush() -> None:
        nonlocal pending_size, pending_ascii
        if pending:
            if pending_ascii:
                writer.ascii(b"".join(data for data, _ in pending))
            else:  # each piece was decoded once already, when it was checked
                writer.text("".join(data.decode("ascii") if text is None else text for data, text in pending))
            pending.clear()
            pending_size, pending_ascii = 0, True

    def hold(data: bytes, text: Optional[str]) -> None:
        """Queue ``data`` (``text``: its decoded text, None when it is ASCII)."""
        nonlocal pending_size, pending_ascii
        pending.append((data, text))
        pending_size += len(data)
        pending_ascii = pending_ascii and text is None

    def bad(file: SourceFile, problem: _Problem) -> None:
        if not is_dir:
            name = "the packaged Tiny Shakespeare" if corpus.kind == "package" else f"corpus file {file.name}"
            if problem.offset < 0:  # "unreadable (why)"
                raise LitGPTCharError(f"cannot read {name}: {problem.what.removeprefix('unreadable (')[:-1]}")
            where = "invalid byte" if "invalid" in problem.what else "NUL byte"
            raise LitGPTCharError(
                f"{name} is not UTF-8 text ({where} at offset {problem.offset}); "
                f"pass a UTF-8 text file with --data.path"
            )
        if corpus.strict:
            raise LitGPTCharError(
                f"file {file.name} in corpus directory {corpus.root} is not UTF-8 text: {problem.describe()} "
                f"(--data.strict true; without it, such files are skipped)"
            )
        build.skipped.append((file.name, problem.describe()))

    for file in corpus.files:
        try:
            stream = gzip.open(file.path, "rb") if file.compressed else open(file.path, "rb", buffering=0)  # noqa: SIM115
        except OSError as err:
            bad(file, _Problem(-1, f"unreadable ({err.strerror})"))
            continue
        with stream:
            if not file.compressed and file.size <= CHUNK:  # a small file: read whole, joined with others
                try:
                    data = stream.read()
                except OSError as err:
                    bad(file, _Problem(-1, f"unreadable ({err.strerror})"))
                    continue
                _, text, problem = _check(data, forbid_nul=is_dir)
                if problem is not None:
                    bad(file, problem)
                    continue
                if hasher is not None:
                    hasher.update(data)
                if build.kept:
                    hold(separator, separator_text)
                hold(data, text)
                build.kept += 1
                build.bytes_in += len(data)
                if pending_size >= CHUNK:
                    flush()
                progress.update(build.bytes_in)
                continue
            # a large file: streamed in chunks; if it turns out not to be text, everything it added is undone
            flush()
            snapshot = writer.snapshot()
            if build.kept:
                hold(separator, separator_text)
            offset, carry, ok = 0, b"", True
            try:
                while True:
                    chunk = stream.read(CHUNK)
                    data = carry + chunk if carry else chunk
                    if not data:
                        break
                    carry = b""
                    if chunk and not data.isascii():
                        cut = _utf8_cut(data)
                        data, carry = data[:cut], data[cut:]
                    is_ascii, text, problem = _check(data, forbid_nul=is_dir)
                    if problem is not None:
                        problem.offset += offset
                        pending.clear()
                        writer.rollback(snapshot)
                        bad(file, problem)
                        ok = False
                        break
                    if hasher is not None:
                        hasher.update(data)
                    if pending:
                        hold(data, text)
                        flush()
                    elif is_ascii:
                        writer.ascii(data)
                    else:
                        writer.text(text)  # type: ignore[arg-type]
                    offset += len(data)
                    progress.update(build.bytes_in + offset)
                    if not chunk:
                        break
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                pending.clear()
                writer.rollback(snapshot)
                bad(file, _Problem(-1, f"unreadable ({getattr(err, 'strerror', None) or err})"))
                ok = False
            if ok:
                flush()
                build.kept += 1
                build.bytes_in += offset
    flush()

    if is_dir and build.kept == 0:
        shown = "; ".join(f"{name}: {why}" for name, why in build.skipped[:3])
        raise LitGPTCharError(
            f"none of the {len(corpus.files)} files under corpus directory {corpus.root} is UTF-8 text ({shown})"
        )
    if hasher is not None and (got := hasher.hexdigest()) != corpus.sha256:
        if corpus.kind == "package":
            raise LitGPTCharError(
                f"the packaged Tiny Shakespeare ({corpus.root}) has sha256 {got}, expected {corpus.sha256}: "
                f"it is damaged; reinstall lit_gpt_char, or pass --data.path FILE"
            )
        raise LitGPTCharError(
            f"corpus file {corpus.root} has sha256 {got}, expected {corpus.sha256}: it is not the expected "
            f"file or is damaged. Delete it to download again, or pass --data.path for your own text"
        )
    if writer.tokens == 0:
        where = f"corpus file {corpus.root}" if corpus.kind != "directory" else f"corpus directory {corpus.root}"
        raise LitGPTCharError(f"{where} is empty; pass a UTF-8 text file with --data.path")
    return build


# ---- the cache ----


class TokenStore:
    """A built cache entry, its ids memory-mapped (copy-on-write: nothing is ever written back).

    Reading a window faults its pages into the process (the kernel maps up to 64 KiB around each one),
    so the resident part of the map grows with the windows read; :meth:`release` lets it go (the pages
    stay in the page cache), which keeps a run's memory the same whatever the corpus size.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory = directory
        self.meta = meta
        self.vocab: str = meta["vocab"]
        self.dtype = np.dtype(meta["dtype"])
        self.tokens: int = meta["tokens"]
        self.ids_path = directory / IDS
        with open(self.ids_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written back
            self.inode = os.fstat(f.fileno()).st_ino  # of the file mapped (a later rebuild replaces the name)
        self.ids: torch.Tensor = torch.from_numpy(np.frombuffer(self._map, dtype=self.dtype, count=self.tokens))

    def release(self) -> None:
        """Drop the map's pages from this process (they are read again from the page cache when needed)."""
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


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
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected = int(meta["ids_bytes"])
        fingerprint, tokens = meta["fingerprint"], int(meta["tokens"])
    except (ValueError, KeyError, TypeError, OSError):
        return None, f"has unreadable metadata ({META})"
    if meta.get("format") != FORMAT:
        return None, None  # written by another version: rebuilt without alarm
    if fingerprint != corpus.fingerprint:
        return None, None  # the corpus changed
    try:
        size = ids_path.stat().st_size
    except FileNotFoundError:
        return None, f"has {META} but no {IDS}"
    if size != expected or expected != tokens * itemsize or tokens == 0:
        return None, f"is damaged: {IDS} has {size:,} bytes, its metadata says {tokens:,} × {itemsize} = {expected:,}"
    return meta, None


def _commit(entry: Path, ids_tmp: Path, meta: dict) -> None:
    """Metadata out, ids in, metadata in: at every instant, either no metadata or a matching pair."""
    meta_tmp = entry / (META + TMP)
    with open(meta_tmp, "w", encoding="utf-8") as out:
        json.dump(meta, out, ensure_ascii=True, indent=1)
        out.flush()
        os.fsync(out.fileno())
    (entry / META).unlink(missing_ok=True)
    os.replace(ids_tmp, entry / IDS)
    os.replace(meta_tmp, entry / META)
    _fsync_dir(entry)


def _build(corpus: Corpus, entry: Path, rebuilding: Optional[str], say: Say) -> dict:
    ids_tmp = entry / (IDS + TMP)
    total = sum(f.size for f in corpus.files)
    progress = _Progress(corpus.label, total, say)
    writer = _IdWriter(ids_tmp)
    try:
        build = _tokenize(corpus, writer, progress)
        vocab, dtype = writer.finish()
        writer.close()
        seconds = time.perf_counter() - progress.start
        meta = {
            "format": FORMAT,
            "fingerprint": corpus.fingerprint,
            "kind": corpus.kind,
            "source": str(corpus.root),
            "glob": corpus.glob,
            "separator": corpus.separator,
            "files": build.kept,
            "skipped": build.skipped,
            "bytes": build.bytes_in,
            "tokens": writer.tokens,
            "dtype": dtype.name,
            "ids_bytes": writer.tokens * dtype.itemsize,
            "vocab_size": len(vocab),
            "vocab": vocab,
            "sha256": corpus.sha256,
            "seconds": round(seconds, 3),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _commit(entry, ids_tmp, meta)
    finally:
        writer.close()
        _remove_temporaries(entry)
    mb = build.bytes_in / 1e6
    files = f"{build.kept:,} file{'s' * (build.kept != 1)}, " if corpus.kind == "directory" else ""
    why = " again (the corpus changed since it was cached)" if rebuilding == "changed" else ""
    progress.finish(
        f"tokenized {corpus.label}{why}: {files}{mb:,.1f} MB in {seconds:.2f} s ({mb / max(seconds, 1e-9):,.0f} MB/s), "
        f"{writer.tokens:,} characters, vocabulary {len(vocab):,}, {dtype.name} ids in {entry}"
    )
    if build.skipped:
        shown = ", ".join(f"{name} ({why})" for name, why in build.skipped[:3])
        more = f" and {len(build.skipped) - 3} more" if len(build.skipped) > 3 else ""
        say(
            f"skipped {len(build.skipped)} of {len(corpus.files)} files under {corpus.root} that are not UTF-8 text: "
            f"{shown}{more}; --data.strict true makes this an error"
        )
    return meta


def make_dirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; the ones this call created, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    path.mkdir(parents=True, exist_ok=True)
    return missing


def open_store(corpus: Corpus, cache_dir: Path, say: Say = _say) -> TokenStore:
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
                    changed = "changed" if (entry / META).exists() and not damaged else None
                    meta = _build(corpus, entry, changed, say)
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
