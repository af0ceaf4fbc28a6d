"""The adapter bundle: everything one domain owns, in one `.safetensors` file.

Tensors: the domain's weights under canonical names (BatchNorms, adapters, head; never the domain
name), plus optional `golden.inputs` (N, S, S, 3, preprocessed) and `golden.logits` (N, classes)
that let a loader prove the adapter behaves on this backbone as it did when it was made.

`__metadata__` (all strings): `format`, `format_version`, `adapter`, `width_factor`, `input_size`,
`backbone_fingerprint`, `domain`, `labels` (JSON list), `preprocessing` (JSON object, see
`Preprocessing`) and `metrics` (JSON object).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from model.backbone import (
    FORMAT_VERSION,
    Backbone,
    architecture_metadata,
    check_format,
    parse_architecture,
)
from model.config import ArchConfig
from model.names import check_domain_name
from model.preprocessing import Preprocessing
from model.safetensors_io import (
    InvalidFileError,
    atomic_write_bytes,
    parse_json_metadata,
    read_bytes,
    read_safetensors,
    write_safetensors,
)
from model.weights import WeightsMismatchError, check_weights, expected_shapes, is_shared

BUNDLE_FORMAT = "residual-adapters.bundle"
MAX_LABEL_CHARS = 200
MAX_GOLDEN = 16
GOLDEN_INPUTS, GOLDEN_LOGITS = "golden.inputs", "golden.logits"
_KNOWN_KEYS = {
    "format",
    "format_version",
    "adapter",
    "width_factor",
    "input_size",
    "backbone_fingerprint",
    "domain",
    "labels",
    "preprocessing",
    "metrics",
}


@dataclasses.dataclass(frozen=True)
class AdapterBundle:
    """One domain's weights and everything needed to serve them."""

    domain: str
    config: ArchConfig
    weights: Mapping[str, np.ndarray]
    labels: tuple[str, ...]
    backbone_fingerprint: str
    preprocessing: Preprocessing
    metrics: Mapping[str, object] = dataclasses.field(default_factory=dict)
    golden_inputs: np.ndarray | None = None
    golden_logits: np.ndarray | None = None

    @classmethod
    def from_weights(
        cls,
        domain: str,
        config: ArchConfig,
        weights: Mapping[str, np.ndarray],
        labels: Sequence[str],
        backbone: Backbone,
        preprocessing: Preprocessing | None = None,
        metrics: Mapping[str, object] | None = None,
    ) -> AdapterBundle:
        """Take the domain part of `weights` (a full model's or only the domain's)."""
        domain_weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if not is_shared(k)}
        check_weights(domain_weights, expected_shapes(config, "domain"), "The domain weights")
        bundle = cls(
            domain=check_domain_name(domain),
            config=config,
            weights=domain_weights,
            labels=tuple(labels),
            backbone_fingerprint=backbone.fingerprint,
            preprocessing=preprocessing or Preprocessing.for_input_size(config.input_size),
            metrics=dict(metrics or {}),
        )
        _check_labels(bundle.labels, config.num_classes)
        return bundle

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def with_golden(self, inputs: np.ndarray, logits: np.ndarray) -> AdapterBundle:
        """Attach golden (preprocessed input, expected logits) pairs for a self-test on load."""
        return dataclasses.replace(
            self, golden_inputs=np.asarray(inputs, np.float32), golden_logits=np.asarray(logits, np.float32)
        )

    def renamed(self, domain: str) -> AdapterBundle:
        return dataclasses.replace(self, domain=check_domain_name(domain))


def _check_labels(labels: object, num_classes: int) -> None:
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise InvalidFileError("labels", "The bundle's labels must be a JSON list of strings.")
    if len(labels) != num_classes:
        raise InvalidFileError(
            "labels",
            f"The bundle has {len(labels)} labels but its head has {num_classes} classes; give one label per class.",
        )
    bad = [x for x in labels if not 0 < len(x) <= MAX_LABEL_CHARS]
    if bad:
        raise InvalidFileError("labels", f"Labels must have 1-{MAX_LABEL_CHARS} characters; these do not: {bad[:5]}.")
    duplicates = sorted(label for label, count in collections.Counter(labels).items() if count > 1)
    if duplicates:
        raise InvalidFileError("labels", f"Labels must be unique; repeated: {duplicates[:5]}.")


