"""The registry of record in a directory: one host's disk, or a volume shared by several hosts.

Layout under the root:
- `<domain>/<version:06d>.safetensors`: a version's bundle; `<version:06d>.dropped` beside it marks
  it dropped (rollback, delete). A version number is claimed by hard-linking a fully written and
  fsynced temporary file to its final name: `link` fails when the name exists, so two processes can
  never store the same version, and a version is never visible half-written.
- `.journal/<seq:012d>`: one file per change, holding the domain's name, claimed the same way.
  A process notices changes by looking for the next sequence number (one `stat`), without listing
  the domains. The oldest entries are trimmed; a process that fell that far behind resyncs fully.
- `.flags/<flag>/<domain>`: per-domain flags (pinned, unloaded); `.usage.json`: images classified per domain (a hint, merged by
  read-modify-write, so concurrent writers may lose a few counts).
- `.<marker>`: one-time markers (e.g. `.demo-seeded`).
- `.<name>.<random>.tmp`: a write in progress. A process killed mid-write leaves it behind; it is
  never read, and `sweep_temporaries` removes it once it is older than `STALE_TMP_S`.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import json
import logging
import os
import pathlib
import time
import uuid

from model.names import DOMAIN_NAME, check_domain_name
from model.safetensors_io import atomic_write_bytes
from service.record.base import FLAGS, DomainExists, RecordStore, RecordUnavailable, Version

_log = logging.getLogger(__name__)
SUFFIX, DROPPED = ".safetensors", ".dropped"
JOURNAL, FLAG_DIR, USAGE = ".journal", ".flags", ".usage.json"
JOURNAL_KEEP = 10_000  # entries kept; older ones are trimmed
STALE_TMP_S = 60.0  # a temporary file older than this was left by a crash (writes take milliseconds)


@contextlib.contextmanager
def _reachable(root: pathlib.Path):
    """Turn a vanished or failing volume into `RecordUnavailable` (a missing domain folder is not that)."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        if not root.is_dir():
            raise RecordUnavailable(f"The store directory {root} is not there (is the volume mounted?).") from None
        raise
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EROFS, errno.ENOSPC, errno.EACCES):
            raise RecordUnavailable(f"The store directory {root} cannot be used: {exc}.") from None
        raise


def _link_exclusive(data: bytes, target: pathlib.Path) -> bool:
    """Write `data` to a temporary file beside `target`, fsync it, and hard-link it to `target`.

    Returns False (and leaves nothing behind) when `target` already exists.
    """
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


