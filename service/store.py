"""Registered bundles on disk: `<root>/<domain>/<version>.safetensors`, the highest version current.

Every write is atomic (temp file, fsync, rename, fsync of the folder), so a crash leaves the store
holding either the old version or the new one, never a part; a deleted domain's folder is renamed
away before it is removed. Domain names are validated before they become paths.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import uuid

from model.bundle import DOMAIN_NAME, check_domain_name
from model.safetensors_io import atomic_write_bytes

_log = logging.getLogger(__name__)
SUFFIX = ".safetensors"


class BundleStore:
    def __init__(self, root: pathlib.Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for leftover in list(root.glob("*/.*.tmp")) + list(root.glob(".trash-*")):
            _log.warning("removing leftover %s from an interrupted write", leftover)
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def _folder(self, domain: str) -> pathlib.Path:
        return self.root / check_domain_name(domain)

    def domains(self) -> list[str]:
        """Stored domains; folders that are not domain names (e.g. a volume's lost+found) are ignored."""
        names = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            if not DOMAIN_NAME.fullmatch(p.name):
                _log.warning("ignoring %s in the store: not a domain name", p)
            elif self.versions(p.name):
                names.append(p.name)
        return names

    def versions(self, domain: str) -> list[int]:
        folder = self._folder(domain)
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def read(self, domain: str, version: int) -> bytes:
        return (self._folder(domain) / f"{version:06d}{SUFFIX}").read_bytes()

    def write(self, domain: str, version: int, data: bytes) -> None:
        folder = self._folder(domain)
        folder.mkdir(exist_ok=True)
        atomic_write_bytes(folder / f"{version:06d}{SUFFIX}", data)

    def drop_version(self, domain: str, version: int) -> None:
        (self._folder(domain) / f"{version:06d}{SUFFIX}").unlink(missing_ok=True)

    def delete(self, domain: str) -> None:
        folder = self._folder(domain)
        if folder.is_dir():
            trash = self.root / f".trash-{domain}-{uuid.uuid4().hex}"
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def has_marker(self, name: str) -> bool:
        return (self.root / f".{name}").exists()

    def set_marker(self, name: str) -> None:
        atomic_write_bytes(self.root / f".{name}", b"")
