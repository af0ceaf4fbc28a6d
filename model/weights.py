"""Canonical weight names, the shared/domain split, and the backbone fingerprint.

A weight's canonical name is `<layer name>.<variable name>` (e.g. `stage1_block2_conv1_bn.gamma`).
The split is a rule about names: the 25 `*_conv3x3` kernels are shared, everything else
(BatchNorms, adapters, head) belongs to one domain. Stored tensor names never contain the
domain's name, so one bundle loads under any name.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Literal

import numpy as np

from model.config import ArchConfig, conv_units

Part = Literal["shared", "domain"]
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
BN_STATISTICS = ("moving_mean", "moving_variance")  # state, not parameters (not counted)


class WeightsMismatchError(ValueError):
    """Weights whose names or shapes do not fit the architecture."""


def is_shared(name: str) -> bool:
    return name.split(".", 1)[0].endswith("_conv3x3")


def expected_shapes(config: ArchConfig, part: Part | None = None) -> dict[str, tuple[int, ...]]:
    """Every canonical weight name of `config` with its shape, in forward order."""
    return dict(_expected_shapes(config, part))


@functools.cache  # every bundle load validates against it; an ArchConfig is frozen
def _expected_shapes(config: ArchConfig, part: Part | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(layer: str, channels: int) -> None:
        for var in BN_VARIABLES:
            shapes[f"{layer}.{var}"] = (channels,)

    for unit in conv_units(config):
        shapes[f"{unit.name}_conv3x3.kernel"] = (3, 3, unit.in_channels, unit.out_channels)
        if config.adapter == "series":
            batch_norm(f"{unit.name}_adapter_bn", unit.out_channels)
            shapes[f"{unit.name}_adapter.kernel"] = (1, 1, unit.out_channels, unit.out_channels)
        elif config.adapter == "parallel":
            shapes[f"{unit.name}_adapter.kernel"] = (1, 1, unit.in_channels, unit.out_channels)
        batch_norm(f"{unit.name}_bn", unit.out_channels)
    batch_norm("head_bn", config.feature_width)
    shapes["classifier.kernel"] = (config.feature_width, config.num_classes)
    shapes["classifier.bias"] = (config.num_classes,)
    return tuple((k, v) for k, v in shapes.items() if part is None or is_shared(k) == (part == "shared"))


@functools.cache  # a domain's card reports it: computed once per architecture, not per card
def count_parameters(config: ArchConfig, part: Part | None = None) -> int:
    """Learnable parameters, counted as PyTorch's `parameters()` does (BatchNorm statistics excluded)."""
    return sum(
        int(np.prod(shape))
        for name, shape in expected_shapes(config, part).items()
        if name.rsplit(".", 1)[1] not in BN_STATISTICS
    )


def check_weights(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise `WeightsMismatchError` listing every missing, unexpected and misshaped tensor, sorted."""
    if weights.keys() == expected.keys() and all(_shape(weights[k]) == tuple(shape) for k, shape in expected.items()):
        return  # every load of a good file ends here: one comparison per tensor
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k}: expected {tuple(expected[k])}, got {tuple(np.shape(weights[k]))}"
        for k in set(expected) & set(weights)
        if _shape(weights[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"misshaped tensors {misshaped}")
    if problems:
        raise WeightsMismatchError(
            f"{what} do not fit the architecture: "
            + "; ".join(problems)
            + ". Check that the file was made for this adapter mode, width factor and class count."
        )


def _shape(value: object) -> tuple[int, ...]:
    return value.shape if isinstance(value, np.ndarray) else tuple(np.shape(value))


def fingerprint(shared: Mapping[str, np.ndarray]) -> str:
    """sha256 over the shared weights in sorted-name order: name, shape and little-endian float32 bytes."""
    digest = hashlib.sha256()
    for name in sorted(shared):
        array = np.ascontiguousarray(shared[name], dtype="<f4")
        digest.update(name.encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()
