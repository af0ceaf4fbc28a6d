"""Training jobs in PostgreSQL, beside a fleet's registry of record: the same operations as
`training.jobs.DirectoryJobs`, for workers on several hosts.

One row a job: the job itself (`jsonb`), its state, the upload, the last checkpoint and the bundle
(`bytea`), the claim's token and heartbeat. A worker claims the oldest queued job, or a running one
whose heartbeat is older than the lease, with `SELECT ... FOR UPDATE SKIP LOCKED`: two workers never
get the same row, and neither waits for the other. Every write a worker makes names its claim's
token, so a worker that was taken over writes nothing more. Events are rows of their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time

import psycopg

from training.jobs import ENDED, STAGES, STATES, Claim, Job, JobNotFound, checked_upload

SCHEMA = """
CREATE TABLE IF NOT EXISTS ra_training_jobs (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    state text NOT NULL,
    job jsonb NOT NULL,
    upload bytea,
    checkpoint bytea,
    bundle bytea,
    claim_token text,
    heartbeat_at double precision,
    cancel_requested boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS ra_training_jobs_open ON ra_training_jobs (state, id);
CREATE TABLE IF NOT EXISTS ra_training_events (
    job_id text NOT NULL REFERENCES ra_training_jobs (id) ON DELETE CASCADE,
    seq bigserial,
    event jsonb NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


class PostgresJobs:
    """The job list in PostgreSQL at `url` (see the module's docstring)."""

    def __init__(self, url: str, lease_s: float = 30.0):
        self.url, self.lease_s = url, lease_s
        with self._connect() as conn:
            conn.execute(SCHEMA)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def _job(self, row) -> Job:
        job = Job(**row[0])
        job.state = row[1]
        return job

    # ----- the API's side -----------------------------------------------------------------------

    def submit(self, job: Job, upload: bytes) -> Job:
        job.upload_sha256, job.upload_bytes = hashlib.sha256(upload).hexdigest(), len(upload)
        job.created_at, job.state = time.time(), "queued"
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO ra_training_jobs (id, tenant, state, job, upload) VALUES (%s, %s, 'queued', %s, %s)",
                (job.id, job.tenant, json.dumps(dataclasses.asdict(job)), upload),
            )
        return job

    def get(self, job_id: str) -> Job:
        with self._connect() as conn:
            row = conn.execute("SELECT job, state FROM ra_training_jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._job(row)

    def page(self, tenant: str, after: str | None, count: int) -> list[Job]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT job, state FROM ra_training_jobs WHERE tenant = %s AND id > %s ORDER BY id LIMIT %s",
                (tenant, after or "", count),
            ).fetchall()
        return [self._job(row) for row in rows]

    def queued(self, tenant: str) -> int:
        with self._connect() as conn:
            return conn.execute(
                "SELECT count(*) FROM ra_training_jobs WHERE tenant = %s AND state = 'queued'", (tenant,)
            ).fetchone()[0]

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops at its worker's next step."""
        job = self.get(job_id)
        with self._connect() as conn:
            job.state, job.finished_at, job.reason = "cancelled", time.time(), "cancelled by request"
            done = conn.execute(
                "UPDATE ra_training_jobs SET state = 'cancelled', job = %s, upload = NULL, checkpoint = NULL "
                "WHERE id = %s AND (state = 'queued' OR (state = 'registering' AND claim_token IS NULL))",
                (json.dumps(dataclasses.asdict(job)), job_id),
            ).rowcount
            if not done:
                conn.execute(
                    "UPDATE ra_training_jobs SET cancel_requested = true WHERE id = %s AND state IN ('running', 'registering')",
                    (job_id,),
                )
        return self.get(job_id)

    def counts(self) -> dict[str, int]:
        """Jobs by state (the metrics' gauge)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT state, count(*) FROM ra_training_jobs GROUP BY state").fetchall()
        return {**dict.fromkeys(STATES, 0), **dict(rows)}

    def ended_between(self, since: float, until: float) -> list[Job]:
        """The jobs that ended in [since, until) (the metrics' histograms)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT job, state FROM ra_training_jobs WHERE state = ANY(%s) "
                "AND (job->>'finished_at')::double precision >= %s AND (job->>'finished_at')::double precision < %s",
                (list(ENDED), since, until),
            ).fetchall()
        return [self._job(row) for row in rows]

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        self.get(job_id)
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT event FROM ra_training_events WHERE job_id = %s ORDER BY seq OFFSET %s", (job_id, after)
            ).fetchall()
        return [row[0] for row in rows]

    def bundle(self, job_id: str) -> bytes:
        with self._connect() as conn:
            row = conn.execute("SELECT bundle FROM ra_training_jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None or row[0] is None:
            raise JobNotFound(job_id)
        return bytes(row[0])

    # ----- the worker's side --------------------------------------------------------------------

    def claim(self, worker: str, stage: str = "train") -> Claim | None:
        """The oldest job of `stage` (`training.jobs.STAGES`) that nobody holds, or whose holder stopped
        beating; None when there is none. A job claimed to train turns `running`."""
        token = f"{worker} {secrets.token_hex(8)}"
        now = time.time()
        with self._connect() as conn, conn.transaction():
            row = conn.execute(
                "SELECT id, job, state FROM ra_training_jobs WHERE state = ANY(%s) "
                "AND (claim_token IS NULL OR heartbeat_at < %s) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (list(STAGES[stage]), now - self.lease_s),
            ).fetchone()
            if row is None:
                return None
            job = self._job(row[1:])
            if stage == "train":
                job.state, job.worker, job.attempts = "running", worker, job.attempts + 1
                job.started_at = job.started_at or now
            conn.execute(
                "UPDATE ra_training_jobs SET state = %s, job = %s, claim_token = %s, heartbeat_at = %s WHERE id = %s",
                (job.state, json.dumps(dataclasses.asdict(job)), token, now, row[0]),
            )
        return Claim(row[0], worker, token)

    def _held(self, conn: psycopg.Connection, claim: Claim, sql: str, args: tuple) -> bool:
        return (
            conn.execute(f"{sql} WHERE id = %s AND claim_token = %s", (*args, claim.job_id, claim.token)).rowcount == 1
        )

    def heartbeat(self, claim: Claim) -> bool:
        with self._connect() as conn:
            return self._held(conn, claim, "UPDATE ra_training_jobs SET heartbeat_at = %s", (time.time(),))

    def cancelled(self, claim: Claim) -> bool:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT cancel_requested FROM ra_training_jobs WHERE id = %s", (claim.job_id,)
            ).fetchone()
        return bool(row and row[0])

    def upload(self, claim: Claim) -> bytes:
        job = self.get(claim.job_id)
        with self._connect() as conn:
            row = conn.execute("SELECT upload FROM ra_training_jobs WHERE id = %s", (claim.job_id,)).fetchone()
        return checked_upload(job, bytes(row[0]) if row and row[0] is not None else b"")

    def update(self, claim: Claim, **fields) -> Job:
        job = self.get(claim.job_id)
        for name, value in fields.items():
            setattr(job, name, value)
        with self._connect() as conn:
            self._held(conn, claim, "UPDATE ra_training_jobs SET job = %s", (json.dumps(dataclasses.asdict(job)),))
        return job

    def event(self, claim: Claim, event: dict) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO ra_training_events (job_id, event) VALUES (%s, %s)",
                (claim.job_id, json.dumps({"at": time.time(), **event})),
            )

    def save_checkpoint(self, claim: Claim, epoch: int, data: bytes) -> None:
        job = self.get(claim.job_id)
        job.checkpoint_epoch = epoch
        with self._connect() as conn:
            self._held(
                conn,
                claim,
                "UPDATE ra_training_jobs SET checkpoint = %s, job = %s",
                (data, json.dumps(dataclasses.asdict(job))),
            )

    def checkpoint(self, claim: Claim) -> tuple[int, bytes] | None:
        job = self.get(claim.job_id)
        with self._connect() as conn:
            row = conn.execute("SELECT checkpoint FROM ra_training_jobs WHERE id = %s", (claim.job_id,)).fetchone()
        return None if row is None or row[0] is None else (job.checkpoint_epoch, bytes(row[0]))

    def save_bundle(self, claim: Claim, data: bytes) -> None:
        with self._connect() as conn:
            self._held(conn, claim, "UPDATE ra_training_jobs SET bundle = %s", (data,))

    def finish(self, claim: Claim, state: str, **fields) -> Job:
        """End the job: its state and results written, its upload and checkpoint dropped, the claim released."""
        if state not in ENDED:
            raise ValueError(f"a job ends succeeded, failed or cancelled, not {state!r}")
        return self._hand_on(claim, state, finished_at=time.time(), **fields)

    def trained(self, claim: Claim, **fields) -> Job:
        """Training is done and the bundle saved: the job waits, `registering`, for the service's claim."""
        return self._hand_on(claim, "registering", **fields)

    def _hand_on(self, claim: Claim, state: str, **fields) -> Job:
        job = self.get(claim.job_id)
        for name, value in {**fields, "state": state}.items():
            setattr(job, name, value)
        with self._connect() as conn:
            self._held(
                conn,
                claim,
                "UPDATE ra_training_jobs SET state = %s, job = %s, upload = NULL, checkpoint = NULL, "
                "claim_token = NULL, heartbeat_at = NULL, cancel_requested = false",
                (state, json.dumps(dataclasses.asdict(job))),
            )
        return self.get(claim.job_id)
