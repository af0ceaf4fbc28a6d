"""Domains on demand: the registry's device and host tiers over the registry of record.

In-process, with a real engine and a real directory record: LRU order, pinning, leases that keep a
domain in use from eviction, de-duplicated loads, no retracing while many domains cycle through few
slots, the host tier's exact round trip, a broken stored bundle, and pagination over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

import msgspec
import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import ADMIN_TOKEN, AUTH, bundle_file, png_bytes

from model.engine import InferenceEngine
from model.folding import fold_domain
from model.preprocessing import open_image, preprocess
from service.boot import single_process_app
from service.engine.loader import Loader
from service.engine.registry import AdapterUnavailable, Limits, Registry, UnknownDomainError
from service.metrics import Metrics
from service.record.directory import DirectoryRecord
from service.settings import Settings


def make_registry(assets, store, **limits) -> Registry:
    engine = InferenceEngine(assets.backbone, capacity=limits.pop("capacity", 16), class_capacity=8)
    engine.warm_up((1, 2))
    return Registry(engine, DirectoryRecord(store), Metrics(), Loader(assets.backbone), Limits(**limits))


def fill(store, assets, names: list[str], source: str = "beta") -> None:
    record = DirectoryRecord(store)
    for name in names:
        record.add(name, assets.data(source), replace=False)


def counter(registry: Registry, name: str, **labels) -> float:
    return registry.metrics.registry.get_sample_value(name, labels) or 0.0


async def use(registry: Registry, *domains: str) -> None:
    for domain in domains:
        registry.release([await registry.acquire(domain)])


def tiers(registry: Registry) -> dict[str, str]:
    return {e.domain: e.tier for e in registry.entries()}


def test_least_recently_used_leaves_the_device_first(assets, tmp_path):
    fill(tmp_path, assets, ["d0", "d1", "d2", "d3"])

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=3)
        await use(registry, "d0", "d1", "d2", "d0")  # d1 is now the least recently used
        await use(registry, "d3")
        await asyncio.sleep(0.2)  # the evicted tables are copied to host memory in a thread
        first = tiers(registry)
        await use(registry, "d2", "d1")  # d1 comes back from host memory; d0 is now the oldest
        await asyncio.sleep(0.2)
        return first, tiers(registry), registry

    first, second, registry = asyncio.run(main())
    assert first == {"d0": "device", "d1": "host", "d2": "device", "d3": "device"}
    assert second == {"d0": "host", "d1": "device", "d2": "device", "d3": "device"}
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="ok") == 4
    assert counter(registry, "ra_adapter_loads_total", source="host", outcome="ok") == 1
    assert counter(registry, "ra_adapter_evictions_total", tier="device") == 2


@pytest.mark.parametrize("k", [1, 3])
def test_a_budget_of_k_domains_holds_exactly_k_and_evicts_the_least_recently_used(assets, tmp_path, k):
    names = [f"d{i}" for i in range(k + 1)]
    fill(tmp_path, assets, names)

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=None, host_cache_bytes=0)
        row = registry.engine.row_bytes
        registry.limits = dataclasses.replace(registry.limits, device_bytes=(k + 1) * row - 1)  # k, not k + 1
        assert registry.max_resident == k
        held = await registry.acquire(names[0]) if k > 1 else None  # the least recently used, but leased
        await use(registry, *names[1 if held else 0 : k])
        full = tiers(registry)
        await use(registry, names[k])  # one more than fits
        after = tiers(registry)
        if held is not None:
            registry.release([held])
        return full, after

    full, after = asyncio.run(main())
    assert full == dict.fromkeys(names[:k], "device")
    evicted = names[1] if k > 1 else names[0]  # the least recently used that no request holds
    assert after == {name: "device" for name in names if name != evicted}  # no host tier: it left the cache


async def serve(registry: Registry, *domains: str) -> None:
    """Requests that classify an image each (a card fetch alone serves none)."""
    for domain in domains:
        registry.release([await registry.acquire(domain)], images=1)


def test_a_domain_served_again_outlives_a_stream_of_domains_requested_once(assets, tmp_path):
    """Segmented LRU: one-off requests cycle through probation; a plain LRU would evict `hot` here."""
    once = [f"once{i}" for i in range(6)]
    fill(tmp_path, assets, ["hot", "warm", *once])

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=3, host_cache_bytes=0)
        await serve(registry, "hot", "warm", "hot")  # hot served twice: protected
        await serve(registry, *once)  # each one-off evicts probation's least recent, never hot
        return tiers(registry)

    resident = asyncio.run(main())
    assert resident.get("hot") == "device" and "warm" not in resident
    assert sorted(resident) == ["hot", "once4", "once5"]


def test_warming_the_host_tier_makes_first_requests_a_row_copy(assets, tmp_path):
    names = [f"d{i}" for i in range(5)]
    fill(tmp_path, assets, names)

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=1, host_cache_bytes=1)
        registry.limits = dataclasses.replace(registry.limits, host_cache_bytes=3 * registry.engine.row_bytes)
        added = await registry.warm_host(names)  # room for three
        before, slots = tiers(registry), registry.engine.loaded
        loads = counter(registry, "ra_adapter_loads_total", source="registry", outcome="ok")
        await serve(registry, "d1")
        return added, before, slots, loads, tiers(registry), registry

    added, before, slots, loads, after, registry = asyncio.run(main())
    assert added == 3 and before == {"d0": "host", "d1": "host", "d2": "host"}
    assert slots == 0  # the spare slots they were self-tested in went back
    assert after == {"d0": "host", "d1": "device", "d2": "host"}
    assert counter(registry, "ra_adapter_loads_total", source="host", outcome="ok") == 1
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="ok") == loads


def test_concurrent_cold_loads_do_not_evict_each_others_domains_before_use(assets, tmp_path):
    """Many first requests at once for more domains than fit: each gets its domain (a freshly loaded
    one waits for its requests before it may be evicted), instead of 503 "kept being evicted"."""
    names = [f"c{i}" for i in range(12)]
    fill(tmp_path, assets, names)

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=3, host_cache_bytes=0)

        async def request(domain):
            entry = await registry.acquire(domain)
            await asyncio.sleep(0.01)  # the batch computes
            registry.release([entry], images=1)

        return await asyncio.gather(*(request(name) for name in names * 2), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [o for o in outcomes if o is not None] == []


def test_a_cold_load_leases_its_domain_to_the_waiting_requests_before_anything_else_runs(assets, tmp_path):
    """Another load making room in the very next step of the event loop (before the waiting requests
    wake) must not evict the domain they waited for: the load leases it for them as it lands."""
    fill(tmp_path, assets, ["a"])

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=1, host_cache_bytes=0)
        cache, publish = registry._cache, registry._cache.publish

        def publish_then_another_load_makes_room(entry):
            publish(entry)
            asyncio.get_running_loop().call_soon(cache.make_room)

        cache.publish = publish_then_another_load_makes_room
        entries = await asyncio.gather(*(registry.acquire("a") for _ in range(3)))
        assert all(e.slot is not None for e in entries) and entries[0].leases == 3
        registry.release(entries, images=1)
        assert entries[0].leases == 0

    asyncio.run(main())


def test_the_eviction_order_protects_served_keys_within_their_share():
    from service.engine.eviction import SegmentedLru

    order = SegmentedLru(protected_share=0.5)
    for key in "abcd":
        order.add(key)
    assert list(order) == ["a", "b", "c", "d"]
    order.promote("b", capacity=4)
    order.touch("a")
    assert list(order) == ["c", "d", "a", "b"]  # probation, least recent first; then protected
    order.promote("c", capacity=4)
    order.promote("d", capacity=4)  # protected holds 2 of 4: its least recent (b) back to probation's end
    assert list(order) == ["a", "b", "c", "d"] and len(order) == 4
    order.discard("c")
    order.promote("zz", capacity=4)  # not held: nothing happens
    assert list(order) == ["a", "b", "d"] and "zz" not in order


def test_the_budget_comes_from_the_setting_or_the_memory_available(tmp_path):
    from service.engine import residency
    from service.views import DeviceReport

    cpu = DeviceReport("TensorFlow", ("CPU",), False, "float32")
    gpu = DeviceReport("TensorFlow", ("GPU:0",), True, "float32")
    given = residency.budget(Settings(device_memory_mb=10, max_resident=5), cpu)
    assert (given.bytes, given.source, given.cap) == (10 * 1024 * 1024, "RA_DEVICE_MEMORY_MB", 5)
    assert given.fits(1024 * 1024) == 5 and given.fits(4 * 1024 * 1024) == 2
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000000 kB\n")
    assert residency.available_host_bytes(meminfo, tmp_path / "no-cgroup") == 2_048_000_000
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "memory.max").write_text("1073741824\n")  # a container limited to 1 GiB, 256 MiB used
    (tmp_path / "v2" / "memory.current").write_text("268435456\n")
    assert residency.available_host_bytes(meminfo, tmp_path / "v2") == 805_306_368
    (tmp_path / "v2" / "memory.max").write_text("max\n")
    assert residency.available_host_bytes(meminfo, tmp_path / "v2") == 2_048_000_000
    (tmp_path / "v1" / "memory").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    (tmp_path / "v1" / "memory" / "memory.usage_in_bytes").write_text("1\n")
    assert residency.available_host_bytes(meminfo, tmp_path / "v1") == 2_048_000_000
    default = residency.budget(Settings(), cpu)
    assert default.source == "0.5 of the host memory available at start" and default.cap is None
    assert residency.budget(Settings(), gpu).bytes == residency.GPU_DEFAULT_MB * 1024 * 1024  # free memory unknown
    probed = DeviceReport("JAX", ("GPU:0",), True, "float32", free_bytes=100 * 1024 * 1024)
    assert residency.budget(Settings(device_memory_fraction=0.9, trainers=0), probed).bytes == 90 * 1024 * 1024
    shared = residency.budget(Settings(trainers=2, trainer_gpu_memory_mb=256), probed)  # 512 MB for training
    assert shared.bytes == 0 and "training workers" in shared.source
    big = DeviceReport("JAX", ("GPU:0",), True, "float32", free_bytes=1000 * 1024 * 1024)
    assert residency.budget(Settings(trainers=1, trainer_gpu_memory_mb=400), big).bytes == 300 * 1024 * 1024
    assert residency.host_cache_bytes(Settings(), cpu) == 0  # one memory on a CPU host: no second copy
    # with a cap, the rest of the budget holds evicted rows (a domain is in one tier or the other)
    assert residency.host_cache_bytes(Settings(), cpu, given, row_bytes=1024 * 1024) == 5 * 1024 * 1024
    assert residency.host_cache_bytes(Settings(), gpu) == 1024 * 1024 * 1024
    assert residency.host_cache_bytes(Settings(host_cache_mb=8), cpu) == 8 * 1024 * 1024


def test_without_a_budget_figure_the_cap_alone_counts_and_the_budget_follows_the_row_size(assets, tmp_path):
    registry = make_registry(assets, tmp_path, max_resident=7)
    assert registry.max_resident == 7  # no budget: RA_MAX_RESIDENT alone
    registry.limits = dataclasses.replace(registry.limits, device_bytes=100 * registry.engine.row_bytes)
    assert registry.max_resident == 7  # under the cap
    registry.limits = dataclasses.replace(registry.limits, max_resident=None)
    assert registry.max_resident == 100


def test_without_a_host_tier_an_evicted_domain_reloads_from_the_record_with_the_same_answers(assets, tmp_path):
    fill(tmp_path, assets, ["d0", "d1"])
    x = preprocess(open_image(png_bytes(5)), assets.bundles["beta"].preprocessing)[None]

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=1, host_cache_bytes=0)  # a CPU host's default
        entry = await registry.acquire("d0")
        before = registry.engine.predict(x, entry.slot)[0]
        registry.release([entry])
        await use(registry, "d1")  # d0 leaves the cache entirely
        await asyncio.sleep(0.1)
        gone = "d0" not in registry
        entry = await registry.acquire("d0")  # read, validated and folded again
        after = registry.engine.predict(x, entry.slot)[0]
        registry.release([entry])
        return gone, before, after, registry

    gone, before, after, registry = asyncio.run(main())
    assert gone and registry.resident("host") == 0
    np.testing.assert_array_equal(before, after)
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="ok") == 3


def test_host_tier_is_bounded_and_round_trips_exactly(assets, tmp_path):
    fill(tmp_path, assets, [f"d{i}" for i in range(6)])
    x = preprocess(open_image(png_bytes(3)), assets.bundles["beta"].preprocessing)[None]

    per_domain = fold_domain(assets.bundles["beta"].config, assets.bundles["beta"].weights).nbytes  # its row
    budget = int(2.5 * per_domain)  # room for two evicted domains

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=2, host_cache_bytes=budget)
        entry = await registry.acquire("d0")
        before = registry.engine.predict(x, entry.slot)[0]
        registry.release([entry])
        await use(registry, "d1", "d2")  # d0 -> host
        await asyncio.sleep(0.2)
        assert registry.cached("d0").tier == "host"
        entry = await registry.acquire("d0")  # back from host memory: a table write, no validation
        after = registry.engine.predict(x, entry.slot)[0]
        registry.release([entry])
        await use(registry, "d3", "d4", "d5")
        await asyncio.sleep(0.3)
        return before, after, registry

    before, after, registry = asyncio.run(main())
    np.testing.assert_array_equal(before, after)
    assert 0 < registry.metrics.registry.get_sample_value("ra_host_cache_bytes") <= budget
    assert registry.resident("host") == 2  # older host copies were dropped to stay within the budget
    assert counter(registry, "ra_adapter_evictions_total", tier="host") >= 1


def test_pinned_and_leased_domains_are_never_evicted(assets, tmp_path):
    fill(tmp_path, assets, [f"d{i}" for i in range(8)])
    x = preprocess(open_image(png_bytes(4)), assets.bundles["beta"].preprocessing)[None]

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=3, pinned=frozenset({"d0"}))
        await use(registry, "d0")
        held = await registry.acquire("d1")  # a request still holds d1 (queued or computing)
        want = registry.engine.predict(x, held.slot)[0]
        await use(registry, "d2", "d3", "d4", "d5", "d6", "d7")
        got = registry.engine.predict(x, held.slot)[0]  # its slot was not reused meanwhile
        state = tiers(registry)
        registry.release([held])
        await use(registry, "d2", "d3")
        return want, got, state, tiers(registry)

    want, got, during, after = asyncio.run(main())
    np.testing.assert_array_equal(want, got)
    assert during["d0"] == "device" and during["d1"] == "device"
    assert after["d0"] == "device" and after["d1"] != "device"  # released: now it may go


def test_a_hundred_requests_for_one_cold_domain_cause_one_load(assets, tmp_path):
    fill(tmp_path, assets, ["cold"])

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=4)
        entries = await asyncio.gather(*(registry.acquire("cold") for _ in range(100)))
        registry.release(entries)
        return registry, {id(e) for e in entries}

    registry, distinct = asyncio.run(main())
    assert len(distinct) == 1
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="ok") == 1
    assert counter(registry, "ra_adapter_lookups_total", tier="host", result="miss") == 1


class GatedLoader(Loader):
    """The real loader, made to wait for `gate` before it prepares a bundle (a slow load in progress)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.gate, self.waiting = asyncio.Event(), asyncio.Event()

    async def prepare(self, data, domain):
        self.waiting.set()
        await self.gate.wait()
        return await super().prepare(data, domain)


