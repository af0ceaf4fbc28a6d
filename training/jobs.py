"""Training jobs in the store directory, beside the bundles: what survives a worker killed mid-job.

Layout under `<store>/.jobs/` (a dot folder: the registry of record's listing never sees it):
- `<id>/job.json`: the job (`Job`), written whole by rename: by `submit`, then by whoever holds the
  claim.
- `<id>/upload.bin`: the uploaded archive, stored once and checked against its sha256 when read.
- `<id>/claim`: who runs the job. It is created exclusively, and its mtime is the heartbeat. A claim
  whose heartbeat is older than `lease_s` is taken over by renaming it away: a rename succeeds for
  one process only, so two workers never both take over one job.
- `<id>/checkpoint.bin`: the last epoch's checkpoint (`checkpoint_epoch` in the job).
- `<id>/events.jsonl`: progress, one JSON object a line, appended by the claim holder.
- `<id>/bundle.safetensors`: the bundle a succeeded job made.
- `<id>/cancel`: a cancel asked for while the job runs; the worker stops at its next step.
- `.<id>.<random>.tmp/`: a submit in progress, renamed to `<id>/` once whole; one older than a
  minute was left by a crash and is removed.
A job that ends (succeeded, failed, cancelled) keeps `job.json`, its events and its bundle. Its
upload, checkpoint and claim are removed.

A job's states: `queued`, `running` (a worker trains it), `registering` (trained, its bundle in the
store, waiting for the service to validate and register it: `trained`, then a claim for the
`register` stage), then one of `ENDED`. A job submitted for its bundle only ends `succeeded` when
trained.

Job ids sort by submission time, so the oldest queued job is the first listed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import time

from model.safetensors_io import atomic_write_bytes

JOBS = ".jobs"
STATES = ("queued", "running", "registering", "succeeded", "failed", "cancelled")
ENDED = ("succeeded", "failed", "cancelled")
STAGES = {"train": ("queued", "running"), "register": ("registering",)}  # what each stage's claim takes
STALE_STAGING_S = 60.0


class JobNotFound(KeyError):
    """No job with that id (or none the caller may see)."""


@dataclasses.dataclass
class Job:
    id: str
    tenant: str
    domain: str
    recipe: dict
    upload_sha256: str
    upload_bytes: int
    classes: list[str]
    images: int
    state: str = "queued"
    register: bool = True  # register the bundle as a new version of `domain` on success
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempts: int = 0  # claims so far: more than one means a worker died and another took over
    epochs_done: int = 0
    checkpoint_epoch: int = 0
    reason: str | None = None  # why it failed, for the user
    accuracy: float | None = None  # validation top-1 of the bundle it made
    version: int | None = None  # the version it registered

    @classmethod
    def of(cls, text: str) -> Job:
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class Claim:
    """A worker's hold on a running job."""

    job_id: str
    worker: str
    token: str


def checked_upload(job: Job, data: bytes) -> bytes:
    """The job's upload as stored, if it still matches the checksum taken at submit (else the store is damaged)."""
    if hashlib.sha256(data).hexdigest() != job.upload_sha256:
        raise OSError(f"The upload of {job.id} does not match its checksum; the store is damaged.")
    return data


def new_id() -> str:
    return f"job-{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(4)}"


