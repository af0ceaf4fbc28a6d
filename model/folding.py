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
request, so it runs in one reused float64 scratch buffer and writes straight into the row: a fresh
temporary per unit would cost more in page faults than the arithmetic.
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


def batch_norm_affine(weights: Mapping[str, np.ndarray], layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of eval-mode BatchNorms `layers`, concatenated in that order, in float64."""
    gamma, beta, mean, var = (np.concatenate([weights[f"{layer}.{v}"] for layer in layers], dtype=np.float64)
                              for v in BN_VARIABLES)
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
            raise ValueError(f"A row of {row.shape[-1]} numbers does not fit this layout (base {self.base}, "
                             f"{self.feature_width + 1} per class).")
        return classes

    def fold(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The domain's row: `length(K)` float32 numbers, K its classes."""
        kernel, logit_bias = weights["classifier.kernel"], weights["classifier.bias"]
        row = np.empty(self.length(logit_bias.shape[0]), np.float32)
        names = [name for name, *_ in self._units]
        scale, shift = batch_norm_affine(weights, [f"{name}_bn" for name in names])
        if self.adapter == "series":  # the head has no adapter: its channels come last, so a shorter list fits
            scale_in, shift_in = batch_norm_affine(weights, [f"{name}_adapter_bn" for name in names[:-1]])
        scratch = np.empty(max((stop - start for _, part, _, start, stop in self.offsets if part in ("matrix", "side")),
                               default=0), np.float64)
        for name, parts, lo, hi in self._units:
            s_out, t_out = scale[lo:hi], shift[lo:hi]
            if "matrix" in parts:
                w = weights[f"{name}_adapter.kernel"][0, 0]  # (out, out)
                start, stop, shape = parts["matrix"]
                m = scratch[: stop - start].reshape(shape)
                m[...] = w
                bias = (shift_in[lo:hi] @ m) * s_out + t_out
                m *= scale_in[lo:hi, None]
                m.reshape(-1)[:: shape[0] + 1] += 1.0
                m *= s_out
                row[start:stop] = m.reshape(-1)
            else:
                bias = t_out
                row[slice(*parts["scale"][:2])] = s_out
            if "side" in parts:
                start, stop, shape = parts["side"]
                side = scratch[: stop - start].reshape(shape)
                np.multiply(weights[f"{name}_adapter.kernel"][0, 0], s_out, out=side)  # (in, out)
                row[start:stop] = side.reshape(-1)
            row[slice(*parts["bias"][:2])] = bias
        classes = row[self.base:].reshape(logit_bias.shape[0], self.feature_width + 1)
        classes[:, :-1] = kernel.T
        classes[:, -1] = logit_bias
        return row

    def padding(self, classes: int) -> np.ndarray:
        """What widens a row by `classes` classes that score -inf (zero weights, -inf bias); any prefix
        of whole class blocks of it widens by fewer."""
        block = np.zeros((classes, self.feature_width + 1), np.float32)
        block[:, -1] = -np.inf
        return np.ravel(block)
