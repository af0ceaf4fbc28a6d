"""The architecture's hyper-parameters, shared by the Keras model, the files and the engine."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

AdapterMode = Literal["series", "parallel", "none"]
ADAPTER_MODES: tuple[str, ...] = ("series", "parallel", "none")

STAGE_WIDTHS = (64, 128, 256)  # times the width factor; the stem has 32
BLOCKS_PER_STAGE = 4
BN_EPSILON = 1e-5  # every BatchNorm's, as in the reference


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """What fixes every tensor shape of a ResNet-26 with residual adapters.

    Args:
        width_factor: multiplies the widths 32/64/128/256 (the reference's `config_task.factor`).
        input_size: side of the square input image; a multiple of 8 (three stride-2 stages
            whose avg-pool shortcuts need even sides).
        adapter: "series", "parallel" or "none" (BatchNorms only per domain).
        num_classes: rows of the classifier head.
    """

    width_factor: float = 1.0
    input_size: int = 64
    adapter: AdapterMode = "series"
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_MODES:
            raise ValueError(f"adapter must be one of {ADAPTER_MODES}. Received: adapter={self.adapter!r}")
        if not math.isfinite(self.width_factor) or int(32 * self.width_factor) < 1:
            raise ValueError(
                f"width_factor must make the stem at least 1 channel wide. Received: width_factor={self.width_factor}"
            )
        if self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"input_size must be a positive multiple of 8. Received: input_size={self.input_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1. Received: num_classes={self.num_classes}")

    @property
    def stem_width(self) -> int:
        return int(32 * self.width_factor)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(int(w * self.width_factor) for w in STAGE_WIDTHS)

    @property
    def feature_width(self) -> int:
        return self.stage_widths[-1]

    def replace(self, **changes: object) -> ArchConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ConvUnit:
    """One shared 3x3 convolution and the per-domain parts around it (the reference's `conv_task`)."""

    name: str
    in_channels: int
    out_channels: int
    stride: int


def conv_units(config: ArchConfig) -> list[ConvUnit]:
    """The 25 conv units in forward order: the stem, then conv1/conv2 of each of the 12 blocks."""
    return list(_conv_units(config))


@functools.cache  # every bundle load asks (validation, folding); an ArchConfig is frozen
def _conv_units(config: ArchConfig) -> tuple[ConvUnit, ...]:
    units = [ConvUnit("stem", 3, config.stem_width, 1)]
    in_ch = config.stem_width
    for s, width in enumerate(config.stage_widths, start=1):
        for b in range(1, BLOCKS_PER_STAGE + 1):
            stride = 2 if b == 1 else 1
            units.append(ConvUnit(f"stage{s}_block{b}_conv1", in_ch, width, stride))
            units.append(ConvUnit(f"stage{s}_block{b}_conv2", width, width, 1))
            in_ch = width
    return tuple(units)


@dataclasses.dataclass(frozen=True)
class Block:
    """A basic block: two conv units, and a shortcut that pools and pads when the shape changes."""

    conv1: ConvUnit
    conv2: ConvUnit

    @property
    def name(self) -> str:
        return self.conv1.name.rsplit("_", 1)[0]

    @property
    def projects(self) -> bool:
        """The shortcut pools (2x2 average) and zero-pads channels instead of passing `x` through."""
        return self.conv1.stride != 1 or self.conv1.in_channels != self.conv1.out_channels


def topology(config: ArchConfig) -> tuple[ConvUnit, list[Block]]:
    """The stem and the 12 blocks in forward order: the one plan the Keras model and the engine both follow."""
    units = conv_units(config)
    return units[0], [Block(c1, c2) for c1, c2 in zip(units[1::2], units[2::2])]
