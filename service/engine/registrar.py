"""The registrar: serves what training jobs made. A job trained by a worker (`training.worker`) waits in
the job list, `registering`, with its bundle; the registrar claims it (`stage="register"`: one engine
of a fleet gets each job), registers the bundle as a new version of the job's domain by the path
every upload takes (`Registry.register`: format, backbone fingerprint, golden self-test, the record),
and ends the job `succeeded` with the version, or `failed` with why the bundle was refused. When the
record cannot be reached, the claim is left to lapse and the job is tried again.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from model.safetensors_io import InvalidFileError
from service.engine.registry import Registry
from service.metrics import Metrics
from service.record import DomainExists, RecordUnavailable
from training.jobs import Job, JobNotFound

_log = logging.getLogger(__name__)
METRICS_S = 10.0  # how often the job list's figures are read for the metrics


class Registrar:
    """Registers trained jobs' bundles from `jobs` (a `training.jobs` store) into `registry`, and keeps
    the training metrics: jobs by state, and each ended job's queue wait, duration and images."""

    def __init__(self, registry: Registry, jobs, metrics: Metrics, poll_s: float = 1.0):
        self.registry, self.jobs, self.metrics, self.poll_s = registry, jobs, metrics, poll_s
        self.name = f"engine-{os.uname().nodename}-{os.getpid()}"
        self._counted_until = time.time()  # jobs that ended before this process started are not counted
        self._next_metrics = 0.0

    async def run(self) -> None:
        while True:
            try:
                busy = await self.register_one()
                if time.monotonic() >= self._next_metrics:
                    self._next_metrics = time.monotonic() + METRICS_S
                    await asyncio.to_thread(self.read_metrics)
            except Exception:  # the job list unreachable, say: the next turn tries again
                _log.exception("the registrar could not read the training jobs")
                busy = False
            if not busy:
                await asyncio.sleep(self.poll_s)

    def read_metrics(self) -> None:
        """Jobs by state; the jobs that ended since the last reading into the histograms."""
        since, self._counted_until = self._counted_until, time.time()
        for job in self.jobs.ended_between(since, self._counted_until):
            self._count_ended(job)
        for state, n in self.jobs.counts().items():
            self.metrics.training_jobs.labels(state).set(n)

    def _count_ended(self, job: Job) -> None:
        m = self.metrics
        if job.started_at is not None:
            m.training_queue_wait.observe(max(0.0, job.started_at - job.created_at))
            m.training_duration.labels(job.state).observe(max(0.0, job.finished_at - job.started_at))
        share = 1.0 - float(job.recipe.get("val_share", 0.1))
        m.training_images.inc(job.images * share * job.epochs_done)

    async def register_one(self) -> bool:
        """Register one trained job's bundle; False when none was waiting."""
        claim = await asyncio.to_thread(self.jobs.claim, self.name, "register")
        if claim is None:
            return False
        try:
            job = await asyncio.to_thread(self.jobs.get, claim.job_id)
            data = await asyncio.to_thread(self.jobs.bundle, claim.job_id)
        except JobNotFound:
            await asyncio.to_thread(
                self.jobs.finish, claim, "failed", reason="The trained bundle is missing; submit again."
            )
            return True
        try:
            entry = await self.registry.register(data, replace=True, domain=job.domain)
        except (InvalidFileError, DomainExists) as exc:
            reason = f"The trained bundle was refused: {exc}"
            await asyncio.to_thread(self.jobs.finish, claim, "failed", reason=reason)
            _log.error("job %s: %s", job.id, reason)
            return True
        except RecordUnavailable as exc:
            _log.warning("job %s waits: the registry of record is unreachable (%s)", job.id, exc)
            return False
        await asyncio.to_thread(self.jobs.finish, claim, "succeeded", version=entry.version)
        self._next_metrics = 0.0  # counted at once
        _log.info("job %s: registered %s v%d", job.id, job.domain, entry.version)
        return True
