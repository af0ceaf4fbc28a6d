"""Fold one domain's eval-mode weights into the smallest exact per-layer form (numpy, float64 math).

In eval mode a BatchNorm is the affine map `x * s + t` with `s = gamma / sqrt(var + eps)` and
`t = beta - mean * s`, and a series adapter is linear, so each conv unit's per-domain part becomes:

- series:   `y = z @ matrix + bias`, where `z = conv3x3(x)`;
            matrix = (I + diag(s_in) W) diag(s_out), bias = (t_in W) s_out + t_out;
- parallel: `y = conv3x3(x) * scale + x_strided @ side + bias`, side = W diag(s);
- none:     `y = conv3x3(x) * scale + bias`.

The head keeps its BatchNorm (a ReLU follows it) as `scale`/`bias`, then `kernel`/`logit_bias`.
"""

from __future__ import annotations

import dataclasses
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
