"""Domains for a bench: a directory store seeded with many (hard links to the demo bundles), and the
Zipf traffic over them that a few customers' hot domains make."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from bench.harness.servers import demo_bundles


def seed(store: pathlib.Path, count: int) -> list[str]:
    """`count` domains `d000000...`, each version 1 a hard link to one of the demo bundles."""
    sources = demo_bundles()
    names = [f"d{i:06d}" for i in range(count)]
    for i, name in enumerate(names):
        (store / name).mkdir()
        os.link(sources[i % len(sources)], store / name / "000001.safetensors")
    return names


def zipf_sequence(names: list[str], length: int, draw: int = 0) -> list[str]:
    """Requests drawn from Zipf(1.0) over `names` (rank 1 the most popular), in random order. Which
    name holds which rank is fixed; `draw` picks another sequence of draws from the same popularity."""
    ranks = np.arange(1, len(names) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(names))  # which name holds which rank
    rng = rng if draw == 0 else np.random.default_rng(draw)
    return [names[order[r]] for r in rng.choice(len(names), size=length, p=p)]


def ideal_hit_rate(count: int, fits: int) -> float:
    """The share of Zipf(1.0) requests over `count` domains that go to the `fits` most requested."""
    weights = 1.0 / np.arange(1, count + 1)
    return round(float(weights[:fits].sum() / weights.sum()), 4)


def zipf_weighted(names: list[str], exponent: float, length: int = 8192, seed: int = 3) -> list[str]:
    """`length` domain names drawn with probability ~ 1/rank**exponent (names[0] is the hottest)."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    picks = np.random.default_rng(seed).choice(len(names), size=length, p=weights / weights.sum())
    return [names[i] for i in picks]
