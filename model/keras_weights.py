"""The Keras side of weight files: canonical names to a Keras model's variables and back.

Kept apart from `model.weights` and `model.bundle` so that reading, validating and folding a bundle
never imports the framework (the service's loader processes and front ends stay small).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from model.backbone import Backbone
from model.bundle import AdapterBundle, check_compatible
from model.resnet26 import build_resnet26
from model.weights import Part, check_weights, is_shared


def _variables(model: keras.Model) -> dict[str, keras.Variable]:
    return {f"{layer.name}.{var.name}": var for layer in model.layers for var in layer.weights}


def get_weights(model: keras.Model, part: Part | None = None) -> dict[str, np.ndarray]:
    """The model's weights as float32 arrays under canonical names; `part` selects shared or domain."""
    return {
        name: np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float32)
        for name, var in _variables(model).items()
        if part is None or is_shared(name) == (part == "shared")
    }


def set_weights(model: keras.Model, weights: Mapping[str, np.ndarray], part: Part | None = None) -> None:
    """Assign `weights` (canonical names) to `model`; every weight of `part` must be given, no more."""
    variables = {k: v for k, v in _variables(model).items() if part is None or is_shared(k) == (part == "shared")}
    check_weights(weights, {k: tuple(v.shape) for k, v in variables.items()}, f"The {part or 'model'} weights")
    for name, var in variables.items():
        var.assign(np.asarray(weights[name], dtype=np.float32))


def to_keras_model(backbone: Backbone, bundle: AdapterBundle) -> keras.Model:
    """The unfolded Keras ResNet-26 for one domain: the reference computation, for checks and training."""
    check_compatible(bundle, backbone)
    model = build_resnet26(bundle.config, name=f"resnet26_{bundle.domain}", init="zeros")  # weights come next
    set_weights(model, {**backbone.weights, **bundle.weights})
    return model
