"""Fold one domain's eval-mode weights into the smallest exact per-layer form (numpy, float64 math).

In eval mode a BatchNorm is the affine map `x * s + t` with `s = gamma / sqrt(var + eps)` and
`t = beta - mean * s`, and a series adapter is linear, so each conv unit's per-domain part becomes:

- series:   `y = z @ matrix + bias`, where `z = conv3x3(x)`;
            matrix = (I + diag(s_in) W) diag(s_out), bias = (t_in W) s_out + t_out;
- parallel: `y = conv3x3(x) * scale + x_strided @ side + bias`, side = W diag(s);
- none:     `y = conv3x3(x) * scale + bias`.

The head keeps its BatchNorm (a ReLU follows it) as `scale`/`bias`, then `kernel`/`logit_bias`.
`RowLayout` packs all of it into one float32 vector per domain: the form that the engine's table
holds, the host tier keeps and the loader processes hand over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from model.config import BN_EPSILON, ArchConfig, conv_units


@dataclasses.dataclass(frozen=True)
class FoldedUnit:
    bias: np.ndarray  # (out,)
    matrix: np.ndarray | None = None  # series: (out, out)
    scale: np.ndarray | None = None  # parallel / none: (out,)
    side: np.ndarray | None = None  # parallel: (in, out)


@dataclasses.dataclass(frozen=True)
class FoldedDomain:
    units: dict[str, FoldedUnit]
    head_scale: np.ndarray  # (C,)
    head_bias: np.ndarray  # (C,)
    kernel: np.ndarray  # (C, K)
    logit_bias: np.ndarray  # (K,)

    @property
    def nbytes(self) -> int:
        """Host memory the tables take."""
        arrays = [self.head_scale, self.head_bias, self.kernel, self.logit_bias]
        arrays += [a for u in self.units.values() for a in (u.bias, u.matrix, u.scale, u.side) if a is not None]
        return sum(a.nbytes for a in arrays)


def batch_norm_affine(weights: Mapping[str, np.ndarray], layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of an eval-mode BatchNorm, in float64."""
    gamma, beta, mean, var = (np.asarray(weights[f"{layer}.{v}"], np.float64)
                              for v in ("gamma", "beta", "moving_mean", "moving_variance"))
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale, beta - mean * scale


def fold_domain(config: ArchConfig, weights: Mapping[str, np.ndarray]) -> FoldedDomain:
    """Fold a domain's weights (canonical names) for `config`; outputs are float32."""
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    units = {}
    for unit in conv_units(config):
        s_out, t_out = batch_norm_affine(weights, f"{unit.name}_bn")
        if config.adapter == "series":
            s_in, t_in = batch_norm_affine(weights, f"{unit.name}_adapter_bn")
            w = np.asarray(weights[f"{unit.name}_adapter.kernel"], np.float64)[0, 0]  # (out, out)
            matrix = (np.eye(unit.out_channels) + s_in[:, None] * w) * s_out[None, :]
            units[unit.name] = FoldedUnit(bias=f32((t_in @ w) * s_out + t_out), matrix=f32(matrix))
        elif config.adapter == "parallel":
            w = np.asarray(weights[f"{unit.name}_adapter.kernel"], np.float64)[0, 0]  # (in, out)
            units[unit.name] = FoldedUnit(bias=f32(t_out), scale=f32(s_out), side=f32(w * s_out[None, :]))
        else:
            units[unit.name] = FoldedUnit(bias=f32(t_out), scale=f32(s_out))
    head_scale, head_bias = batch_norm_affine(weights, "head_bn")
    return FoldedDomain(units=units, head_scale=f32(head_scale), head_bias=f32(head_bias),
                        kernel=f32(weights["classifier.kernel"]), logit_bias=f32(weights["classifier.bias"]))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where each folded table sits in a domain's row: one float32 vector, so that a load is one copy.

    The parts of every conv unit come first in forward order, then the head's scale and bias (a
    fixed `base` length for the architecture), then one block of `C + 1` numbers per class: the
    classifier's column for that class and its bias. A domain with K classes therefore packs into
    the first `length(K)` numbers of any wider row, and widening the head appends whole classes.
    """

    parts: tuple[tuple[str, str, tuple[int, ...]], ...]  # (unit, part, shape) in row order
    feature_width: int

    @classmethod
    def of(cls, config: ArchConfig) -> "RowLayout":
        parts = []
        for unit in conv_units(config):
            c_in, c_out = unit.in_channels, unit.out_channels
            if config.adapter == "series":
                parts += [(unit.name, "matrix", (c_out, c_out)), (unit.name, "bias", (c_out,))]
            else:
                parts += [(unit.name, "scale", (c_out,)), (unit.name, "bias", (c_out,))]
                if config.adapter == "parallel":
                    parts.append((unit.name, "side", (c_in, c_out)))
        c = config.feature_width
        parts += [("head", "scale", (c,)), ("head", "bias", (c,))]
        return cls(tuple(parts), c)

    @functools.cached_property
    def offsets(self) -> list[tuple[str, str, tuple[int, ...], int, int]]:
        """(unit, part, shape, start, stop) of each part before the class blocks."""
        out, start = [], 0
        for unit, part, shape in self.parts:
            size = int(np.prod(shape))
            out.append((unit, part, shape, start, start + size))
            start += size
        return out

    @functools.cached_property
    def base(self) -> int:
        return self.offsets[-1][-1]

    def length(self, num_classes: int) -> int:
        return self.base + num_classes * (self.feature_width + 1)

    def num_classes(self, row: np.ndarray) -> int:
        classes, rest = divmod(row.shape[-1] - self.base, self.feature_width + 1)
        if rest or classes < 1:
            raise ValueError(f"A row of {row.shape[-1]} numbers does not fit this layout (base {self.base}, "
                             f"{self.feature_width + 1} per class).")
        return classes

    def pack(self, folded: FoldedDomain) -> np.ndarray:
        """The domain's row: `length(K)` float32 numbers."""
        pieces = []
        for unit, part, _ in self.parts:
            if unit == "head":
                pieces.append(folded.head_scale if part == "scale" else folded.head_bias)
            else:
                pieces.append(getattr(folded.units[unit], part))
        classes = np.concatenate([folded.kernel.T, folded.logit_bias[:, None]], axis=1)  # (K, C + 1)
        return np.concatenate([np.ravel(p) for p in pieces] + [np.ravel(classes)]).astype(np.float32, copy=False)

    def padding(self, classes: int) -> np.ndarray:
        """What widens a row by `classes` classes that score -inf (zero weights, -inf bias); any prefix
        of whole class blocks of it widens by fewer."""
        block = np.zeros((classes, self.feature_width + 1), np.float32)
        block[:, -1] = -np.inf
        return np.ravel(block)

    def unpack(self, row: np.ndarray) -> FoldedDomain:
        """The inverse of `pack`."""
        values: dict[tuple[str, str], np.ndarray] = {}
        for unit, part, shape, start, stop in self.offsets:
            values[unit, part] = row[start:stop].reshape(shape)
        classes = row[self.base:].reshape(self.num_classes(row), self.feature_width + 1)
        units = {}
        for unit, _, _ in self.parts:
            if unit != "head" and unit not in units:
                units[unit] = FoldedUnit(bias=values[unit, "bias"], matrix=values.get((unit, "matrix")),
                                         scale=values.get((unit, "scale")), side=values.get((unit, "side")))
        return FoldedDomain(units=units, head_scale=values["head", "scale"], head_bias=values["head", "bias"],
                            kernel=np.ascontiguousarray(classes[:, :-1].T), logit_bias=classes[:, -1].copy())
