"""The registry of record in PostgreSQL (psycopg 3), for replicas on several hosts.

Tables (created idempotently at start, under an advisory lock, with a schema version):
- `ra_blobs(sha256, data, size)`: bundle bytes, content-addressed: stored once however many
  domains or versions use them, removed when no live version does.
- `ra_versions(domain, version, sha256, created_at, dropped_at)`: one row per version ever claimed;
  the primary key makes a (domain, version) unique, and dropped rows stay so that a number is never
  reused.
- `ra_flags(domain, flag)`: per-domain flags (pinned, unloaded); `ra_usage(domain, count)`: images classified (a warming hint);
  `ra_markers(name)`: one-time markers.

Every change runs in one transaction that also sends `NOTIFY ra_registry, '<domain>'`; PostgreSQL
delivers it only on commit, so a listener never hears of a change it cannot read yet. Changes of one
domain are serialised by a transaction-scoped advisory lock on its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from service.record.base import DomainExists, RecordStore, RecordUnavailable, Version

_log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
CHANNEL = "ra_registry"
SCHEMA_LOCK = 0x5241_0001  # advisory lock key for schema creation ("RA" 1)
CONNECT_TIMEOUT_S = 3
STATEMENT_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS ra_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS ra_blobs (
    sha256 text PRIMARY KEY,
    data bytea NOT NULL,
    size integer NOT NULL
);
CREATE TABLE IF NOT EXISTS ra_versions (
    domain text NOT NULL,
    version integer NOT NULL,
    sha256 text REFERENCES ra_blobs (sha256),
    created_at timestamptz NOT NULL DEFAULT now(),
    dropped_at timestamptz,
    PRIMARY KEY (domain, version),
    CHECK ((dropped_at IS NULL) = (sha256 IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS ra_versions_live ON ra_versions (domain, version) WHERE dropped_at IS NULL;
CREATE TABLE IF NOT EXISTS ra_markers (name text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ra_flags (domain text NOT NULL, flag text NOT NULL, PRIMARY KEY (domain, flag));
CREATE TABLE IF NOT EXISTS ra_usage (domain text PRIMARY KEY, count bigint NOT NULL);
"""