class DirectoryJobs:
    """The job list in a store directory (see the module's docstring for the layout and the claims)."""

    def __init__(self, store: pathlib.Path, lease_s: float = 30.0):
        self.root = pathlib.Path(store) / JOBS
        self.lease_s = lease_s
        for staging in self.root.glob(".job-*.tmp"):  # a submit killed half-way; a live one takes milliseconds
            with contextlib.suppress(FileNotFoundError):
                if time.time() - staging.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(staging, ignore_errors=True)

    def _dir(self, job_id: str) -> pathlib.Path:
        if not job_id.startswith("job-") or "/" in job_id or job_id != os.path.basename(job_id):
            raise JobNotFound(job_id)
        return self.root / job_id

    # ----- the API's side -----------------------------------------------------------------------

    def submit(self, job: Job, upload: bytes) -> Job:
        """Store the upload and the queued job together: the job's folder appears whole or not at all."""
        job.upload_sha256, job.upload_bytes = hashlib.sha256(upload).hexdigest(), len(upload)
        job.created_at, job.state = time.time(), "queued"
        staging = self.root / f".{job.id}.{secrets.token_hex(4)}.tmp"
        staging.mkdir(parents=True)  # the first job makes `.jobs/`
        try:
            atomic_write_bytes(staging / "upload.bin", upload)
            atomic_write_bytes(staging / "job.json", json.dumps(dataclasses.asdict(job)).encode())
            os.rename(staging, self._dir(job.id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return job

    def get(self, job_id: str) -> Job:
        try:
            return Job.of((self._dir(job_id) / "job.json").read_text())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def page(self, tenant: str, after: str | None, count: int) -> list[Job]:
        """Up to `count` of the tenant's jobs, oldest first, after the id `after`."""
        out = []
        for name in self._names():
            if after is not None and name <= after:
                continue
            with contextlib.suppress(JobNotFound):
                job = self.get(name)
                if job.tenant == tenant:
                    out.append(job)
                    if len(out) == count:
                        break
        return out

    def queued(self, tenant: str) -> int:
        return sum(1 for job in self._all() if job.tenant == tenant and job.state == "queued")

    def counts(self) -> dict[str, int]:
        """Jobs by state (the metrics' gauge)."""
        out = dict.fromkeys(STATES, 0)
        for job in self._all():
            out[job.state] += 1
        return out

    def ended_between(self, since: float, until: float) -> list[Job]:
        """The jobs that ended in [since, until) (the metrics' histograms)."""
        return [j for j in self._all() if j.state in ENDED and since <= (j.finished_at or 0.0) < until]

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops at its worker's next step."""
        job = self.get(job_id)
        if job.state in ENDED:
            return job
        claim = self._take(job_id, "canceller")
        if claim is not None:  # nobody runs it (queued, or its worker is gone): end it here
            return self.finish(claim, "cancelled", reason="cancelled by request")
        (self._dir(job_id) / "cancel").touch()
        return self.get(job_id)

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        """The job's events from number `after` on (0: all)."""
        self.get(job_id)
        try:
            lines = (self._dir(job_id) / "events.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines[after:] if line]

    # ----- the worker's side --------------------------------------------------------------------

    def claim(self, worker: str, stage: str = "train") -> Claim | None:
        """The oldest job of `stage` (`STAGES`) that nobody holds, or whose holder stopped beating; None
        when there is none. A job claimed to train turns `running`."""
        for job in self._all():
            if job.state not in STAGES[stage]:
                continue
            claim = self._take(job.id, worker)
            if claim is None:
                continue
            job = self.get(job.id)
            if job.state not in STAGES[stage]:  # moved on between the listing and the claim
                self._release(claim)
                continue
            if stage == "train":
                job.state, job.worker, job.attempts = "running", worker, job.attempts + 1
                job.started_at = job.started_at or time.time()
                self._write(job)
            return claim
        return None

    def heartbeat(self, claim: Claim) -> bool:
        """Renew the claim; False when it was taken over (the worker must stop: another runs the job)."""
        path = self._dir(claim.job_id) / "claim"
        try:
            if path.read_text() != claim.token:
                return False
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def cancelled(self, claim: Claim) -> bool:
        return (self._dir(claim.job_id) / "cancel").exists()

    def upload(self, claim: Claim) -> bytes:
        job = self.get(claim.job_id)
        return checked_upload(job, (self._dir(claim.job_id) / "upload.bin").read_bytes())

    def update(self, claim: Claim, **fields) -> Job:
        job = self.get(claim.job_id)
        for name, value in fields.items():
            setattr(job, name, value)
        self._write(job)
        return job

    def event(self, claim: Claim, event: dict) -> None:
        with open(self._dir(claim.job_id) / "events.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), **event}) + "\n")

    def save_checkpoint(self, claim: Claim, epoch: int, data: bytes) -> None:
        atomic_write_bytes(self._dir(claim.job_id) / "checkpoint.bin", data)
        self.update(claim, checkpoint_epoch=epoch)

    def checkpoint(self, claim: Claim) -> tuple[int, bytes] | None:
        job = self.get(claim.job_id)
        try:
            return job.checkpoint_epoch, (self._dir(claim.job_id) / "checkpoint.bin").read_bytes()
        except FileNotFoundError:
            return None

    def save_bundle(self, claim: Claim, data: bytes) -> None:
        atomic_write_bytes(self._dir(claim.job_id) / "bundle.safetensors", data)

    def bundle(self, job_id: str) -> bytes:
        """The bundle a succeeded job made."""
        try:
            return (self._dir(job_id) / "bundle.safetensors").read_bytes()
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def finish(self, claim: Claim, state: str, **fields) -> Job:
        """End the job: its state and results written, its upload, checkpoint and claim removed."""
        if state not in ENDED:
            raise ValueError(f"a job ends succeeded, failed or cancelled, not {state!r}")
        return self._hand_on(claim, state, finished_at=time.time(), **fields)

    def trained(self, claim: Claim, **fields) -> Job:
        """Training is done and the bundle saved: the job waits, `registering`, for the service's claim
        (`claim(..., stage="register")`); its upload, checkpoint and this claim are removed."""
        return self._hand_on(claim, "registering", **fields)

    def _hand_on(self, claim: Claim, state: str, **fields) -> Job:
        job = self.update(claim, state=state, **fields)
        folder = self._dir(claim.job_id)
        for name in ("upload.bin", "checkpoint.bin", "cancel"):
            (folder / name).unlink(missing_ok=True)
        self._release(claim)
        return job

    # ----- claims ---------------------------------------------------------------------------------

    def _take(self, job_id: str, worker: str) -> Claim | None:
        """Claim the job: exclusively if nobody holds it, by renaming a lapsed claim away if its holder stopped."""
        path = self._dir(job_id) / "claim"
        token = f"{worker} {secrets.token_hex(8)}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    lapsed = time.time() - path.stat().st_mtime > self.lease_s
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if not lapsed:
                    return None
                stale = path.with_name(f"claim.{secrets.token_hex(4)}.lapsed")
                try:
                    os.rename(path, stale)  # one process wins the rename
                except FileNotFoundError:
                    return None
                stale.unlink(missing_ok=True)
                continue
            except FileNotFoundError:  # the job's folder is gone
                return None
            with os.fdopen(fd, "w") as f:
                f.write(token)
            return Claim(job_id, worker, token)
        return None

    def _release(self, claim: Claim) -> None:
        path = self._dir(claim.job_id) / "claim"
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == claim.token:
                path.unlink()

    def _write(self, job: Job) -> None:
        atomic_write_bytes(self._dir(job.id) / "job.json", json.dumps(dataclasses.asdict(job)).encode())

    def _names(self) -> list[str]:
        """Every job's id, oldest first (none before the first submit)."""
        try:
            return sorted(p.name for p in self.root.iterdir() if p.name.startswith("job-"))
        except FileNotFoundError:
            return []

    def _all(self) -> list[Job]:
        jobs = []
        for name in self._names():
            with contextlib.suppress(JobNotFound):
                jobs.append(self.get(name))
        return jobs


def open_jobs(location: str | os.PathLike, lease_s: float = 30.0):
    """The job list beside the registry of record: a `postgresql://` URL, or the store directory."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from training.jobs_postgres import PostgresJobs  # psycopg, only for a fleet's record

        return PostgresJobs(str(location), lease_s=lease_s)
    return DirectoryJobs(pathlib.Path(location).expanduser(), lease_s=lease_s)
