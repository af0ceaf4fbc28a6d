"""The device tier's eviction order under Zipf(1.0) traffic, without a server: the hit rate of the
registry's segmented LRU (`service.engine.eviction`) and of a plain LRU, beside an ideal cache of the same
size (the most requested domains that fit). One request is one lookup; the first of a domain's
requests loads it, the second and later ones count as served again (as the registry sees them).

    python -m bench.eviction --domains 10000 --slots 512
    python -m bench.eviction --domains 100000 --slots 16929 --requests 2000000

Prints one JSON object: `hit_rate` by order over the requests after the first `--warm` (the cache
starts empty), and each over the ideal.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from service.engine.eviction import SegmentedLru


def zipf_requests(domains: int, count: int, seed: int) -> list[int]:
    weights = 1.0 / np.arange(1, domains + 1)
    return np.random.default_rng(seed).choice(domains, size=count, p=weights / weights.sum()).tolist()


def segmented(requests: list[int], slots: int, warm: int) -> float:
    order, served, hits = SegmentedLru(), set(), 0
    for i, key in enumerate(requests):
        name = str(key)
        if name in order:
            hits += i >= warm
            order.touch(name)
        else:
            if len(order) >= slots:
                victim = next(iter(order))
                order.discard(victim)
                served.discard(victim)
            order.add(name)
        if name in served:
            order.promote(name, slots)
        served.add(name)
    return hits / (len(requests) - warm)


def lru(requests: list[int], slots: int, warm: int) -> float:
    order, hits = collections.OrderedDict(), 0
    for i, key in enumerate(requests):
        if key in order:
            hits += i >= warm
            order.move_to_end(key)
        else:
            if len(order) >= slots:
                order.popitem(last=False)
            order[key] = None
    return hits / (len(requests) - warm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--warm", type=int, default=None, help="requests not counted (default: a fifth)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    warm = args.requests // 5 if args.warm is None else args.warm
    requests = zipf_requests(args.domains, args.requests, args.seed)
    weights = 1.0 / np.arange(1, args.domains + 1)
    ideal = float(weights[: args.slots].sum() / weights.sum())
    rates = {"segmented_lru": segmented(requests, args.slots, warm), "lru": lru(requests, args.slots, warm)}
    print(
        json.dumps(
            {
                "domains": args.domains,
                "slots": args.slots,
                "requests": args.requests,
                "warm": warm,
                "ideal": round(ideal, 4),
                "hit_rate": {k: round(v, 4) for k, v in rates.items()},
                "over_ideal": {k: round(v / ideal, 3) for k, v in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