def _describe(url: str) -> str:
    """host:port/db of a connection string, without the user's password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"RA_REGISTRY_URL is not a valid PostgreSQL connection string: {exc}") from None
    return f"postgresql {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresRecord(RecordStore):
    def __init__(self, url: str):
        self.url = url
        self.description = _describe(url)
        self._lock = threading.Lock()  # one statement at a time on the shared connection
        self._conn: psycopg.Connection | None = None
        self._listener: psycopg.Connection | None = None
        self._schema_ready = False

    # ----- connections -----------------------------------------------------------------------

    def _connect(self, autocommit: bool) -> psycopg.Connection:
        return psycopg.connect(
            self.url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )

    @contextlib.contextmanager
    def _session(self):
        """The shared connection, checked (a server restart breaks it silently) and reconnected when
        needed; any database failure comes out as `RecordUnavailable`."""
        with self._lock:
            try:
                if self._conn is not None and not self._conn.closed:
                    try:
                        self._conn.execute("SELECT 1")
                    except psycopg.OperationalError:
                        self._conn.close()
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect(autocommit=True)
                    if not self._schema_ready:
                        self._create_schema(self._conn)
                        self._schema_ready = True
                yield self._conn
            except psycopg.OperationalError as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise RecordUnavailable(
                    f"The registry database ({self.description}) is unreachable: {message}"
                ) from None

    def _create_schema(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)
            row = conn.execute("SELECT max(version) FROM ra_schema").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO ra_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"The registry database has schema version {row[0]}, newer than this service's "
                    f"{SCHEMA_VERSION}: upgrade the service."
                )

    def close(self) -> None:
        for conn in (self._conn, self._listener):
            if conn is not None:
                conn.close()
        self._conn = self._listener = None

    # ----- reading ---------------------------------------------------------------------------

    def heads(self, domains) -> dict[str, int]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT domain, max(version) FROM ra_versions WHERE dropped_at IS NULL "
                "AND domain = ANY(%s) GROUP BY domain",
                (list(domains),),
            ).fetchall()
        return dict(rows)

    def list_domains(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, int]]:
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._session() as conn:
            rows = conn.execute(
                "SELECT domain, max(version) FROM ra_versions WHERE dropped_at IS NULL AND domain LIKE %s "
                "AND domain > %s GROUP BY domain ORDER BY domain LIMIT %s",
                (pattern, after or "", limit),
            ).fetchall()
        return [(d, v) for d, v in rows]

    def live_versions(self, domain: str) -> list[Version]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT v.version, b.size, extract(epoch FROM v.created_at) FROM ra_versions v "
                "JOIN ra_blobs b USING (sha256) WHERE v.domain = %s AND v.dropped_at IS NULL ORDER BY v.version",
                (domain,),
            ).fetchall()
        return [Version(domain, version, size, float(created)) for version, size, created in rows]

    def read(self, domain: str, version: int) -> bytes:
        with self._session() as conn:
            row = conn.execute(
                "SELECT b.data FROM ra_versions v JOIN ra_blobs b USING (sha256) "
                "WHERE v.domain = %s AND v.version = %s AND v.dropped_at IS NULL",
                (domain, version),
            ).fetchone()
        if row is None:
            raise KeyError(f"{domain} v{version} is not live")
        return bytes(row[0])

    # ----- writing ---------------------------------------------------------------------------

    def add(self, domain: str, data: bytes, replace: bool) -> Version:
        sha = hashlib.sha256(data).hexdigest()
        for attempt in range(3):
            try:
                with self._session() as conn, conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ra:{domain}",))
                    top, live = conn.execute(
                        "SELECT max(version), max(version) FILTER (WHERE dropped_at IS NULL) FROM ra_versions "
                        "WHERE domain = %s",
                        (domain,),
                    ).fetchone()
                    if live is not None and not replace:
                        raise DomainExists(
                            f"Domain {domain!r} exists (version {live}); send replace=true to upload a new version."
                        )
                    conn.execute(
                        "INSERT INTO ra_blobs (sha256, data, size) VALUES (%s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
                        (sha, data, len(data)),
                    )
                    version = (top or 0) + 1
                    created = conn.execute(
                        "INSERT INTO ra_versions (domain, version, sha256) VALUES (%s, %s, %s) "
                        "RETURNING extract(epoch FROM created_at)",
                        (domain, version, sha),
                    ).fetchone()[0]
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, domain))
                return Version(domain, version, len(data), float(created))
            except pg_errors.ForeignKeyViolation:  # the same bytes' blob was collected concurrently: again
                _log.info("retrying the registration of %s (attempt %d)", domain, attempt + 2)
        raise RecordUnavailable(f"Could not store {domain!r}: the registry kept changing under the write; retry.")

    def _drop(self, conn: psycopg.Connection, domain: str, where: str, params: tuple) -> int:
        """Drop the domain's live versions matching `where`; collect blobs nothing live uses any more."""
        shas = [
            row[0]
            for row in conn.execute(
                "WITH old AS (SELECT version, sha256 FROM ra_versions "
                f"            WHERE domain = %s AND dropped_at IS NULL {where} FOR UPDATE) "
                "UPDATE ra_versions v SET dropped_at = now(), sha256 = NULL FROM old "
                "WHERE v.domain = %s AND v.version = old.version RETURNING old.sha256",
                (domain, *params, domain),
            ).fetchall()
        ]
        if shas:
            try:
                with conn.transaction():  # a savepoint: a concurrent registration of the same bytes wins
                    conn.execute(
                        "DELETE FROM ra_blobs b WHERE b.sha256 = ANY(%s) "
                        "AND NOT EXISTS (SELECT 1 FROM ra_versions v WHERE v.sha256 = b.sha256)",
                        (shas,),
                    )
            except pg_errors.ForeignKeyViolation:
                _log.info("kept a blob of %s that a concurrent registration uses", domain)
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, domain))
        return len(shas)

    def drop_after(self, domain: str, version: int) -> None:
        with self._session() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ra:{domain}",))
            self._drop(conn, domain, "AND version > %s", (version,))

    def delete(self, domain: str) -> bool:
        with self._session() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ra:{domain}",))
            conn.execute("DELETE FROM ra_flags WHERE domain = %s", (domain,))
            return self._drop(conn, domain, "", ()) > 0

    # ----- changes ---------------------------------------------------------------------------

    def changes(self, cursor: object, timeout: float) -> tuple[object, set[str] | None]:
        try:
            if self._listener is None or self._listener.closed or self._listener.broken or cursor is None:
                if self._listener is not None:
                    self._listener.close()
                self._listener = self._connect(autocommit=True)
                self._listener.execute(f"LISTEN {CHANNEL}")
                return time.time(), None  # listening from now on: what came before needs a full resync
            changed = {n.payload for n in self._listener.notifies(timeout=timeout, stop_after=1)}
            if changed:  # take whatever else has already arrived, without waiting
                changed |= {n.payload for n in self._listener.notifies(timeout=0.001)}
            return time.time(), changed
        except psycopg.OperationalError as exc:
            if self._listener is not None:
                self._listener.close()
            self._listener = None
            raise RecordUnavailable(f"Lost the change feed of {self.description}: {str(exc).strip()[:200]}") from None

    # ----- flags and usage --------------------------------------------------------------------

    def flagged(self, flag: str) -> set[str]:
        with self._session() as conn:
            return {row[0] for row in conn.execute("SELECT domain FROM ra_flags WHERE flag = %s", (flag,)).fetchall()}

    def set_flag(self, domain: str, flag: str, on: bool) -> None:
        with self._session() as conn, conn.transaction():
            if on:
                conn.execute(
                    "INSERT INTO ra_flags (domain, flag) VALUES (%s, %s) ON CONFLICT DO NOTHING", (domain, flag)
                )
            else:
                conn.execute("DELETE FROM ra_flags WHERE domain = %s AND flag = %s", (domain, flag))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, domain))

    def add_usage(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        with self._session() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO ra_usage (domain, count) VALUES (%s, %s) ON CONFLICT (domain) "
                "DO UPDATE SET count = ra_usage.count + excluded.count",
                sorted(counts.items()),
            )

    def top_used(self, n: int) -> list[str]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT u.domain FROM ra_usage u WHERE EXISTS (SELECT 1 FROM ra_versions v "
                "WHERE v.domain = u.domain AND v.dropped_at IS NULL) ORDER BY u.count DESC, u.domain "
                "LIMIT %s",
                (n,),
            ).fetchall()
        return [row[0] for row in rows]

    # ----- markers ---------------------------------------------------------------------------

    def has_marker(self, name: str) -> bool:
        with self._session() as conn:
            return conn.execute("SELECT 1 FROM ra_markers WHERE name = %s", (name,)).fetchone() is not None

    def set_marker(self, name: str) -> None:
        with self._session() as conn:
            conn.execute("INSERT INTO ra_markers (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,))
