"""Random but well-conditioned weights, timing and medians, for the benches that run the model in process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from model.backbone import Backbone
from model.bundle import AdapterBundle
from model.config import ArchConfig
from model.weights import expected_shapes


def random_weights(config: ArchConfig, seed: int, part: str | None = None) -> dict[str, np.ndarray]:
    """He-initialised kernels and BatchNorms near identity: realistic magnitudes for timing."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config, part).items():
        var = name.rsplit(".", 1)[1]
        if var in ("gamma", "moving_variance"):
            out[name] = rng.uniform(0.8, 1.2, shape)
        elif var in ("beta", "moving_mean", "bias"):
            out[name] = rng.normal(0, 0.05, shape)
        else:
            out[name] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def random_backbone(config: ArchConfig, seed: int = 0) -> Backbone:
    return Backbone.from_weights(config, random_weights(config, seed, "shared"))


def random_bundle(backbone: Backbone, domain: str, num_classes: int, seed: int) -> AdapterBundle:
    config = backbone.domain_config(num_classes)
    labels = [f"c{i}" for i in range(num_classes)]
    return AdapterBundle.from_weights(domain, config, random_weights(config, seed, "domain"), labels, backbone)


def time_call(fn: Callable[[], object], min_seconds: float, min_calls: int = 3) -> float:
    """Seconds per call of `fn`, averaged over at least `min_calls` calls and `min_seconds`."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def median(values: list[float]) -> float:
    return float(statistics.median(values))
