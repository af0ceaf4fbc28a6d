"""Host tables (`service.frontend.host_table`): the records every front end of a host shares, and the rate limits and
OIP statistics kept in them. Real files, real processes; each test takes at most a few seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from service_process import REPO

from service.frontend.access import BUCKETS, Access, Denied, KeyRing, Principal, RateLimits, hash_key
from service.frontend.host_table import HostTable, HostTableError, Layout
from service.frontend.oip import STATS, STATS_KEEP, Statistics

COUNTER = np.dtype([("key", "<u8"), ("stamp", "<f8"), ("n", "<i8")])


def table_file(tmp_path, layout: Layout = STATS, name: str = "t.table"):
    path = tmp_path / name
    HostTable.create(path, layout)
    return path


def test_two_tables_on_one_file_see_each_others_writes(tmp_path):
    path = table_file(tmp_path)
    with HostTable(STATS, path) as a, HostTable(STATS, path) as b:
        Statistics(a).succeeded("alpha", 3, 0.25, 0.01, 0.02, 0.03, 0.04)
        Statistics(b).failed("alpha", 0.5)
        for table in (a, b):
            stats = Statistics(table).peek("alpha")
            assert (stats.inference_count, stats.execution_count) == (3, 1)
            assert (stats.success.count, stats.success.ns, stats.fail.count, stats.fail.ns) == (
                1,
                250_000_000,
                1,
                500_000_000,
            )
        assert a.peek("beta") is None and Statistics(b).peek("beta").inference_count == 0
    assert path.stat().st_size == STATS.file_bytes


def seven(row: np.void) -> None:
    row["n"] = 7


def test_a_key_without_a_record_replaces_the_oldest_of_its_window(tmp_path):
    layout = Layout(COUNTER, slots=4, window=4)  # one window: every key probes the same four slots
    with HostTable(layout, table_file(tmp_path, layout)) as table:
        for name, stamp in (("a", 5.0), ("b", 1.0), ("c", 3.0), ("d", 4.0)):
            with table.row(name, seven) as row:
                assert row["n"] == 7  # init ran on the claimed slot
                row["n"], row["stamp"] = 10, stamp
        with table.row("a", seven) as row:
            assert row["n"] == 10  # found: no init
        inits = []
        with table.row("e", inits.append) as row:
            assert len(inits) == 1 and row["n"] == 0 and row["stamp"] > 5.0  # zeroed, stamped now
        assert table.peek("b") is None  # the oldest stamp went
        assert {k: int(table.peek(k)["n"]) for k in "acde"} == {"a": 10, "c": 10, "d": 10, "e": 0}


HOLD = """
import sys, time
from service.frontend.host_table import HostTable
from service.frontend.oip import STATS
table = HostTable(STATS, sys.argv[1])
with table.row("held"):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_process_killed_holding_the_lock_does_not_block_the_others(tmp_path):
    path = table_file(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        with HostTable(STATS, path) as table:
            got = threading.Event()

            def touch() -> None:
                with table.row("mine"):
                    got.set()

            waiter = threading.Thread(target=touch, daemon=True)
            waiter.start()
            assert not got.wait(0.5), "the lock was not held by the child"
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            assert got.wait(1.0), "the lock of a killed process was never released"
            print(f"lock free {time.monotonic() - killed:.3f} s after kill -9")
            waiter.join(1.0)
            assert table.peek("held") is not None  # the child's claim is kept
    finally:
        child.kill()
        child.wait(10)


def test_a_file_of_the_wrong_size_or_layout_is_refused_with_what_to_do(tmp_path):
    path = table_file(tmp_path)
    with pytest.raises(
        HostTableError,
        match=r"is \d+ bytes, but 4096 slots of 40-byte records need 163904.*"
        "Remove it and make it again",
    ):
        HostTable(BUCKETS, path)
    with open(path, "r+b") as f:
        f.truncate(STATS.file_bytes - 1)  # a short file
    with pytest.raises(HostTableError, match=str(STATS.file_bytes)):
        HostTable(STATS, path)
    other = Layout(np.dtype([("key", "<u8"), ("stamp", "<f8"), ("m", "<f8")]), slots=4, window=2)
    same_size = Layout(COUNTER, slots=4, window=2)
    with pytest.raises(HostTableError, match="made for another layout"):
        HostTable(same_size, table_file(tmp_path, other, "other.table"))
    with pytest.raises(HostTableError, match=r"cannot open it.*supervisor makes it"):
        HostTable(STATS, tmp_path / "missing.table")
    with pytest.raises(ValueError, match=r"key \(uint64\) and stamp \(float64\).*\['stamp'\]"):
        Layout(np.dtype([("key", "<u8"), ("n", "<i8")]), slots=4)


def test_token_buckets_burst_then_refill_at_their_rate_once_per_host(tmp_path):
    path = table_file(tmp_path, BUCKETS)
    with HostTable(BUCKETS, path) as one, HostTable(BUCKETS, path) as two:
        front_ends = [RateLimits(one), RateLimits(two)]  # as two front-end processes would
        key = Principal("k", admin=False, rate_per_s=2.0, burst=3)
        assert [front_ends[i % 2].take(key) for i in range(3)] == [0.0, 0.0, 0.0]
        wait = front_ends[1].take(key)
        assert 0.45 < wait <= 0.5, wait  # one token at 2/s
        assert RateLimits(one).take(Principal("other", admin=False, rate_per_s=2.0, burst=1)) == 0.0
        assert front_ends[0].take(Principal("k", admin=False)) == 0.0  # no limit
        time.sleep(0.6)  # 1.2 tokens
        assert front_ends[0].take(key) == 0.0
        wait = front_ends[1].take(key)
        assert 0.3 < wait < 0.45, wait  # 0.2 tokens left
        faster = Principal("k", admin=False, rate_per_s=4.0, burst=2)  # the keys file changed its limit
        waits = [front_ends[i % 2].take(faster) for i in range(3)]
        assert waits[:2] == [0.0, 0.0] and 0.2 < waits[2] <= 0.25, waits  # full with the new burst and rate


def test_over_its_rate_a_key_gets_429_with_retry_after(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "name": "slow",
                        "key_sha256": hash_key("key-slow"),
                        "domains": ["*"],
                        "rate_per_s": 0.05,
                        "burst": 1,
                    }
                ]
            }
        )
    )
    access = Access(None, KeyRing(keys), RateLimits(HostTable(BUCKETS)))
    assert access.decide("GET", "/adapters", "Bearer key-slow").name == "slow"
    with pytest.raises(Denied) as denied:
        access.decide("GET", "/adapters", "Bearer key-slow")
    reason = denied.value.reason
    assert (reason.status, reason.code, reason.headers) == (429, "rate_limited", {"Retry-After": "20"})
    assert reason.detail == "Key 'slow' is over its rate of 0.05 requests/s; retry after the pause."
    assert denied.value.principal.name == "slow"


def test_statistics_keep_at_least_stats_keep_domains():
    stats = Statistics(HostTable(STATS))
    names = [f"domain-{i}" for i in range(STATS_KEEP)]
    for name in names:
        stats.succeeded(name, 1, 0.001, 0, 0, 0, 0)
    assert sum(stats.peek(name).inference_count for name in names) == STATS_KEEP
