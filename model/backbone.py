"""The backbone file: the 25 shared 3x3 convolutions with the architecture that fixes their shapes.

Format (one `.safetensors` file): tensors under canonical names (`stem_conv3x3.kernel`, ...) and
`__metadata__` with `format`, `format_version`, `adapter`, `width_factor`, `input_size` and
`fingerprint`. `load_backbone` checks every one of them and recomputes the fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import numpy as np

from model.config import ADAPTER_MODES, ArchConfig
from model.safetensors_io import InvalidFileError, atomic_write_bytes, read_bytes, read_safetensors, write_safetensors
from model.weights import WeightsMismatchError, check_weights, expected_shapes, fingerprint, is_shared

FORMAT_VERSION = 1
BACKBONE_FORMAT = "residual-adapters.backbone"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Shared weights plus the architecture they belong to. `config.num_classes` is irrelevant here."""

    config: ArchConfig
    weights: Mapping[str, np.ndarray]
    fingerprint: str

    @classmethod
    def from_weights(cls, config: ArchConfig, weights: Mapping[str, np.ndarray]) -> Backbone:
        """Take the shared part of `weights` (a full model's or only the shared ones)."""
        shared = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if is_shared(k)}
        check_weights(shared, expected_shapes(config, "shared"), "The backbone weights")
        return cls(config=config, weights=shared, fingerprint=fingerprint(shared))

    def domain_config(self, num_classes: int) -> ArchConfig:
        return self.config.replace(num_classes=num_classes)


def architecture_metadata(config: ArchConfig) -> dict[str, str]:
    return {
        "adapter": config.adapter,
        "width_factor": repr(float(config.width_factor)),
        "input_size": str(config.input_size),
    }


def parse_architecture(metadata: Mapping[str, str], what: str, num_classes: int = 1) -> ArchConfig:
    """Check the architecture keys of a file's metadata and build its `ArchConfig`."""
    try:
        adapter = metadata["adapter"]
        width = float(metadata["width_factor"])
        size = int(metadata["input_size"])
    except KeyError as exc:
        raise InvalidFileError("metadata", f"The {what} lacks the metadata key {exc.args[0]!r}.") from None
    except ValueError as exc:
        raise InvalidFileError("metadata", f"The {what}'s width_factor/input_size are not numbers ({exc}).") from None
    if adapter not in ADAPTER_MODES:
        raise InvalidFileError("metadata", f"The {what}'s adapter {adapter!r} is not one of {ADAPTER_MODES}.")
    try:
        return ArchConfig(width_factor=width, input_size=size, adapter=adapter, num_classes=num_classes)
    except ValueError as exc:
        raise InvalidFileError("metadata", f"The {what} describes an impossible architecture: {exc}") from None


def check_format(metadata: Mapping[str, str], expected_format: str, known_keys: set[str], what: str) -> None:
    """Fail on a foreign format or version; warn about (and ignore) unknown keys."""
    if metadata.get("format") != expected_format:
        raise InvalidFileError(
            "format", f"The {what} has format {metadata.get('format')!r}, expected {expected_format!r}."
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise InvalidFileError(
            "format_version",
            f"The {what} has format_version {metadata.get('format_version')!r}; this release reads "
            f"version {FORMAT_VERSION}. Re-export it with this release.",
        )
    unknown = sorted(set(metadata) - known_keys)
    if unknown:
        _log.warning("Ignoring unknown metadata keys in the %s: %s", what, unknown)


def backbone_to_bytes(backbone: Backbone) -> bytes:
    metadata = {
        "format": BACKBONE_FORMAT,
        "format_version": str(FORMAT_VERSION),
        **architecture_metadata(backbone.config),
        "fingerprint": backbone.fingerprint,
    }
    return write_safetensors(dict(backbone.weights), metadata)


def save_backbone(backbone: Backbone, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, backbone_to_bytes(backbone))


def load_backbone(source: str | os.PathLike | bytes) -> Backbone:
    """Read and fully validate a backbone file (path or bytes)."""
    what = "backbone file"
    tensors, metadata = read_safetensors(read_bytes(source), what)
    check_format(
        metadata,
        BACKBONE_FORMAT,
        {"format", "format_version", "adapter", "width_factor", "input_size", "fingerprint"},
        what,
    )
    config = parse_architecture(metadata, what)
    if "fingerprint" not in metadata:
        raise InvalidFileError("metadata", f"The {what} lacks the metadata key 'fingerprint'.")
    try:
        check_weights(tensors, expected_shapes(config, "shared"), f"The {what}'s tensors")
    except WeightsMismatchError as exc:
        raise InvalidFileError("tensors", str(exc)) from None
    backbone = Backbone.from_weights(config, tensors)
    if metadata.get("fingerprint") != backbone.fingerprint:
        raise InvalidFileError(
            "fingerprint",
            f"The {what}'s weights do not match its recorded fingerprint {metadata.get('fingerprint')!r} "
            f"(computed {backbone.fingerprint}): the file was altered or damaged.",
        )
    return backbone