class DirectoryRecord(RecordStore):
    def __init__(self, root: pathlib.Path, poll_interval_s: float = 0.05):
        self.root, self.poll_interval_s = pathlib.Path(root), poll_interval_s
        self.description = f"directory {self.root}"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / JOURNAL).mkdir(exist_ok=True)
        for flag in FLAGS:
            (self.root / FLAG_DIR / flag).mkdir(parents=True, exist_ok=True)
        self._seq_hint = 0
        self._names_cache: tuple[int, list[str]] = (-1, [])  # (root's mtime_ns, sorted domain folder names)
        self._sweep_after: str | None = None  # the last domain folder swept (see sweep_temporaries)

    @staticmethod
    def _remove_stale_temporaries(folder: pathlib.Path) -> int:
        """Remove the temporary files of writes that crashed in `folder` (other processes' running
        writes are younger than `STALE_TMP_S`); returns how many."""
        now, removed = time.time(), 0
        for leftover in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > STALE_TMP_S:
                    _log.warning("removing %s, left by an interrupted write", leftover)
                    leftover.unlink()
                    removed += 1
        return removed

    def sweep_temporaries(self, limit: int | None = None) -> int:
        """Remove crashed writes' temporary files: in the store's own folders and in every domain folder,
        or in the next `limit` of them after those the last sweep reached (a round, then again)."""
        with _reachable(self.root):
            folders = [self.root, self.root / JOURNAL, *(self.root / FLAG_DIR / flag for flag in FLAGS)]
            names = self._names()
            if limit is None:
                chosen = names
            else:
                start = bisect.bisect_right(names, self._sweep_after) if self._sweep_after is not None else 0
                chosen = names[start : start + limit]
                self._sweep_after = chosen[-1] if chosen and start + len(chosen) < len(names) else None
            return sum(self._remove_stale_temporaries(f) for f in [*folders, *(self.root / n for n in chosen)])

    # ----- reading ---------------------------------------------------------------------------

    def _folder(self, domain: str) -> pathlib.Path:
        return self.root / check_domain_name(domain)

    def _numbers(self, folder: pathlib.Path) -> tuple[set[int], set[int]]:
        """(stored, dropped) version numbers in a domain's folder."""
        stored, dropped = set(), set()
        for name in os.listdir(folder):
            stem, dot, suffix = name.partition(".")
            if stem.isdigit() and dot:
                (stored if f".{suffix}" == SUFFIX else dropped if f".{suffix}" == DROPPED else set()).add(int(stem))
        return stored, dropped

    def _live(self, domain: str) -> list[int]:
        folder = self._folder(domain)
        with _reachable(self.root):
            try:
                stored, dropped = self._numbers(folder)
            except (FileNotFoundError, NotADirectoryError):
                if not self.root.is_dir():
                    raise
                return []
        return sorted(stored - dropped)

    def _names(self) -> list[str]:
        """Folder names that are domain names, sorted (other folders, e.g. lost+found, are ignored).

        Rescanned only when the root's mtime changes (a folder added or removed): listing a page
        of 100,000 domains then costs a bisection and a look into each listed folder."""
        with _reachable(self.root):
            mtime = os.stat(self.root).st_mtime_ns
            if mtime != self._names_cache[0]:
                names = sorted(
                    e.name
                    for e in os.scandir(self.root)
                    if not e.name.startswith(".") and DOMAIN_NAME.fullmatch(e.name) and e.is_dir()
                )
                self._names_cache = (mtime, names)
            return self._names_cache[1]

    def heads(self, domains) -> dict[str, int]:
        heads = {}
        for domain in domains:
            live = self._live(domain)
            if live:
                heads[domain] = live[-1]
        return heads

    def list_domains(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, int]]:
        names = self._names()
        start = bisect.bisect_left(names, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(names, after))
        found = []
        for name in itertools.islice(names, start, None):
            if not name.startswith(prefix):
                break
            live = self._live(name)
            if live:
                found.append((name, live[-1]))
                if len(found) >= limit:
                    break
        return found

    def live_versions(self, domain: str) -> list[Version]:
        versions = []
        for number in self._live(domain):
            path = self._folder(domain) / f"{number:06d}{SUFFIX}"
            with contextlib.suppress(FileNotFoundError), _reachable(self.root):
                st = path.stat()
                versions.append(Version(domain, number, st.st_size, st.st_mtime))
        return versions

    def read(self, domain: str, version: int) -> bytes:
        folder = self._folder(domain)
        with _reachable(self.root):
            if (folder / f"{version:06d}{DROPPED}").exists():
                raise KeyError(f"{domain} v{version} was dropped")
            try:
                return (folder / f"{version:06d}{SUFFIX}").read_bytes()
            except FileNotFoundError:
                raise KeyError(f"{domain} v{version} is not stored") from None

    # ----- writing ---------------------------------------------------------------------------

    def add(self, domain: str, data: bytes, replace: bool) -> Version:
        folder = self._folder(domain)
        with _reachable(self.root):
            folder.mkdir(exist_ok=True)
            self._remove_stale_temporaries(folder)
            while True:
                stored, dropped = self._numbers(folder)
                if stored - dropped and not replace:
                    raise DomainExists(
                        f"Domain {domain!r} exists (version {max(stored - dropped)}); "
                        "send replace=true to upload a new version."
                    )
                number = max(stored | dropped, default=0) + 1
                if _link_exclusive(data, folder / f"{number:06d}{SUFFIX}"):
                    break
                if not replace:  # another process claimed this domain's next version first
                    raise DomainExists(
                        f"Domain {domain!r} was registered concurrently; send replace=true to upload a new version."
                    )
            self._announce(domain)
        return Version(domain, number, len(data), time.time())

    def _drop(self, domain: str, numbers: list[int]) -> None:
        folder = self._folder(domain)
        for number in numbers:  # the marker first: a crash in between leaves the version dropped
            atomic_write_bytes(folder / f"{number:06d}{DROPPED}", b"")
            (folder / f"{number:06d}{SUFFIX}").unlink(missing_ok=True)

    def drop_after(self, domain: str, version: int) -> None:
        with _reachable(self.root):
            self._drop(domain, [v for v in self._live(domain) if v > version])
            self._announce(domain)

    def delete(self, domain: str) -> bool:
        with _reachable(self.root):
            live = self._live(domain)
            if not live:
                return False
            self._drop(domain, live)
            for flag in FLAGS:
                (self.root / FLAG_DIR / flag / domain).unlink(missing_ok=True)
            self._announce(domain)
        return True

    # ----- the journal -----------------------------------------------------------------------

    def _journal_max(self) -> int:
        return max((int(n) for n in os.listdir(self.root / JOURNAL) if n.isdigit()), default=0)

    def _announce(self, domain: str) -> None:
        journal = self.root / JOURNAL
        seq = self._seq_hint + 1 if self._seq_hint else self._journal_max() + 1
        while True:
            while (journal / f"{seq:012d}").exists():  # others wrote since: skip cheaply
                seq += 1
            if _link_exclusive(domain.encode(), journal / f"{seq:012d}"):
                break
        self._seq_hint = seq
        (journal / f"{seq - JOURNAL_KEEP:012d}").unlink(missing_ok=True)

    def changes(self, cursor: object, timeout: float) -> tuple[object, set[str] | None]:
        journal = self.root / JOURNAL
        with _reachable(self.root):
            if cursor is None:
                return self._journal_max(), None
            seq, changed = int(cursor), set()
            deadline = time.monotonic() + timeout
            while True:
                while True:
                    try:
                        changed.add((journal / f"{seq + 1:012d}").read_text())
                    except FileNotFoundError:
                        break
                    seq += 1
                if changed or time.monotonic() >= deadline:
                    break
                time.sleep(self.poll_interval_s)
            if not changed and not journal.is_dir():
                raise RecordUnavailable(f"The store directory {self.root} lost its journal (is the volume mounted?).")
            self._seq_hint = max(self._seq_hint, seq)
            return seq, changed

    # ----- flags and usage --------------------------------------------------------------------

    def flagged(self, flag: str) -> set[str]:
        with _reachable(self.root):
            return {name for name in os.listdir(self.root / FLAG_DIR / flag) if DOMAIN_NAME.fullmatch(name)}

    def set_flag(self, domain: str, flag: str, on: bool) -> None:
        path = self.root / FLAG_DIR / flag / check_domain_name(domain)
        with _reachable(self.root):
            if on:
                atomic_write_bytes(path, b"")
            else:
                path.unlink(missing_ok=True)
            self._announce(domain)

    def _usage(self) -> dict[str, int]:
        try:
            usage = json.loads((self.root / USAGE).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: int(v) for k, v in usage.items() if isinstance(v, int)} if isinstance(usage, dict) else {}

    def add_usage(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        with _reachable(self.root):
            usage = self._usage()
            for domain, n in counts.items():
                usage[domain] = usage.get(domain, 0) + n
            atomic_write_bytes(self.root / USAGE, json.dumps(usage).encode())

    def top_used(self, n: int) -> list[str]:
        with _reachable(self.root):
            usage = self._usage()
        ranked = sorted(usage, key=lambda d: -usage[d])
        return list(itertools.islice((d for d in ranked if DOMAIN_NAME.fullmatch(d) and self._live(d)), n))

    # ----- markers ---------------------------------------------------------------------------

    def has_marker(self, name: str) -> bool:
        with _reachable(self.root):
            return (self.root / f".{name}").exists()

    def set_marker(self, name: str) -> None:
        with _reachable(self.root):
            atomic_write_bytes(self.root / f".{name}", b"")