def test_resident_domains_are_served_while_a_cold_domain_loads(assets, tmp_path):
    fill(tmp_path, assets, ["hot", "cold"])
    x = preprocess(open_image(png_bytes(6)), assets.bundles["beta"].preprocessing)[None]

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=4)
        await use(registry, "hot")
        loader = registry.loader = GatedLoader(assets.backbone)
        cold = asyncio.create_task(registry.acquire("cold"))  # its load starts at once and waits
        await asyncio.wait_for(loader.waiting.wait(), 10)
        served = []
        for _ in range(3):  # meanwhile the resident domain is leased and computed at once
            entry = await asyncio.wait_for(registry.acquire("hot"), 1)
            served.append(registry.engine.predict(x, entry.slot)[0])
            registry.release([entry])
        still_loading = not cold.done()
        loader.gate.set()
        entry = await asyncio.wait_for(cold, 10)
        registry.release([entry])
        return served, still_loading, entry.tier

    served, still_loading, tier = asyncio.run(main())
    assert still_loading and len(served) == 3 and tier == "device"


def test_a_load_that_fails_answers_every_waiting_request_with_the_same_503(assets, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "000001.safetensors").write_bytes(np.random.default_rng(1).bytes(3000))

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=4)
        loader = registry.loader = GatedLoader(assets.backbone)
        waiting = [asyncio.create_task(registry.acquire("broken")) for _ in range(20)]
        await asyncio.wait_for(loader.waiting.wait(), 10)  # all 20 wait on the one load
        loader.gate.set()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        return registry, outcomes

    registry, outcomes = asyncio.run(main())
    assert all(isinstance(o, AdapterUnavailable) for o in outcomes)
    assert len({str(o) for o in outcomes}) == 1 and "passes validation" in str(outcomes[0])
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="invalid") == 1


