"""ResNet-26 with residual adapters, exactly as the reference (srebuffi/residual_adapters, `models.py`).

Read top to bottom: the zero-channel shortcut, one conv unit (shared 3x3 plus its per-domain
parts), a basic block, then the model. Layer names follow the structure
(`stage2_block3_conv1_conv3x3`, `..._adapter`, `..._bn`) so that weights are found by name and
the shared/domain split is a rule about names (see `model.weights`).

Reference semantics kept here:
- series: `y = BN_out(z + conv1x1(BN_in(z)))` with `z = conv3x3(x)`;
- parallel: `y = BN(conv3x3(x) + conv1x1_stride(x))`;
- none: `y = BN(conv3x3(x))`;
- no ReLU after the stem; BatchNorm eps 1e-5, momentum 0.9 (PyTorch's 0.1);
- stride-2 3x3 convolutions pad one pixel on every side (PyTorch `padding=1`), unlike Keras "same";
- the first block of each stage has stride 2 and an avg-pool + zero-channel shortcut.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from model.config import BN_EPSILON, ArchConfig, Block, ConvUnit, topology

BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="residual_adapters")
class ZeroChannelShortcut(layers.Layer):
    """Parameter-free shortcut: 2x2 average pool, then zero channels up to `out_channels`."""

    def __init__(self, out_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = out_channels

    def call(self, x):
        pooled = ops.average_pool(x, pool_size=2, strides=2, padding="valid")
        extra = self.out_channels - pooled.shape[-1]
        return ops.pad(pooled, [[0, 0], [0, 0], [0, 0], [0, extra]])

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        return (n, None if h is None else h // 2, None if w is None else w // 2, self.out_channels)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels}


def _batch_norm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv3x3(x, unit: ConvUnit, init: str):
    if unit.stride == 1:
        return layers.Conv2D(
            unit.out_channels, 3, padding="same", use_bias=False, kernel_initializer=init, name=f"{unit.name}_conv3x3"
        )(x)
    x = layers.ZeroPadding2D(1, name=f"{unit.name}_pad")(x)
    return layers.Conv2D(
        unit.out_channels,
        3,
        strides=unit.stride,
        padding="valid",
        use_bias=False,
        kernel_initializer=init,
        name=f"{unit.name}_conv3x3",
    )(x)


def conv_unit(x, unit: ConvUnit, adapter: str, init: str):
    """The reference's `conv_task`: shared 3x3 convolution, then the domain's adapter and BatchNorm."""
    z = _conv3x3(x, unit, init)
    if adapter == "series":
        a = _batch_norm(f"{unit.name}_adapter_bn")(z)
        a = layers.Conv2D(unit.out_channels, 1, use_bias=False, kernel_initializer=init, name=f"{unit.name}_adapter")(a)
        z = layers.Add(name=f"{unit.name}_adapter_add")([z, a])
    elif adapter == "parallel":
        a = layers.Conv2D(
            unit.out_channels,
            1,
            strides=unit.stride,
            use_bias=False,
            kernel_initializer=init,
            name=f"{unit.name}_adapter",
        )(x)
        z = layers.Add(name=f"{unit.name}_adapter_add")([z, a])
    return _batch_norm(f"{unit.name}_bn")(z)


def basic_block(x, block: Block, adapter: str, init: str):
    """Two conv units with a ReLU between, a residual sum, and a ReLU after it."""
    prefix = block.name
    y = conv_unit(x, block.conv1, adapter, init)
    y = layers.ReLU(name=f"{prefix}_relu1")(y)
    y = conv_unit(y, block.conv2, adapter, init)
    if block.projects:
        x = ZeroChannelShortcut(block.conv1.out_channels, name=f"{prefix}_shortcut")(x)
    y = layers.Add(name=f"{prefix}_add")([y, x])
    return layers.ReLU(name=f"{prefix}_out")(y)


def build_resnet26(config: ArchConfig, name: str = "resnet26", init: str = "glorot_uniform") -> keras.Model:
    """Build the ResNet-26 for one domain: NHWC float32 images in, logits out.

    `init` is the kernels' initializer: "zeros" where weights are assigned next (on JAX a random
    initializer compiles one program per kernel shape, seconds per model).

    Example:
        >>> model = build_resnet26(ArchConfig(width_factor=0.25, adapter="series", num_classes=7))
        >>> model(np.zeros((1, 64, 64, 3), "float32")).shape
        (1, 7)
    """
    inputs = keras.Input((config.input_size, config.input_size, 3), name="image")
    stem, blocks = topology(config)
    x = conv_unit(inputs, stem, config.adapter, init)  # the stem: no ReLU after it
    for block in blocks:
        x = basic_block(x, block, config.adapter, init)
    x = _batch_norm("head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    logits = layers.Dense(config.num_classes, kernel_initializer=init, name="classifier")(x)
    return keras.Model(inputs, logits, name=name)
