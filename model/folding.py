"""Fold one domain's eval-mode weights into the smallest exact per-layer form: one float32 row.

In eval mode a BatchNorm is the affine map `x * s + t` with `s = gamma / sqrt(var + eps)` and
`t = beta - mean * s`, and a series adapter is linear, so each conv unit's per-domain part becomes:

- series:   `y = z @ matrix + bias`, where `z = conv3x3(x)`;
            matrix = (I + diag(s_in) W) diag(s_out), bias = (t_in W) s_out + t_out;
- parallel: `y = conv3x3(x) * scale + x_strided @ side + bias`, side = W diag(s);
- none:     `y = conv3x3(x) * scale + bias`.

The head keeps its BatchNorm (a ReLU follows it) as `scale`/`bias`, then `kernel`/`logit_bias`.
`RowLayout` places all of it in one float32 vector per domain: the form that the engine's table
holds, the host tier keeps and the loader processes hand over.

The math is float64, rounded once to float32. A fold is on the path of every cold domain's first
request, so it works on runs of same-shaped units at once (a few dozen array operations in all, where
unit by unit it would be a few hundred) and writes straight into the row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from model.config import BN_EPSILON, ArchConfig, conv_units

BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def fold_domain(config: ArchConfig, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """A domain's weights (canonical names) for `config`, folded into its row (`RowLayout`)."""
    return RowLayout.of(config).fold(weights)


def batch_norm_affine(weights: Mapping[str, np.ndarray], names: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of eval-mode BatchNorms, concatenated in order, in float64; `names`: their gammas',
    betas', means' and variances' tensor names (`RowLayout._names`)."""
    gamma, beta, mean, var = (np.concatenate([weights[name] for name in group], dtype=np.float64) for group in names)
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale, beta - mean * scale


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
    adapter: str

    @classmethod
    @functools.cache  # one per architecture: every load folds with it
    def of(cls, config: ArchConfig) -> RowLayout:
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
        return cls(tuple(parts), c, config.adapter)

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

    @functools.cached_property
    def _units(self) -> list[tuple[str, dict[str, tuple[int, int, tuple[int, ...]]], int, int]]:
        """Each conv unit (then the head) as (name, {part: (start, stop, shape)}, channel start, channel stop):
        where its parts sit in the row, and its BatchNorms' channels in the concatenation of all of them."""
        units: dict[str, dict[str, tuple[int, int, tuple[int, ...]]]] = {}
        for unit, part, shape, start, stop in self.offsets:
            units.setdefault(unit, {})[part] = (start, stop, shape)
        out, channel = [], 0
        for name, parts in units.items():
            width = parts["bias"][2][0]
            out.append((name, parts, channel, channel + width))
            channel += width
        return out

    def length(self, num_classes: int) -> int:
        return self.base + num_classes * (self.feature_width + 1)

    def num_classes(self, row: np.ndarray) -> int:
        classes, rest = divmod(row.shape[-1] - self.base, self.feature_width + 1)
        if rest or classes < 1:
            raise ValueError(
                f"A row of {row.shape[-1]} numbers does not fit this layout (base {self.base}, "
                f"{self.feature_width + 1} per class)."
            )
        return classes

    @functools.cached_property
    def _groups(self) -> list[tuple[list[str], int, int, int, int, dict[str, tuple[int, int, tuple[int, ...]]]]]:
        """Runs of consecutive units whose parts have the same shapes, as (names, row start, row stop,
        channel start, channel stop, {part: (start, stop, shape) within one unit's block}): a run's blocks
        lie end to end in the row, so the fold computes a run in whole-array operations, not unit by unit."""
        groups: list = []
        for name, parts, lo, hi in self._units:
            first = min(start for start, _, _ in parts.values())
            last = max(stop for _, stop, _ in parts.values())
            local = {part: (start - first, stop - first, shape) for part, (start, stop, shape) in parts.items()}
            if groups and groups[-1][5] == local and groups[-1][2] == first:
                names, row_start, _, ch_lo, _, _ = groups[-1]
                groups[-1] = ([*names, name], row_start, last, ch_lo, hi, local)
            else:
                groups.append(([name], first, last, lo, hi, local))
        return groups

    @functools.cached_property
    def _names(self) -> dict[str, list[list[str]]]:
        """The BatchNorm tensors' names, per variable, in unit order: the units' own ("bn") and, for series
        adapters, the adapters' ("adapter_bn": the head has no adapter, and its channels come last)."""
        units = [name for name, *_ in self._units]
        layers = {"bn": [f"{name}_bn" for name in units], "adapter_bn": [f"{name}_adapter_bn" for name in units[:-1]]}
        return {key: [[f"{layer}.{v}" for layer in names] for v in BN_VARIABLES] for key, names in layers.items()}

    def fold(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The domain's row: `length(K)` float32 numbers, K its classes."""
        kernel, logit_bias = weights["classifier.kernel"], weights["classifier.bias"]
        row = np.empty(self.length(logit_bias.shape[0]), np.float32)
        scale, shift = batch_norm_affine(weights, self._names["bn"])
        if self.adapter == "series":
            scale_in, shift_in = batch_norm_affine(weights, self._names["adapter_bn"])
        for group, start, stop, lo, hi, parts in self._groups:
            n = len(group)
            blocks = row[start:stop].reshape(n, -1)  # one unit's parts per line
            s_out, t_out = scale[lo:hi].reshape(n, -1), shift[lo:hi].reshape(n, -1)
            c = s_out.shape[1]
            if "matrix" in parts:
                # into a C-ordered array whatever the kernels' layout, so that the diagonal below is a view
                m = np.stack([weights[f"{name}_adapter.kernel"][0, 0] for name in group], out=np.empty((n, c, c)))
                bias = np.matmul(shift_in[lo:hi].reshape(n, 1, c), m).reshape(n, c) * s_out + t_out
                m *= scale_in[lo:hi].reshape(n, c, 1)
                m.reshape(n, -1)[:, :: c + 1] += 1.0
                out = blocks[:, slice(*parts["matrix"][:2])].reshape(n, c, c)  # the row itself: rounded once, there
                np.multiply(m, s_out.reshape(n, 1, c), out=out, casting="same_kind")
            else:
                bias = t_out
                blocks[:, slice(*parts["scale"][:2])] = s_out
            if "side" in parts:
                side = np.stack([weights[f"{name}_adapter.kernel"][0, 0] for name in group], dtype=np.float64)
                out = blocks[:, slice(*parts["side"][:2])].reshape(side.shape)
                np.multiply(side, s_out.reshape(n, 1, c), out=out, casting="same_kind")
            blocks[:, slice(*parts["bias"][:2])] = bias
        classes = row[self.base :].reshape(logit_bias.shape[0], self.feature_width + 1)
        classes[:, :-1] = kernel.T
        classes[:, -1] = logit_bias
        return row

    def padding(self, classes: int) -> np.ndarray:
        """What widens a row by `classes` classes that score -inf (zero weights, -inf bias); any prefix
        of whole class blocks of it widens by fewer."""
        block = np.zeros((classes, self.feature_width + 1), np.float32)
        block[:, -1] = -np.inf
        return np.ravel(block)
