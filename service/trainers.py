"""The training workers beside the service: `RA_TRAINERS` processes (default 1) of `training.worker` on the
service's job list (`training.jobs`, beside the registry of record), started by `python -m service` in
either layout and restarted when they die. Each runs at a lower CPU priority than the engine
(`RA_TRAINER_NICE`), so that serving comes first on a shared CPU; a trainer imports the framework only
once it has a job. One killed mid-job loses at most the epoch it was in: its restart (or any other
worker) resumes the job from its last checkpoint once the claim lapses (`RA_TRAINING_LEASE_S`).

Runs in the supervisor (or the single serving process) and, for `trainer_main`, in each trainer.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time

from service.logs import configure

_log = logging.getLogger("service.trainers")
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies
RESTART_WAIT_S = (1.0, 30.0)  # first and longest wait before a trainer that keeps dying starts again


def trainer_main(parent: int, log_level: str) -> None:
    """One training worker: dies with the service, leaves Ctrl-C to it."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure("trainer", log_level)
    from service.settings import Settings
    from training.jobs import open_jobs
    from training.worker import Worker

    settings = Settings()
    os.nice(settings.trainer_nice)
    jobs = open_jobs(settings.jobs_location, settings.training_lease_s)
    Worker(jobs, settings.backbone, gpu_memory_mb=settings.trainer_gpu_memory_mb).run()


class Trainers:
    """`count` trainer processes, kept running by a thread until `stop`."""

    def __init__(self, count: int, log_level: str = "info"):
        self.count, self.log_level = count, log_level
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.Process | None] = [None] * count
        self._next_start = [0.0] * count
        self._failures = [0] * count
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="trainers", daemon=True)

    def start(self) -> None:
        if self.count:
            _log.info("starting %d training workers (RA_TRAINERS)", self.count)
            self._thread.start()

    def _keep(self) -> None:
        while not self._stopping.is_set():
            for i, process in enumerate(self._processes):
                if process is not None and not process.is_alive():
                    self._processes[i] = None
                    lived = time.monotonic() - getattr(process, "started_at", 0.0)
                    self._failures[i] = 0 if lived > 60 else self._failures[i] + 1
                    wait = min(RESTART_WAIT_S[0] * 2 ** max(0, self._failures[i] - 1), RESTART_WAIT_S[1])
                    self._next_start[i] = time.monotonic() + wait
                    _log.error("trainer %d exited with %s; starting it again in %.0f s", i, process.exitcode, wait)
                if self._processes[i] is None and time.monotonic() >= self._next_start[i]:
                    self._spawn(i)
            self._stopping.wait(0.5)

    def _spawn(self, i: int) -> None:
        process = self._context.Process(
            target=trainer_main, args=(os.getpid(), self.log_level), name=f"trainer {i}", daemon=False
        )
        process.start()
        process.started_at = time.monotonic()
        self._processes[i] = process
        _log.info("started trainer %d (pid %d)", i, process.pid)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every trainer: a job in flight is resumed from its checkpoint by the next worker."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        live = [p for p in self._processes if p is not None and p.is_alive()]
        for process in live:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
