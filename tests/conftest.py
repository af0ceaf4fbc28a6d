"""Shared test fixtures: tiny architectures so the suite runs in seconds."""

from __future__ import annotations

import os
import pathlib
from typing import NoReturn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from model.backbone import Backbone
from model.bundle import AdapterBundle
from model.config import ArchConfig
from model.weights import expected_shapes

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    """On CI the reference fixtures must be there: a skipped exactness test would hide a regression."""
    if os.environ.get("CI") and not FIXTURES.is_dir():
        raise pytest.UsageError(f"CI is set but the reference fixtures are missing at {FIXTURES}.")


def random_weights(config: ArchConfig, seed: int, part: str | None = None) -> dict[str, np.ndarray]:
    """Random weights with BatchNorm statistics far from identity, so a wrong fold shows."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(config, part).items():
        var = name.rsplit(".", 1)[1]
        if var == "gamma":
            weights[name] = rng.uniform(0.5, 1.5, shape)
        elif var in ("beta", "moving_mean"):
            weights[name] = rng.normal(0, 0.3, shape)
        elif var == "moving_variance":
            weights[name] = rng.uniform(0.5, 2.0, shape)
        elif var == "bias":
            weights[name] = rng.normal(0, 0.1, shape)
        else:  # conv kernels: He init over fan-in
            fan_in = int(np.prod(shape[:-1]))
            weights[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def make_backbone(config: ArchConfig, seed: int = 0) -> Backbone:
    return Backbone.from_weights(config, random_weights(config, seed, "shared"))


def make_bundle(backbone: Backbone, domain: str, num_classes: int, seed: int) -> AdapterBundle:
    config = backbone.domain_config(num_classes)
    labels = [f"{domain}_label{i}" for i in range(num_classes)]
    return AdapterBundle.from_weights(domain, config, random_weights(config, seed, "domain"), labels, backbone)


@pytest.fixture(scope="session")
def tiny_config() -> ArchConfig:
    return ArchConfig(width_factor=0.25, input_size=16, adapter="series", num_classes=5)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The service tests' tiny backbone and bundles (built once per session, see service_helpers)."""
    from service_helpers import get_assets

    return get_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def ref(assets):
    """A reference engine with every asset bundle, by name."""
    from service_helpers import reference_engine

    return reference_engine(assets)


def unavailable(message: str) -> NoReturn:
    """A tool a test needs is missing: a failure in CI (which installs every tool), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def cluster():
    """A throwaway PostgreSQL cluster on a free loopback port (`bench.harness.postgres`), one per module."""
    from bench.harness.postgres import Cluster, server_bin

    bin_dir = server_bin()
    if bin_dir is None:
        unavailable("PostgreSQL's server is not installed (apt-get install postgresql)")
    cluster = Cluster(bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


CONTAINER_FACTS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def container_facts(request) -> list[str]:
    """Lines the container checks report (build time, image size, ...), printed at the end of the run."""
    return request.config.stash.setdefault(CONTAINER_FACTS, [])


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    facts = config.stash.get(CONTAINER_FACTS, [])
    if facts:
        terminalreporter.section("container checks")
        for line in facts:
            terminalreporter.write_line(line)
