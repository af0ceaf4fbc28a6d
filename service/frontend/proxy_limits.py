"""The keys file's rate limits as an HAProxy map, so the fleet's proxy refuses a flooding key before any
replica spends a cycle on it (deploy/haproxy.cfg reads the map as `rates.map`).

    python -m service.frontend.proxy_limits KEYS_FILE [--out deploy/rates.map] [--proxies N]

Each line maps the sha256 of a key (the keys file's `key_sha256`, which the proxy computes from the
presented bearer key) to the most requests that key may make in any rolling second at the proxy:
max(burst, ceil(rate_per_s)), the token bucket's largest one-second take. The proxy's bound is coarse
by design (one counter per key, a one-second window, refusals that cost microseconds); the replicas'
token buckets still hold each key to its exact rate. Keys without a rate are not in the map.

Each proxy counts on its own. With `--proxies N` (N proxy pods behind one Service, which spreads the
connections over them) each gets ceil(limit / N), so that together they hold a key near its limit.

A command for operators, not a process of the service: it compiles the front end's access rules
(`service.frontend.access`) for the proxy.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile

from service.frontend.access import KeysFileError, Principal, load_keys

HEADER = (
    "# sha256 of an API key -> requests it may make in any rolling second at the proxy.\n"
    "# Made by `python -m service.frontend.proxy_limits KEYS_FILE`; reload the proxy after changing it.\n"
)


def per_second(principal: Principal, proxies: int = 1) -> int | None:
    """A proxy's share of the key's largest one-second take, or None for a key without a rate."""
    if principal.rate_per_s is None:
        return None
    return math.ceil(max(principal.burst or 1, math.ceil(principal.rate_per_s)) / proxies)


def rates_map(keys: dict[str, Principal], proxies: int = 1) -> str:
    """The map file's text for `keys` (sha256 hex → principal) on each of `proxies` proxies, sorted so that
    equal keys give equal files."""
    lines = [
        f"# {principal.name}\n{digest} {limit}\n"
        for digest, principal in sorted(keys.items())
        if (limit := per_second(principal, proxies)) is not None
    ]  # a map's value runs to the end of its line
    return HEADER + "".join(lines)


def write_atomically(path: pathlib.Path, text: str) -> None:
    """The proxy never reads half a map: the text goes to a temporary file that then replaces `path`."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    pathlib.Path(tmp.name).chmod(0o644)
    pathlib.Path(tmp.name).replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keys_file", type=pathlib.Path, help="the service's RA_API_KEYS_FILE")
    parser.add_argument("--out", type=pathlib.Path, help="write the map here (default: standard output)")
    parser.add_argument("--proxies", type=int, default=1, help="proxies that share the traffic (each gets 1/N)")
    args = parser.parse_args(argv)
    if args.proxies < 1:
        sys.exit(f"--proxies must be at least 1, not {args.proxies}.")
    try:
        text = rates_map(load_keys(args.keys_file), args.proxies)
    except KeysFileError as exc:
        sys.exit(str(exc))
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomically(args.out, text)


if __name__ == "__main__":
    main()