def test_cycling_many_domains_through_few_slots_never_retraces(assets, tmp_path):
    names = [f"d{i:02d}" for i in range(30)]
    fill(tmp_path, assets, names)
    x = preprocess(open_image(png_bytes(5)), assets.bundles["beta"].preprocessing)[None]

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=4, capacity=16, host_cache_bytes=0)
        await use(registry, *names[:4])
        before = registry.engine.tracing_count(), registry.engine.capacity
        for _ in range(2):
            for name in names:
                entry = await registry.acquire(name)
                registry.engine.predict(np.repeat(x, 2, 0), entry.slot)
                registry.release([entry])
        return before, (registry.engine.tracing_count(), registry.engine.capacity), registry

    before, after, registry = asyncio.run(main())
    assert after == before  # no retrace, no growth
    assert registry.resident("device") == 4
    assert counter(registry, "ra_adapter_evictions_total", tier="device") >= 50


def test_unknown_and_broken_domains(assets, tmp_path):
    fill(tmp_path, assets, ["fine"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "000001.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))

    async def main():
        registry = make_registry(assets, tmp_path, max_resident=4)
        with pytest.raises(UnknownDomainError):
            await registry.acquire("nope")
        with pytest.raises(UnknownDomainError):
            await registry.acquire("../etc")
        with pytest.raises(AdapterUnavailable, match="passes validation") as info:
            await registry.acquire("broken")
        await use(registry, "fine")  # other domains are unaffected
        with pytest.raises(AdapterUnavailable):  # remembered: not read again
            await registry.acquire("broken")
        return registry, str(info.value)

    registry, message = asyncio.run(main())
    assert "v1" in message and "safetensors" in message
    assert counter(registry, "ra_adapter_loads_total", source="registry", outcome="invalid") == 1


def test_listing_pages_and_a_broken_bundle_over_http(assets, tmp_path):
    names = [f"acme-{i:02d}" for i in range(23)] + ["zeta-a", "zeta-b"]
    fill(tmp_path, assets, names)
    (tmp_path / "zeta-c").mkdir()
    (tmp_path / "zeta-c" / "000001.safetensors").write_bytes(b"\x00" * 100)
    settings = Settings(
        backbone=assets.backbone_path,
        store_dir=tmp_path,
        demo_adapters=False,
        admin_token=ADMIN_TOKEN,
        max_resident=4,
        preprocess_threads=1,
        max_fanout=3,
    )
    with TestClient(single_process_app(settings), raise_server_exceptions=False) as client:
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
            body = client.get("/adapters", params=params).json()
            seen += [a["domain"] for a in body["adapters"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted([*names, "zeta-c"]) and pages == 3
        zetas = client.get("/adapters", params={"prefix": "zeta-"}).json()
        assert [a["domain"] for a in zetas["adapters"]] == ["zeta-a", "zeta-b", "zeta-c"]
        assert zetas["next_cursor"] is None
        assert client.get("/adapters", params={"limit": 0}).status_code == 422

        response = client.post("/predict/acme-07", files={"file": ("x.png", png_bytes(1))})
        assert response.status_code == 200, response.text
        listed = {a["domain"]: a for a in client.get("/adapters", params={"prefix": "acme-0"}).json()["adapters"]}
        assert listed["acme-07"]["tier"] == "device" and listed["acme-07"]["num_classes"] == 3
        assert client.get("/adapters/acme-07").json()["tier"] == "device"

        broken = client.post("/predict/zeta-c", files={"file": ("x.png", png_bytes(1))})
        assert broken.status_code == 503 and broken.json()["error"] == "adapter_unavailable", broken.text
        assert "validation" in broken.json()["detail"] and broken.headers["Retry-After"]
        assert client.post("/predict/zeta-a", files={"file": ("x.png", png_bytes(1))}).status_code == 200
        too_many = client.post("/predict", files={"file": ("x.png", png_bytes(1))}, data={"domains": "all"})
        assert too_many.status_code == 400 and too_many.json()["error"] == "too_many_domains"
        metrics = client.get("/metrics").text
        assert re.search(r'^ra_adapter_loads_total\{outcome="invalid",source="registry"\} 1\.0$', metrics, re.M)


def test_start_up_loads_pinned_domains_and_warms_the_most_used(assets, tmp_path):
    fill(tmp_path, assets, [f"d{i}" for i in range(6)])
    settings = Settings(
        backbone=assets.backbone_path,
        store_dir=tmp_path,
        demo_adapters=False,
        admin_token=ADMIN_TOKEN,
        max_resident=4,
        preprocess_threads=1,
        pinned="d5",
    )
    with TestClient(single_process_app(settings)) as client:
        for domain in ("d2", "d2", "d3"):
            assert client.post(f"/predict/{domain}", files={"file": ("x.png", png_bytes(1))}).status_code == 200
        pinned = client.post(
            "/adapters", headers=AUTH, files=bundle_file(assets.data("gamma")), data={"domain": "g", "pin": "true"}
        )
        assert pinned.status_code == 201 and pinned.json()["pinned"] is True
    # usage counts were written on shutdown; a restart loads the pinned domains, then warms d2 and d3
    with TestClient(single_process_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["ready"]
        by_name = {}
        for _ in range(100):
            by_name = {a["domain"]: a for a in client.get("/adapters").json()["adapters"]}
            if by_name["d2"]["tier"] == "device" and by_name["d3"]["tier"] == "device":
                break
            asyncio.run(asyncio.sleep(0.05))
        assert by_name["d5"]["pinned"] and by_name["g"]["pinned"]
        assert {d for d, a in by_name.items() if a["tier"] == "device"} >= {"d5", "g", "d2", "d3"}
        assert by_name["d0"]["tier"] == "registry"


def test_a_front_end_keeps_the_cards_of_every_domain_the_engine_holds(assets, tmp_path, monkeypatch):
    """A card forgotten while its domain stays resident would cost an engine round trip on its next request."""
    from service.frontend import inference
    from service.views import Residency

    front = inference.Inference(None, Settings(), None)
    held = Residency(
        budget_mb=1, budget_source="test", bytes_per_domain=2**20, fits=17_000, resident=0, host_cache_mb=512
    )
    front.follow_residency(held)
    assert front.cards_keep == 17_000 + 512
    front.follow_residency(msgspec.structs.replace(held, fits=10, host_cache_mb=0))
    assert front.cards_keep == inference.CARDS_KEEP

    monkeypatch.setattr(inference, "CARDS_KEEP", 2)
    fill(tmp_path, assets, ["a", "b", "c", "d"])
    settings = Settings(
        backbone=assets.backbone_path, store_dir=tmp_path, demo_adapters=False, max_resident=4, preprocess_threads=1
    )
    with TestClient(single_process_app(settings)) as client:
        for domain in ("a", "b", "c", "d", "a"):
            assert client.post(f"/predict/{domain}", files={"file": ("x.png", png_bytes(1))}).status_code == 200
        residency = client.get("/readyz").json()["residency"]
        held = residency["fits"] + int(residency["host_cache_mb"] * 2**20) // residency["bytes_per_domain"]
        front = client.app.state.service.inference
        assert held > 4 and front.cards_keep == held  # the host tier has the rest of the budget
        assert list(front._cards) == ["b", "c", "d", "a"]  # none forgotten


def test_while_serving_the_youngest_generation_is_collected_rarely(assets, tmp_path):
    """Full collections walk every resident domain's objects; the young collections that trigger them are
    rare while the engine serves, and the process's own thresholds come back when it stops."""
    import gc

    from service.engine.core import GC_YOUNG_THRESHOLD

    before = gc.get_threshold()
    settings = Settings(backbone=assets.backbone_path, store_dir=tmp_path, demo_adapters=False, preprocess_threads=1)
    with TestClient(single_process_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]) != before
    assert gc.get_threshold() == before
