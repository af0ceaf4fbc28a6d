"""The reference training recipe, scaled to any number of epochs, and its documented defaults.

SGD with momentum 0.9, learning rate 0.1 divided by 10 at 2/3 and at 5/6 of the epochs, batch 128,
and weight decay per parameter group (3x3 convolutions, 1x1 adapters, BatchNorms, head), each
parameter decayed by its own group's rate (the reference's optimizer leaked one group's rate into
the next parameters; we do not).

Automatic adapter decay (`--wd-adapter auto`, the paper's key finding: small domains need more):
    <= 5,000 training images: 0.005;  <= 50,000: 0.002;  more: 0.0005.
"""

from __future__ import annotations

import dataclasses

MOMENTUM = 0.9

# Augmentation presets: natural images flip and crop at random; digits, signs and text neither
# flip nor crop (the reference resizes them and takes the center), since mirroring changes them.
PRESETS = {"natural": {"flip": True, "random_crop": True}, "digits": {"flip": False, "random_crop": False}}


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    wd: float = 0.0005  # head (classifier) and default
    wd_3x3: float = 0.0005
    wd_adapter: float = 0.0005
    wd_bn: float = 0.0
    flip: bool = True
    random_crop: bool = True

    def lr_boundaries(self, steps_per_epoch: int) -> tuple[list[int], list[float]]:
        """Step boundaries and values of the x0.1 steps at 2/3 and 5/6 of training."""
        total = self.epochs * steps_per_epoch
        return [max(1, round(total * 2 / 3)), max(2, round(total * 5 / 6))], [self.lr, self.lr * 0.1, self.lr * 0.01]


def auto_adapter_decay(train_images: int) -> float:
    if train_images <= 5_000:
        return 0.005
    if train_images <= 50_000:
        return 0.002
    return 0.0005


def decay_group(name: str) -> str:
    """Which weight-decay group a canonical weight name belongs to."""
    layer = name.split(".", 1)[0]
    if layer.endswith("_conv3x3"):
        return "3x3"
    if layer.endswith("_adapter"):
        return "adapter"
    if layer == "classifier":
        return "head"
    return "bn"
