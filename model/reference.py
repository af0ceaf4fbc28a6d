"""Import the reference PyTorch ResNet-26 (srebuffi/residual_adapters) state_dict.

The authors published networks trained with their code; this maps one task of such a state_dict
onto `model.resnet26` so their weights serve here. Width factor and class count are read from the
arrays, never assumed.

CLI:
    python -m model.reference STATE_DICT.npz --adapter series --out DIR [--domain NAME]
writes `DIR/backbone.safetensors` and `DIR/<domain>.safetensors`. The `.npz` maps the
state_dict's names (optionally under `param/`) to arrays; it is read with `allow_pickle=False`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from model.config import ADAPTER_MODES, ArchConfig, conv_units
from model.weights import WeightsMismatchError, check_weights, expected_shapes

if TYPE_CHECKING:  # Keras loads only for a Keras model: converting files needs numpy alone
    import keras

_BN_FROM_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _torch_prefix(unit_name: str) -> str:
    if unit_name == "stem":
        return "pre_layers_conv"
    stage, block, conv = unit_name.split("_")  # e.g. stage2, block3, conv1
    prefix = f"layer{stage[5:]}.{int(block[5:]) - 1}"
    return f"{prefix}.conv1" if conv == "conv1" else f"{prefix}.conv2.1"


def _torch_names(config: ArchConfig) -> dict[str, str]:
    """Canonical weight name -> reference state_dict name, for one task (index 0)."""
    names: dict[str, str] = {}

    def batch_norm(layer: str, torch_layer: str) -> None:
        for ours, theirs in _BN_FROM_TORCH.items():
            names[f"{layer}.{ours}"] = f"{torch_layer}.{theirs}"

    for unit in conv_units(config):
        p = _torch_prefix(unit.name)
        names[f"{unit.name}_conv3x3.kernel"] = f"{p}.conv.weight"
        if config.adapter == "series":
            batch_norm(f"{unit.name}_adapter_bn", f"{p}.bns.0.0.conv.0")
            names[f"{unit.name}_adapter.kernel"] = f"{p}.bns.0.0.conv.1.weight"
            batch_norm(f"{unit.name}_bn", f"{p}.bns.0.1")
        elif config.adapter == "parallel":
            names[f"{unit.name}_adapter.kernel"] = f"{p}.parallel_conv.0.conv.weight"
            batch_norm(f"{unit.name}_bn", f"{p}.bns.0")
        else:
            batch_norm(f"{unit.name}_bn", f"{p}.bns.0")
    batch_norm("head_bn", "end_bns.0.0")
    names["classifier.kernel"] = "linears.0.weight"
    names["classifier.bias"] = "linears.0.bias"
    return names


def reference_config(arrays: Mapping[str, np.ndarray], adapter: str, input_size: int = 64) -> ArchConfig:
    """Read width factor and class count off the reference arrays."""
    for key in ("pre_layers_conv.conv.weight", "linears.0.weight"):
        if key not in arrays:
            raise WeightsMismatchError(
                f"Not a reference ResNet-26 state_dict: {key!r} is missing. Pass the state_dict's arrays "
                "under their PyTorch names (without the 'param/' prefix)."
            )
    stem_width = int(np.shape(arrays["pre_layers_conv.conv.weight"])[0])
    num_classes = int(np.shape(arrays["linears.0.weight"])[0])
    return ArchConfig(width_factor=stem_width / 32, input_size=input_size, adapter=adapter, num_classes=num_classes)


def reference_to_canonical(arrays: Mapping[str, np.ndarray], adapter: str) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """Translate a reference state_dict into (config, canonical weights); every key must be used."""
    if adapter not in ADAPTER_MODES:
        raise ValueError(f"adapter must be one of {ADAPTER_MODES}. Received: adapter={adapter!r}")
    arrays = {k: v for k, v in arrays.items() if not k.endswith("num_batches_tracked")}
    config = reference_config(arrays, adapter)
    names = _torch_names(config)
    missing = sorted(set(names.values()) - set(arrays))
    unexpected = sorted(set(arrays) - set(names.values()))
    if missing or unexpected:
        raise WeightsMismatchError(
            f"The state_dict does not match a reference ResNet-26 with adapter={adapter!r}: "
            f"missing {missing}, unexpected {unexpected}. Check --adapter and that the file holds one task."
        )
    weights = {}
    for ours, theirs in names.items():
        array = np.asarray(arrays[theirs], dtype=np.float32)
        if ours.endswith("conv3x3.kernel") or ours.endswith("adapter.kernel"):
            array = array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
        elif ours == "classifier.kernel":
            array = array.T  # (classes, channels) -> (channels, classes)
        weights[ours] = array
    check_weights(weights, expected_shapes(config), "The reference weights")
    return config, weights


def from_reference_state_dict(arrays: Mapping[str, np.ndarray], adapter: str) -> keras.Model:
    """Build the Keras ResNet-26 holding the reference weights: NHWC float32 images in, logits out.

    Args:
        arrays: the reference state_dict's names (no `param/` prefix) mapped to arrays.
        adapter: "series", "parallel" or "none" (the reference's `bn` mode).
    """
    from model.keras_weights import set_weights
    from model.resnet26 import build_resnet26

    config, weights = reference_to_canonical(arrays, adapter)
    model = build_resnet26(config, init="zeros")
    set_weights(model, weights)
    return model


def load_npz_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a state_dict saved with `np.savez`: the `param/` entries if any (prefix dropped), else all.

    Pickles are refused."""
    with np.load(path, allow_pickle=False) as data:
        keys = [k for k in data.files if k.startswith("param/")] or list(data.files)
        return {k.removeprefix("param/"): data[k] for k in keys}


def main(argv: list[str] | None = None) -> None:
    from model.backbone import Backbone, save_backbone
    from model.bundle import AdapterBundle, save_bundle

    parser = argparse.ArgumentParser(prog="python -m model.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dict", type=pathlib.Path, help=".npz of the reference state_dict")
    parser.add_argument("--adapter", required=True, choices=ADAPTER_MODES)
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    parser.add_argument("--domain", default="reference", help="domain name of the bundle (default: reference)")
    parser.add_argument("--labels", help="comma-separated class labels (default: class_0, class_1, ...)")
    args = parser.parse_args(argv)

    config, weights = reference_to_canonical(load_npz_state_dict(args.state_dict), args.adapter)
    labels = args.labels.split(",") if args.labels else [f"class_{i}" for i in range(config.num_classes)]
    backbone = Backbone.from_weights(config, weights)
    bundle = AdapterBundle.from_weights(args.domain, config, weights, labels=labels, backbone=backbone)
    args.out.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, args.out / "backbone.safetensors")
    save_bundle(bundle, args.out / f"{args.domain}.safetensors")
    print(
        json.dumps(
            {
                "backbone": str(args.out / "backbone.safetensors"),
                "bundle": str(args.out / f"{args.domain}.safetensors"),
                "fingerprint": backbone.fingerprint,
                "width_factor": config.width_factor,
                "num_classes": config.num_classes,
                "adapter": config.adapter,
            }
        )
    )


if __name__ == "__main__":
    main()
