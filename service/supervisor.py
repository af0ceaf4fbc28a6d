"""The supervisor: `python -m service --workers N` (N > 1) runs one engine process and N front ends.

It is the only place that knows every process. The engine process (`service.engine.process`) owns
the device; each front end (`frontend_main`) binds the same port with SO_REUSEPORT, so the kernel
spreads connections over them, and reaches the engine over `service.transport`. The supervisor
restarts a process that dies (front ends keep serving while the engine restarts: their requests get
503 `engine_unavailable` meanwhile), and on SIGTERM or SIGINT stops the front ends first (in-flight
requests finish), then the engine, then removes what they shared: the engine's socket, the front
ends' shared-memory arenas, the metrics files and the host tables (rate limits and OIP statistics,
`service.frontend.host_table`), which it makes in its run directory before any child starts. The
training workers beside them are `service.trainers`'.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable

from service import tracing
from service.logs import configure
from service.metrics import MULTIPROC_DIR
from service.trainers import Trainers

_log = logging.getLogger("service.supervisor")
MB = 1024 * 1024
RESTART_BACKOFF_S = (0.5, 10.0)  # first and longest wait before a process that keeps dying is started again
STOP_GRACE_S = 30.0  # how long front ends may take to finish their requests on SIGTERM
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def _child(supervisor: int, main: Callable[..., None], *args: object) -> None:
    """Every child's start: it dies with the supervisor (no orphan holds the device or the port), and the
    engine leaves Ctrl-C to the supervisor, which stops it once the front ends have finished."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # the supervisor died before the line above
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main(*args)


def engine_main(endpoint: str, arena_prefix: str, cores: int | None, log_level: str) -> None:
    """The engine process (`service.engine.process`): imported there, so the supervisor never loads the
    framework."""
    from service.engine.process import main

    main(endpoint, arena_prefix, cores, log_level)


def frontend_main(host: str, port: int, endpoint: str, arena: str, tables_dir: str, log_level: str) -> None:
    """A front end: the FastAPI app over a `RemoteEngine`, on a port and host tables it shares with the others."""
    import uvicorn

    from service.frontend.app import create_app
    from service.settings import Settings
    from service.transport import RemoteEngine

    configure("front end", log_level)
    tracing.configure("front end")
    settings = Settings()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    engine = RemoteEngine(endpoint, arena, int(settings.arena_mb * MB), settings.request_timeout_s + 5)
    config = uvicorn.Config(
        create_app(settings, engine, tables_dir),
        log_level=log_level,
        log_config=None,  # uvicorn's lines in this process's format (service.logs)
        access_log=False,
        timeout_graceful_shutdown=int(STOP_GRACE_S),
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        tracing.shutdown()


@dataclasses.dataclass
class Child:
    """One supervised process and how to start it again."""

    name: str
    target: Callable[..., None]
    args: Callable[[], tuple]  # fresh arguments for each start (a front end's arena is new each time)
    process: multiprocessing.Process | None = None
    started_at: float = 0.0
    failures: int = 0  # exits in a row, each soon after its start
    next_start: float = 0.0


class Supervisor:
    def __init__(self, host: str, port: int, workers: int, log_level: str, trainers: int = 0):
        self.host, self.port, self.workers, self.log_level = host, port, workers, log_level
        self.prefix = f"ra-{os.getpid()}-"  # of every shared-memory arena this supervisor's front ends make
        self.rundir = tempfile.mkdtemp(prefix="ra-run-")
        self.endpoint = f"ipc://{self.rundir}/engine.sock"
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._generation = 0
        self.engine = Child("engine", engine_main, lambda: (self.endpoint, self.prefix, None, log_level))
        self.frontends = [Child(f"front end {i}", frontend_main, self._frontend_args(i)) for i in range(workers)]
        self.trainers = Trainers(trainers, log_level)

    def _frontend_args(self, i: int) -> Callable[[], tuple]:
        def args() -> tuple:
            self._generation += 1
            arena = f"{self.prefix}fe{i}-{self._generation}"
            return self.host, self.port, self.endpoint, arena, self.rundir, self.log_level

        return args

    @property
    def children(self) -> list[Child]:
        return [self.engine, *self.frontends]

    def _start(self, child: Child) -> None:
        child.process = self._context.Process(
            target=_child, args=(os.getpid(), child.target, *child.args()), name=child.name
        )
        child.process.start()
        child.started_at = time.monotonic()
        _log.info("started %s (pid %d)", child.name, child.process.pid)

    def _reap(self, child: Child) -> None:
        """A child that exited: forget its live metrics and arena, schedule its restart with backoff."""
        from prometheus_client import multiprocess

        process = child.process
        child.process = None
        multiprocess.mark_process_dead(process.pid)
        if child is not self.engine:
            from service.transport import remove_arenas

            remove_arenas(f"{self.prefix}fe{self.frontends.index(child)}-")
        lived = time.monotonic() - child.started_at
        child.failures = 0 if lived > 60 else child.failures + 1
        wait = (
            0.0 if child.failures <= 1 else min(RESTART_BACKOFF_S[0] * 2 ** (child.failures - 2), RESTART_BACKOFF_S[1])
        )
        child.next_start = time.monotonic() + wait
        _log.error(
            "%s (pid %d) exited with %s; starting it again in %.1f s", child.name, process.pid, process.exitcode, wait
        )

    def run(self) -> int:
        """Start everything, keep it running until SIGTERM or SIGINT, then stop it all. Returns the exit code."""
        os.makedirs(os.path.join(self.rundir, "metrics"))
        os.environ[MULTIPROC_DIR] = os.path.join(self.rundir, "metrics")  # inherited by every child
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        _log.info(
            "supervisor %d: one engine process and %d front ends on %s:%d",
            os.getpid(),
            self.workers,
            self.host,
            self.port,
        )
        from service.transport import reclaim_orphaned_arenas

        count, freed = reclaim_orphaned_arenas()
        if count:
            _log.warning(
                "reclaimed %.1f MB of shared memory: %d arenas in /dev/shm of services that were killed whole",
                freed / MB,
                count,
            )
        try:
            from service.frontend.app import create_host_tables

            create_host_tables(self.rundir)
            for child in self.children:
                self._start(child)
            self.trainers.start()
            while not self._stopping.wait(0.1):
                for child in self.children:
                    if child.process is not None and not child.process.is_alive():
                        self._reap(child)
                    if child.process is None and time.monotonic() >= child.next_start:
                        self._start(child)
        finally:
            self._stop()
        return 0

    def _stop(self) -> None:
        _log.info("stopping: the trainers and front ends first, then the engine")
        self.trainers.stop()
        self._terminate([c for c in self.frontends if c.process is not None], STOP_GRACE_S + 5)
        self._terminate([self.engine] if self.engine.process is not None else [], 30)
        from service.transport import remove_arenas

        remove_arenas(self.prefix)
        shutil.rmtree(self.rundir, ignore_errors=True)

    @staticmethod
    def _terminate(children: list[Child], grace_s: float) -> None:
        for child in children:
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + grace_s
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                _log.error("%s did not stop in %.0f s; killing it", child.name, grace_s)
                child.process.kill()
                child.process.join(5)