def bundle_to_bytes(bundle: AdapterBundle) -> bytes:
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": str(FORMAT_VERSION),
        **architecture_metadata(bundle.config),
        "backbone_fingerprint": bundle.backbone_fingerprint,
        "domain": bundle.domain,
        "labels": json.dumps(list(bundle.labels)),
        "preprocessing": json.dumps(bundle.preprocessing.to_json()),
        "metrics": json.dumps(dict(bundle.metrics)),
    }
    tensors = dict(bundle.weights)
    if bundle.golden_inputs is not None:
        tensors[GOLDEN_INPUTS] = bundle.golden_inputs
        tensors[GOLDEN_LOGITS] = bundle.golden_logits
    return write_safetensors(tensors, metadata)


def save_bundle(bundle: AdapterBundle, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, bundle_to_bytes(bundle))


def load_bundle(
    source: str | os.PathLike | bytes, backbone: Backbone | None = None, domain: str | None = None
) -> AdapterBundle:
    """Read and fully validate a bundle (path or bytes); raise `InvalidFileError` on any problem.

    Args:
        backbone: when given, the bundle must have been made for it (architecture and fingerprint).
        domain: serve the bundle under this name instead of the one it records.
    """
    what = "bundle"
    tensors, metadata = read_safetensors(read_bytes(source), what)
    check_format(metadata, BUNDLE_FORMAT, _KNOWN_KEYS, what)
    missing = sorted(_KNOWN_KEYS - set(metadata))
    if missing:
        raise InvalidFileError("metadata", f"The bundle lacks the metadata keys {missing}.")
    golden_inputs = tensors.pop(GOLDEN_INPUTS, None)
    golden_logits = tensors.pop(GOLDEN_LOGITS, None)
    if "classifier.bias" not in tensors or tensors["classifier.bias"].ndim != 1:
        raise InvalidFileError(
            "tensors", "The bundle has no 1-D 'classifier.bias' tensor, so its class count is unknown."
        )
    config = parse_architecture(metadata, what, num_classes=int(tensors["classifier.bias"].shape[0]))
    try:
        check_weights(tensors, expected_shapes(config, "domain"), "The bundle's tensors")
    except WeightsMismatchError as exc:
        raise InvalidFileError("tensors", str(exc)) from None
    labels = parse_json_metadata(metadata, "labels", what)
    _check_labels(labels, config.num_classes)
    metrics = parse_json_metadata(metadata, "metrics", what)
    if not isinstance(metrics, dict):
        raise InvalidFileError("metadata", "The bundle's metrics must be a JSON object.")
    preprocessing = Preprocessing.from_json(parse_json_metadata(metadata, "preprocessing", what), config.input_size)
    _check_golden(golden_inputs, golden_logits, config)
    bundle = AdapterBundle(
        domain=check_domain_name(domain if domain is not None else metadata["domain"]),
        config=config,
        weights=tensors,
        labels=tuple(labels),
        backbone_fingerprint=metadata["backbone_fingerprint"],
        preprocessing=preprocessing,
        metrics=metrics,
        golden_inputs=golden_inputs,
        golden_logits=golden_logits,
    )
    if backbone is not None:
        check_compatible(bundle, backbone)
    return bundle


def _check_golden(inputs: np.ndarray | None, logits: np.ndarray | None, config: ArchConfig) -> None:
    if inputs is None and logits is None:
        return
    s = config.input_size
    if (
        inputs is None
        or logits is None
        or inputs.ndim != 4
        or inputs.shape[1:] != (s, s, 3)
        or logits.shape != (inputs.shape[0], config.num_classes)
        or not 0 < inputs.shape[0] <= MAX_GOLDEN
    ):
        raise InvalidFileError(
            "golden",
            f"The bundle's golden tensors must be {GOLDEN_INPUTS} (N, {s}, {s}, 3) and {GOLDEN_LOGITS} "
            f"(N, {config.num_classes}) with 1 <= N <= {MAX_GOLDEN}.",
        )


def check_compatible(bundle: AdapterBundle, backbone: Backbone) -> None:
    """The bundle must be made for this backbone: same architecture and the same shared weights."""
    ours, theirs = backbone.config, bundle.config
    if (ours.adapter, ours.width_factor, ours.input_size) != (theirs.adapter, theirs.width_factor, theirs.input_size):
        raise InvalidFileError(
            "fingerprint",
            f"The bundle is for adapter={theirs.adapter}, width_factor={theirs.width_factor}, "
            f"input_size={theirs.input_size}, but the backbone is adapter={ours.adapter}, "
            f"width_factor={ours.width_factor}, input_size={ours.input_size}. Train the adapter on this backbone.",
        )
    if bundle.backbone_fingerprint != backbone.fingerprint:
        raise InvalidFileError(
            "fingerprint",
            f"The bundle was trained on backbone {bundle.backbone_fingerprint}, not on the loaded backbone "
            f"{backbone.fingerprint}. Train the adapter on this backbone (or load the backbone it was made for).",
        )
