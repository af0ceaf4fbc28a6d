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

from model.safetensors_io import InvalidFileError
from service.engine.registry import Registry
from service.record import DomainExists, RecordUnavailable
from training.jobs import JobNotFound

_log = logging.getLogger(__name__)


class Registrar:
    """Registers trained jobs' bundles from `jobs` (a `training.jobs` store) into `registry`."""

    def __init__(self, registry: Registry, jobs, poll_s: float = 1.0):
        self.registry, self.jobs, self.poll_s = registry, jobs, poll_s
        self.name = f"engine-{os.uname().nodename}-{os.getpid()}"

    async def run(self) -> None:
        while True:
            try:
                busy = await self.register_one()
            except Exception:  # the job list unreachable, say: the next turn tries again
                _log.exception("the registrar could not read the training jobs")
                busy = False
            if not busy:
                await asyncio.sleep(self.poll_s)

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
        _log.info("job %s: registered %s v%d", job.id, job.domain, entry.version)
        return True
