"""The shipped HAProxy configuration (deploy/haproxy.cfg) on loopback: its Docker name resolution
swapped for explicit replica addresses, for the tests and benches that run a real proxy."""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


RATES = "/usr/local/etc/haproxy/rates.map"


def loopback_config(
    ports: list[int],
    listen: int,
    affinity: bool = True,
    stats_socket: str | None = None,
    rates: pathlib.Path = REPO / "deploy" / "rates.map",
    grpc: tuple[int, list[int]] | None = None,
) -> str:
    """deploy/haproxy.cfg serving `listen` over replicas on `ports`; `affinity=False`: the same proxy
    balancing every request round-robin (for comparison); `stats_socket`: HAProxy's statistics there;
    `rates`: the per-key limits (service.frontend.proxy_limits' map; the shipped one is empty); `grpc`: the
    proxy's gRPC port and the replicas' (in the order of `ports`), else no gRPC."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    assert RATES in text
    text = text.replace(RATES, str(rates))
    text = re.sub(r"\nresolvers docker\n(?:    .*\n)+", "\n", text)
    servers = "".join(f"    server replica{i} 127.0.0.1:{port}\n" for i, port in enumerate(ports, 1))
    text = text.replace("    server-template replica 1-16 adapters:8000 resolvers docker init-addr none\n", servers)
    text = re.sub(r"\n    bind :8080[^\n]*\n", f"\n    bind 127.0.0.1:{listen}\n", text)
    grpc_listen, grpc_ports = grpc or (None, [])
    servers = "".join(
        f"    server grpc{i} 127.0.0.1:{port} proto h2 check-proto h1 port {check}\n"
        for i, (port, check) in enumerate(zip(grpc_ports, ports), 1)
    )
    text = text.replace(
        "    server-template grpc 1-16 adapters:8001 proto h2 check-proto h1 resolvers docker init-addr none\n", servers
    )
    text = re.sub(r"\n    bind :8081 ([^\n]*)\n", f"\n    bind 127.0.0.1:{grpc_listen} \\1\n" if grpc else "\n", text)
    if not affinity:
        text = text.replace("    use_backend affinity if { var(txn.domain) -m len gt 0 }\n", "")
        text = text.replace("    use_backend grpc_affinity if grpc { var(txn.domain) -m found }\n", "")
        text = text.replace("    balance leastconn\n", "    balance roundrobin\n")
    if stats_socket:
        text = text.replace("\nglobal\n", f"\nglobal\n    stats socket {stats_socket}\n", 1)
    assert "server-template" not in text and "resolvers" not in text and f"bind 127.0.0.1:{listen}" in text
    return text


@contextlib.contextmanager
def running_proxy(
    ports: list[int],
    listen: int,
    affinity: bool = True,
    timeout: float = 30.0,
    stats_socket: str | None = None,
    rates: pathlib.Path = REPO / "deploy" / "rates.map",
    grpc: tuple[int, list[int]] | None = None,
):
    """HAProxy on `listen` in front of `ports`, once every replica passes its health check; yields its URL.
    The readiness probe needs no key, so a keys file on the replicas does not stop it."""
    with tempfile.TemporaryDirectory() as tmp:
        config, log = pathlib.Path(tmp) / "haproxy.cfg", pathlib.Path(tmp) / "haproxy.log"
        config.write_text(loopback_config(ports, listen, affinity, stats_socket, rates, grpc))
        with open(log, "wb") as out:
            proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{listen}"
        try:
            deadline = time.monotonic() + timeout
            while True:  # each replica answers through the proxy (distinct engine processes)
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    if len(
                        {httpx.get(url + "/readyz", timeout=5).json()["engine_pid"] for _ in range(2 * len(ports))}
                    ) == len(ports):
                        break
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"HAProxy did not come up in front of {ports}:\n{log.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            proxy.kill()
            proxy.wait(10)
