"""The registry of record: which domains exist at which versions, and their bundle bytes.

Every serving process is a cache of it. Two backends behind one interface (`RecordStore`):
a directory (`RA_STORE_DIR`, the embedded default; also several workers or hosts on a shared
volume) and PostgreSQL (`RA_REGISTRY_URL`).

Opened by the engine process (its loads and its follower); it imports neither the front end nor the engine.
"""

from __future__ import annotations

from service.record.base import FLAGS, DomainExists, RecordStore, RecordUnavailable, Version
from service.settings import Settings

__all__ = ["FLAGS", "DomainExists", "RecordStore", "RecordUnavailable", "Version", "open_record"]


def open_record(settings: Settings) -> RecordStore:
    """The backend the settings choose: PostgreSQL when `RA_REGISTRY_URL` is set, else the directory."""
    if settings.registry_url is not None:
        from service.record.postgres import PostgresRecord

        return PostgresRecord(settings.registry_url.get_secret_value())
    from service.record.directory import DirectoryRecord

    return DirectoryRecord(settings.store_dir, poll_interval_s=settings.poll_interval_ms / 1000)
