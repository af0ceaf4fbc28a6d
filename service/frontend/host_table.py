"""A fixed-size hash table of fixed-layout numeric records that every front end on a host shares.

With `--workers N` the kernel spreads connections over N front-end processes, so state that must be
counted once per host (a key's rate limit, the Open Inference Protocol's statistics) cannot live in
one process. It lives here instead: records of a numpy structured dtype in an mmap'd file, made at
its full size by the supervisor before any front end starts (or, without a file, in anonymous
memory for one process).

A key string hashes (blake2b, 64 bits; 0 means "empty") to a window of `window` slots. A lookup scans
the whole window; a key not there claims an empty slot, else the slot with the oldest `stamp` (its
record is re-initialised). Rows are never emptied, so there are no tombstones, and a table never
fills up: it forgets the least recently touched keys first, per window.

One lock guards the table: a `threading.Lock` in the process and, for a file, a POSIX record lock
(`fcntl.lockf`), which the kernel drops when its process dies, so a front end killed with -9 never
wedges the others (a multiprocessing lock would stay held). Record locks belong to the process, not
to the file object: open each file once per process. Stamps are `time.monotonic()` (CLOCK_MONOTONIC,
one clock for every process of the host).

Runs in every front-end process (and in the one process of `--workers 1`). The supervisor makes the tables' files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import mmap
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

MAGIC = b"RAHOSTTB"
VERSION = 1
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("window", "<u4"), ("slots", "<u8"), ("layout", "<u8")])
HEADER_BYTES = 64  # records start here (aligned for every field type)


class HostTableError(ValueError):
    """A table file cannot be used; the message says which file and what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a table holds: `dtype` (records with a uint64 `key` and a float64 `stamp`), `slots` of them,
    and the `window` of slots a key may use. Every process opening one file must use the same layout."""

    dtype: np.dtype
    slots: int
    window: int = 16

    def __post_init__(self) -> None:
        fields = self.dtype.fields or {}
        wanted = {"key": np.dtype("<u8"), "stamp": np.dtype("<f8")}
        wrong = sorted(name for name, kind in wanted.items() if name not in fields or fields[name][0] != kind)
        if wrong:
            raise ValueError(
                f"A host table's records need the fields key (uint64) and stamp (float64); missing or "
                f"of another type: {wrong}. Received: dtype={self.dtype}"
            )
        if not 1 <= self.window <= self.slots:
            raise ValueError(
                f"A host table needs 1 <= window <= slots. Received: window={self.window}, slots={self.slots}"
            )

    @property
    def fingerprint(self) -> int:
        """A hash of the record layout, so a file made for other records is refused even at the same size."""
        return int.from_bytes(hashlib.blake2b(repr(self.dtype.descr).encode(), digest_size=8).digest(), "little")

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.slots * self.dtype.itemsize

    def header(self) -> np.ndarray:
        return np.array([(MAGIC, VERSION, self.window, self.slots, self.fingerprint)], HEADER)


def key_hash(key: str) -> int:
    """The key's 64-bit hash; never 0, which marks an empty slot."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1


class HostTable:
    """`layout`'s records in the file at `path` (made by `HostTable.create`), or in this process's memory
    when `path` is None. Distinct keys whose 64-bit hashes are equal share a record (odds ~2^-64)."""

    def __init__(self, layout: Layout, path: str | os.PathLike | None = None):
        self.layout, self.path = layout, pathlib.Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._file: io.FileIO | None = None  # a file object rather than a bare descriptor: closed when collected
        self._map: mmap.mmap | None = None
        if self.path is None:
            self._rows = np.zeros(layout.slots, layout.dtype)
            return
        try:
            self._file = open(self.path, "r+b", buffering=0)  # noqa: SIM115  (held for the table's life; `close`)
        except OSError as exc:
            raise HostTableError(
                f"Host table {self.path}: cannot open it ({exc.strerror}); the supervisor makes it "
                "in its run directory before starting the front ends."
            ) from exc
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size != layout.file_bytes:
                raise HostTableError(
                    f"Host table {self.path} is {size} bytes, but {layout.slots} slots of {layout.dtype.itemsize}-byte "
                    f"records need {layout.file_bytes}: it was made for another layout or is damaged. Remove it and "
                    "make it again with HostTable.create (the supervisor does so on each start)."
                )
            self._map = mmap.mmap(self._file.fileno(), size)
            header, expected = self._map[: HEADER.itemsize], layout.header().tobytes()
            if header != expected:
                raise HostTableError(
                    f"Host table {self.path} was made for another layout (header {np.frombuffer(header, HEADER)[0]}, "
                    f"expected {layout.header()[0]}). Remove it and make it again with HostTable.create (the "
                    "supervisor does so on each start)."
                )
            self._rows = np.ndarray(layout.slots, layout.dtype, buffer=self._map, offset=HEADER_BYTES)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def create(path: str | os.PathLike, layout: Layout) -> None:
        """Write an empty table file at its full size, atomically (a temporary file renamed into place), so
        a process opening it never sees a short file."""
        path = pathlib.Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(layout.header().tobytes().ljust(HEADER_BYTES, b"\0"))
                out.truncate(layout.file_bytes)  # the records: zeros (every slot empty)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        self._rows = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> HostTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._file is None:
                yield
                return
            fcntl.lockf(self._file, fcntl.LOCK_EX, 1, 0)
            try:
                yield
            finally:
                fcntl.lockf(self._file, fcntl.LOCK_UN, 1, 0)

    def _window(self, hashed: int) -> np.ndarray:
        start = hashed % (self.layout.slots - self.layout.window + 1)
        return self._rows[start : start + self.layout.window]  # a view

    @contextlib.contextmanager
    def row(self, key: str, init: Callable[[np.void], None] | None = None) -> Iterator[np.void]:
        """The record of `key`, writable while the block runs, under the table's lock (keep the block short).

        A key without a record takes an empty slot of its window, else the one with the oldest stamp; that
        record is zeroed, given the key and `stamp = time.monotonic()`, then passed to `init`. The block
        should set `stamp` to `time.monotonic()` read inside it (under the lock, so stamps never go back):
        the stamp decides which record is replaced next."""
        hashed = key_hash(key)
        with self._locked():
            window = self._window(hashed)
            found = np.flatnonzero(window["key"] == hashed)
            if found.size:
                yield window[found[0]]
                return
            empty = np.flatnonzero(window["key"] == 0)
            slot = empty[0] if empty.size else int(np.argmin(window["stamp"]))
            window[slot] = 0
            record = window[slot]
            record["key"], record["stamp"] = hashed, time.monotonic()
            if init is not None:
                init(record)
            yield record

    def peek(self, key: str) -> np.void | None:
        """A copy of the record of `key`, or None when it has none (changes nothing)."""
        hashed = key_hash(key)
        with self._locked():
            window = self._window(hashed)
            found = np.flatnonzero(window["key"] == hashed)
            return window[found[0] : found[0] + 1].copy()[0] if found.size else None
