"""Keep this process's registry in step with the registry of record.

One asyncio task: wait for the record's change feed (a journal in the store directory, or
PostgreSQL's LISTEN/NOTIFY), sync each announced domain in order, and resync everything on the
first contact, after every reconnection (changes may have been missed while away) and every
`resync_interval_s` as a safety net. Each full resync also sweeps away what crashed writes left
in the record (all of it the first time, then `SWEEP_FOLDERS` domains a round, so the cost stays
flat with 100,000 domains). While the record is unreachable it retries with backoff; serving goes on
with what is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.engine.registry import Registry
from service.record import RecordStore, RecordUnavailable

_log = logging.getLogger(__name__)
BACKOFF_S = (0.1, 1.0)  # first and longest wait between reconnection attempts
FEED_TIMEOUT_S = 0.5  # longest blocking wait on the feed (bounds how long stopping takes)
SWEEP_FOLDERS = 2_000  # domain folders swept per periodic resync (a few ms on a local disk)


class Follower:
    def __init__(self, registry: Registry, record: RecordStore, resync_interval_s: float):
        self.registry, self.record, self.resync_interval_s = registry, record, resync_interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sweep(self, limit: int | None) -> None:
        removed = await asyncio.to_thread(self.record.sweep_temporaries, limit)
        if removed:
            self.registry.metrics.temporaries_removed.inc(removed)

    async def _run(self) -> None:
        cursor: object = None
        backoff = BACKOFF_S[0]
        next_full = 0.0
        swept_all = False
        while True:
            try:
                if time.monotonic() >= next_full:
                    cursor = None
                cursor, changed = await asyncio.to_thread(self.record.changes, cursor, FEED_TIMEOUT_S)
                self.registry.mark_ok()
                if changed is None:
                    await self.registry.resync()
                    next_full = time.monotonic() + self.resync_interval_s
                    await self._sweep(None if not swept_all else SWEEP_FOLDERS)
                    swept_all = True
                else:
                    for domain in sorted(changed):
                        await self.registry.sync(domain)
                backoff = BACKOFF_S[0]
            except RecordUnavailable as exc:
                self.registry.mark_unavailable(exc)
                cursor = None  # reconnect, then resync everything
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("syncing with the registry of record failed")
                cursor = None
                await asyncio.sleep(BACKOFF_S[1])
