"""The loader: a bundle's bytes to its folded tables (parse, validate, fold), off the engine's interpreter.

That work is milliseconds of Python and numpy per bundle; in the engine process it would hold the
lock that every batch needs. So the engine process hands it to a pool of loader processes, which
import numpy and safetensors but no framework (tens of MB each), and keeps only what needs the
engine: the write of the folded rows into its tables and the golden self-test. With no processes
(one worker: the single serving process) the same work runs in a thread.

What crosses the pool's pipes: the bundle's bytes as a bytes object (parsed as safetensors in the
loader, never unpickled) and, back, the folded row and card that the loader computed itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import pathlib
import signal
import time

import numpy as np

from model.backbone import Backbone, load_backbone
from model.bundle import AdapterBundle, load_bundle
from model.folding import fold_domain
from service.exceptions import AdapterUnavailable

_log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl(2): a loader dies with the engine process that started it


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated bundle, ready for the engine: its card and golden tensors, and its folded row."""

    card: AdapterBundle  # without its weights; golden tensors kept for the self-test
    row: np.ndarray  # the folded tables in the engine's row layout (`model.folding.RowLayout`)
    sha256: str
    size_bytes: int
    cpu_s: float  # CPU time the preparation took (in the loader)


def prepare(backbone: Backbone, data: bytes, domain: str | None) -> Prepared:
    """Parse and validate `data` for `backbone` (raise `InvalidFileError`), then fold it into its row."""
    start = time.thread_time()
    bundle = load_bundle(data, backbone, domain=domain)
    row = fold_domain(bundle.config, bundle.weights)
    return Prepared(
        dataclasses.replace(bundle, weights={}),
        row,
        hashlib.sha256(data).hexdigest(),
        len(data),
        time.thread_time() - start,
    )


_backbone: Backbone | None = None  # a loader process's own backbone, set once by `_init`


def _init(backbone_path: str) -> None:
    global _backbone
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _backbone = load_backbone(pathlib.Path(backbone_path))


def _prepare_here(data: bytes, domain: str | None) -> Prepared:
    return prepare(_backbone, data, domain)


def _ready() -> int:
    return os.getpid()


class Loader:
    """Prepares bundles in `processes` loader processes (0: in a thread of this process)."""

    def __init__(self, backbone: Backbone | None, backbone_path: pathlib.Path | None = None, processes: int = 0):
        """`backbone` is what threads validate against (it may be set later, before the first `prepare`);
        loader processes read their own from `backbone_path`."""
        self.backbone, self.backbone_path, self.processes = backbone, backbone_path, processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the loader processes and wait until they answer (so the first load does not pay for the
        imports). Called on the event loop's thread: a child's death signal follows the thread that started it."""
        if self.processes == 0:
            return
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(str(self.backbone_path),),
        )
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))
        _log.info("%d loader processes started", self.processes)

    async def prepare(self, data: bytes, domain: str | None) -> Prepared:
        """The bundle prepared; raise `InvalidFileError` for a bad one, `AdapterUnavailable` if a loader died."""
        pool = self._pool
        if pool is None:
            return await asyncio.to_thread(prepare, self.backbone, data, domain)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _prepare_here, data, domain)
        except concurrent.futures.process.BrokenProcessPool:
            if self._pool is pool:  # the first of its callers to notice starts them again
                _log.error("a loader process died; starting the loaders again")
                self.stop()
                await self.start()
            raise AdapterUnavailable("A loader process died while preparing this bundle; retry.") from None

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
