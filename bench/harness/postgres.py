"""A throwaway PostgreSQL cluster for tests: initdb into a temporary folder, `pg_ctl` on a free
loopback port (socket in that folder), stopped afterwards. Debian's server binaries live in
/usr/lib/postgresql/<major>/bin; as root, the cluster runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

from bench.harness.servers import free_port


def server_bin() -> pathlib.Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return pathlib.Path(pg_ctl).parent if pg_ctl else None


class Cluster:
    """A cluster in its own temporary folder (directly under the system's temp dir, which the
    `postgres` user can reach, unlike pytest's root-only folders); `remove()` deletes it."""

    def __init__(self, bin_dir: pathlib.Path):
        self.root, self.bin = pathlib.Path(tempfile.mkdtemp(prefix="ra-pg-")), bin_dir
        root = self.root
        self.data, self.log = root / "data", root / "server.log"
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
        self._run("initdb", "-D", str(self.data), "-U", "ra", "-A", "trust", "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                "fsync = off\nmax_connections = 100\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql://ra@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / tool), *args]
        kwargs = {}
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120, **kwargs)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
