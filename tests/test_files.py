"""Backbone files and adapter bundles: round trips, and every way an untrusted file is refused.

Every refusal must be a `model.safetensors_io.InvalidFileError` with the right `.code` and a message
that names the problem.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import struct
from collections.abc import Callable

import numpy as np
import pytest
import safetensors.numpy
from conftest import make_backbone, make_bundle, random_weights

from model.backbone import Backbone, backbone_to_bytes, load_backbone, save_backbone
from model.bundle import (
    AdapterBundle,
    Preprocessing,
    bundle_to_bytes,
    check_domain_name,
    load_bundle,
    save_bundle,
)
from model.config import ArchConfig
from model.keras_weights import to_keras_model
from model.safetensors_io import InvalidFileError, atomic_write_bytes, read_safetensors, write_safetensors

CONFIG = ArchConfig(width_factor=0.25, input_size=16, adapter="series", num_classes=5)
Tensors = dict[str, np.ndarray]
Metadata = dict[str, str]


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return make_backbone(CONFIG, seed=0)


@pytest.fixture(scope="module")
def bundle(backbone: Backbone) -> AdapterBundle:
    return make_bundle(backbone, "dtd", 5, seed=1)


@pytest.fixture(scope="module")
def backbone_bytes(backbone: Backbone) -> bytes:
    return backbone_to_bytes(backbone)


@pytest.fixture(scope="module")
def bundle_bytes(bundle: AdapterBundle) -> bytes:
    return bundle_to_bytes(bundle)


def forge(
    data: bytes, tensors: Callable[[Tensors], None] | None = None, metadata: Callable[[Metadata], None] | None = None
) -> bytes:
    """Re-serialise a valid file after mutating its tensors and/or metadata in place (any dtype allowed)."""
    t, m = read_safetensors(data, "file")
    t, m = dict(t), dict(m)
    if tensors:
        tensors(t)
    if metadata:
        metadata(m)
    # np.require, not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones
    return safetensors.numpy.save({k: np.require(v, requirements="C") for k, v in t.items()}, metadata=m)


def raw_file(header: object, body: bytes = b"") -> bytes:
    """A hand-made file: 8-byte little-endian header length, the header as JSON, then the data."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def refuse(code: str, fragment: str | None, load: Callable[[], object]) -> InvalidFileError:
    """Assert `load()` raises InvalidFileError with `code` and a message containing `fragment`."""
    with pytest.raises(InvalidFileError) as info:
        load()
    assert info.value.code == code, f"code {info.value.code!r} ({info.value})"
    if fragment is not None:
        assert fragment in str(info.value), str(info.value)
    return info.value


def set_meta(key: str, value: str) -> Callable[[Metadata], None]:
    return lambda m: m.__setitem__(key, value)


def set_json(key: str, value: object) -> Callable[[Metadata], None]:
    return lambda m: m.__setitem__(key, json.dumps(value))


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --- round trips -------------------------------------------------------------------------------


def test_backbone_round_trip_bytes_and_path(backbone: Backbone, tmp_path: pathlib.Path) -> None:
    """A saved backbone loads back with the same config, weights and fingerprint, from bytes or a path."""
    from_bytes = load_backbone(backbone_to_bytes(backbone))
    path = tmp_path / "backbone.safetensors"
    save_backbone(backbone, path)
    for loaded in (from_bytes, load_backbone(path), load_backbone(str(path))):
        assert loaded.config.replace(num_classes=1) == backbone.config.replace(num_classes=1)
        assert loaded.fingerprint == backbone.fingerprint
        assert_same_weights(loaded.weights, backbone.weights)
        assert len(loaded.weights) == 25


def test_bundle_round_trip_everything(backbone: Backbone, tmp_path: pathlib.Path) -> None:
    """Weights, labels, preprocessing, metrics and golden tensors survive a save/load, bytes and path."""
    prep = Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), resize=20, crop=16, grayscale=True)
    original = AdapterBundle.from_weights(
        "my-domain_2",
        CONFIG,
        random_weights(CONFIG, 3, "domain"),
        ["cat", "dog", "ünïcode label", "a b", "e"],
        backbone,
        preprocessing=prep,
        metrics={"top1": 0.75, "epochs": 3, "note": "x"},
    )
    inputs = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    logits = np.asarray(to_keras_model(backbone, original)(inputs, training=False))
    original = original.with_golden(inputs, logits)

    path = tmp_path / "b.safetensors"
    save_bundle(original, path)
    from_bytes = load_bundle(bundle_to_bytes(original), backbone=backbone)
    for loaded in (from_bytes, load_bundle(path), load_bundle(str(path))):
        assert loaded.domain == "my-domain_2"
        assert loaded.config == original.config
        assert loaded.labels == original.labels
        assert loaded.preprocessing == prep
        assert loaded.metrics == {"top1": 0.75, "epochs": 3, "note": "x"}
        assert loaded.backbone_fingerprint == backbone.fingerprint
        assert_same_weights(loaded.weights, original.weights)
        np.testing.assert_array_equal(loaded.golden_inputs, inputs)
        np.testing.assert_array_equal(loaded.golden_logits, logits)


def test_bundle_without_golden_and_renaming(bundle: AdapterBundle, bundle_bytes: bytes, backbone: Backbone) -> None:
    """No golden tensors stay None; `domain=` serves the same bundle under another name."""
    loaded = load_bundle(bundle_bytes, backbone=backbone)
    assert loaded.domain == "dtd" and loaded.golden_inputs is None and loaded.golden_logits is None
    assert loaded.preprocessing == Preprocessing.for_input_size(16)
    renamed = load_bundle(bundle_bytes, domain="other")
    assert renamed.domain == "other"
    assert_same_weights(renamed.weights, bundle.weights)
    assert bundle.renamed("third").domain == "third"
    refuse("domain_name", "../x", lambda: load_bundle(bundle_bytes, domain="../x"))


def test_bundle_tensor_names_do_not_contain_domain(bundle_bytes: bytes) -> None:
    """Stored tensor names are canonical (never the domain's name), so one file loads under any name."""
    tensors, metadata = read_safetensors(bundle_bytes, "bundle")
    assert not any("dtd" in name for name in tensors)
    assert metadata["domain"] == "dtd"


@pytest.mark.parametrize("adapter", ["parallel", "none"])
def test_other_adapter_modes_round_trip(adapter: str) -> None:
    """Parallel and no-adapter backbones and bundles save and load too."""
    config = CONFIG.replace(adapter=adapter)
    bb = make_backbone(config, seed=4)
    bd = make_bundle(bb, "x", 2, seed=5)
    loaded_bb = load_backbone(backbone_to_bytes(bb))
    loaded = load_bundle(bundle_to_bytes(bd), backbone=loaded_bb)
    assert loaded.config == config.replace(num_classes=2)
    assert_same_weights(loaded.weights, bd.weights)


# --- not safetensors at all --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (np.random.default_rng(0).bytes(4096), "is not a .safetensors file"),
        (b"", "only 0 bytes"),
        (b"\x01\x02\x03", "only 3 bytes"),
        (pickle.dumps({"stem_conv3x3.kernel": np.zeros(3)}), "is not a .safetensors file"),
        (struct.pack("<Q", 1000) + b"{}", "is not a .safetensors file"),
        (struct.pack("<Q", 2**63) + b"{}", "is not a .safetensors file"),
        (struct.pack("<Q", 6) + b"\xff\xfe{}xx", "not JSON"),
        (struct.pack("<Q", 9) + b"{'a': 1} ", "not JSON"),
        (raw_file([1, 2, 3]), "not a JSON object"),
        (raw_file("string"), "not a JSON object"),
        (raw_file(None), "not a JSON object"),
    ],
    ids=[
        "random",
        "empty",
        "3-bytes",
        "pickle",
        "header-too-long",
        "header-2^63",
        "header-not-utf8",
        "header-not-json",
        "header-list",
        "header-string",
        "header-null",
    ],
)
@pytest.mark.parametrize("loader", [load_backbone, load_bundle], ids=["backbone", "bundle"])
def test_not_safetensors(loader, data: bytes, fragment: str) -> None:
    """Anything that is not a safetensors file is refused with code not_safetensors."""
    refuse("not_safetensors", fragment, lambda: loader(data))


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),  # overlap
        ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),  # same bytes twice
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),  # past the end
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8)),  # starts past the end
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),  # shape vs offsets
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),  # gap before
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),  # trailing garbage
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-4, 4]}}, bytes(8)),  # negative
    ],
    ids=["overlap", "aliased", "past-end", "start-past-end", "shape-mismatch", "gap", "trailing", "negative"],
)
def test_bad_offsets_are_not_safetensors(header: dict, body: bytes) -> None:
    """Overlapping, out-of-range or inconsistent tensor offsets are refused before any tensor is used."""
    refuse("not_safetensors", "not a valid .safetensors file", lambda: load_bundle(raw_file(header, body)))
    refuse("not_safetensors", "not a valid .safetensors file", lambda: load_backbone(raw_file(header, body)))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float16, np.int32])
def test_non_float32_tensor_is_refused(backbone_bytes: bytes, bundle_bytes: bytes, dtype) -> None:
    """A tensor stored as anything but F32 is refused with code tensors, naming it."""

    def retype(name):
        return lambda t: t.__setitem__(name, t[name].astype(dtype))

    refuse(
        "tensors", "stem_conv3x3.kernel", lambda: load_backbone(forge(backbone_bytes, retype("stem_conv3x3.kernel")))
    )
    refuse("tensors", "head_bn.gamma", lambda: load_bundle(forge(bundle_bytes, retype("head_bn.gamma"))))


def test_header_entry_not_a_tensor_and_bad_metadata_block() -> None:
    """A header entry that is not a tensor description -> tensors; non-string metadata values -> metadata."""
    refuse("tensors", "'a'", lambda: load_bundle(raw_file({"a": 5}, b"")))
    refuse("metadata", "__metadata__", lambda: load_bundle(raw_file({"__metadata__": {"format": 1}}, b"")))
    refuse("metadata", "__metadata__", lambda: load_backbone(raw_file({"__metadata__": ["x"]}, b"")))


# --- format, version, metadata -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["residual-adapters.bundle", "something-else", ""])
def test_backbone_wrong_format(backbone_bytes: bytes, value: str) -> None:
    """A backbone file whose format string is not the backbone format (e.g. a bundle) -> format."""
    refuse("format", repr(value), lambda: load_backbone(forge(backbone_bytes, metadata=set_meta("format", value))))


@pytest.mark.parametrize("value", ["residual-adapters.backbone", "residual-adapters.bundle2"])
def test_bundle_wrong_format(bundle_bytes: bytes, value: str) -> None:
    """A bundle whose format string is not the bundle format -> format."""
    refuse("format", repr(value), lambda: load_bundle(forge(bundle_bytes, metadata=set_meta("format", value))))


def test_backbone_and_bundle_are_not_interchangeable(backbone_bytes: bytes, bundle_bytes: bytes) -> None:
    """Loading a bundle as a backbone, or the reverse, is a format error."""
    refuse("format", "residual-adapters.backbone", lambda: load_backbone(bundle_bytes))
    refuse("format", "residual-adapters.bundle", lambda: load_bundle(backbone_bytes))


def test_missing_format_key(backbone_bytes: bytes, bundle_bytes: bytes) -> None:
    """No format key at all -> format; no format_version -> format_version."""
    refuse("format", None, lambda: load_backbone(forge(backbone_bytes, metadata=lambda m: m.pop("format"))))
    refuse("format_version", None, lambda: load_bundle(forge(bundle_bytes, metadata=lambda m: m.pop("format_version"))))


@pytest.mark.parametrize("value", ["2", "0", "1.0", "", "v1"])
def test_wrong_format_version(backbone_bytes: bytes, bundle_bytes: bytes, value: str) -> None:
    """Any format_version but "1" -> format_version, with a hint to re-export."""
    refuse(
        "format_version",
        "Re-export",
        lambda: load_backbone(forge(backbone_bytes, metadata=set_meta("format_version", value))),
    )
    refuse(
        "format_version",
        "Re-export",
        lambda: load_bundle(forge(bundle_bytes, metadata=set_meta("format_version", value))),
    )


@pytest.mark.parametrize("key", ["adapter", "width_factor", "input_size"])
def test_backbone_missing_metadata_key(backbone_bytes: bytes, key: str) -> None:
    """A backbone without an architecture key -> metadata, naming the key."""
    refuse("metadata", key, lambda: load_backbone(forge(backbone_bytes, metadata=lambda m: m.pop(key))))


def test_backbone_missing_fingerprint_key_is_metadata(backbone_bytes: bytes) -> None:
    """A backbone without its fingerprint key is a metadata problem, like any other missing key."""
    refuse(
        "metadata", "fingerprint", lambda: load_backbone(forge(backbone_bytes, metadata=lambda m: m.pop("fingerprint")))
    )


def test_backbone_missing_fingerprint_key_is_refused(backbone_bytes: bytes) -> None:
    """Whatever the code, a backbone without a fingerprint never loads."""
    with pytest.raises(InvalidFileError, match="fingerprint"):
        load_backbone(forge(backbone_bytes, metadata=lambda m: m.pop("fingerprint")))


@pytest.mark.parametrize(
    "key",
    ["adapter", "width_factor", "input_size", "backbone_fingerprint", "domain", "labels", "preprocessing", "metrics"],
)
def test_bundle_missing_metadata_key(bundle_bytes: bytes, key: str) -> None:
    """A bundle without any required metadata key -> metadata, naming the key."""
    refuse("metadata", repr(key), lambda: load_bundle(forge(bundle_bytes, metadata=lambda m: m.pop(key))))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("adapter", "bn", "'bn'"),
        ("adapter", "", "adapter"),
        ("width_factor", "quarter", "not numbers"),
        ("width_factor", "0", "impossible architecture"),
        ("width_factor", "nan", "impossible architecture"),
        ("input_size", "15", "impossible architecture"),
        ("input_size", "16.0", "not numbers"),
    ],
)
def test_bad_architecture_metadata(
    backbone_bytes: bytes, bundle_bytes: bytes, key: str, value: str, fragment: str
) -> None:
    """Unknown adapter modes, non-numbers and impossible architectures -> metadata."""
    refuse("metadata", fragment, lambda: load_backbone(forge(backbone_bytes, metadata=set_meta(key, value))))
    refuse("metadata", fragment, lambda: load_bundle(forge(bundle_bytes, metadata=set_meta(key, value))))


@pytest.mark.parametrize("loader", ["backbone", "bundle"])
def test_infinite_width_factor_is_metadata(backbone_bytes: bytes, bundle_bytes: bytes, loader: str) -> None:
    """width_factor "inf" in an untrusted file -> InvalidFileError('metadata'), not a crash."""
    if loader == "backbone":
        refuse("metadata", None, lambda: load_backbone(forge(backbone_bytes, metadata=set_meta("width_factor", "inf"))))
    else:
        refuse("metadata", None, lambda: load_bundle(forge(bundle_bytes, metadata=set_meta("width_factor", "inf"))))


@pytest.mark.parametrize("key", ["labels", "metrics", "preprocessing"])
def test_json_metadata_not_json(bundle_bytes: bytes, key: str) -> None:
    """labels / metrics / preprocessing that are not JSON -> metadata, naming the key."""
    refuse("metadata", repr(key), lambda: load_bundle(forge(bundle_bytes, metadata=set_meta(key, "[not json"))))


def test_metrics_not_an_object(bundle_bytes: bytes) -> None:
    """metrics must be a JSON object."""
    refuse("metadata", "metrics", lambda: load_bundle(forge(bundle_bytes, metadata=set_json("metrics", [1, 2]))))


def test_unknown_metadata_key_warns_and_loads(backbone_bytes: bytes, bundle_bytes: bytes, caplog) -> None:
    """An unknown extra metadata key only logs a warning naming it; the file still loads."""
    with caplog.at_level(logging.WARNING):
        bb = load_backbone(forge(backbone_bytes, metadata=set_meta("trained_by", "someone")))
        bd = load_bundle(forge(bundle_bytes, metadata=set_meta("future_key", "1")), backbone=bb)
    assert bd.domain == "dtd"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trained_by" in w and "backbone" in w for w in warnings), warnings
    assert any("future_key" in w and "bundle" in w for w in warnings), warnings


# --- tensors -----------------------------------------------------------------------------------


def _pop(name):
    return lambda t: t.pop(name)


def _add(name, shape):
    return lambda t: t.__setitem__(name, np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    ("mutate", "name", "kind"),
    [
        (_pop("stage2_block3_conv1_conv3x3.kernel"), "stage2_block3_conv1_conv3x3.kernel", "missing"),
        (_add("extra.kernel", (3,)), "extra.kernel", "unexpected"),
        (_add("stem_bn.gamma", (8,)), "stem_bn.gamma", "unexpected"),  # domain weight smuggled in
        (_add("stem_conv3x3.kernel", (3, 3, 3, 9)), "stem_conv3x3.kernel", "misshaped"),
        (_add("stage3_block1_conv1_conv3x3.kernel", (3, 3, 64, 32)), "stage3_block1_conv1_conv3x3.kernel", "misshaped"),
    ],
    ids=["missing", "extra", "domain-weight", "misshaped-stem", "misshaped-transposed"],
)
def test_backbone_tensor_mismatch(backbone_bytes: bytes, mutate, name: str, kind: str) -> None:
    """A missing, unexpected or misshaped backbone tensor -> tensors, naming it."""
    error = refuse("tensors", name, lambda: load_backbone(forge(backbone_bytes, mutate)))
    assert kind in str(error)


@pytest.mark.parametrize(
    ("mutate", "name", "kind"),
    [
        (_pop("stage1_block2_conv2_adapter.kernel"), "stage1_block2_conv2_adapter.kernel", "missing"),
        (_pop("head_bn.moving_variance"), "head_bn.moving_variance", "missing"),
        (_add("stem_conv3x3.kernel", (3, 3, 3, 8)), "stem_conv3x3.kernel", "unexpected"),  # shared weight smuggled in
        (_add("extra", (1,)), "extra", "unexpected"),
        (_add("stem_bn.gamma", (7,)), "stem_bn.gamma", "misshaped"),
        (_add("classifier.kernel", (64, 4)), "classifier.kernel", "misshaped"),
        (
            _add("stage1_block1_conv1_adapter.kernel", (1, 1, 8, 16)),
            "stage1_block1_conv1_adapter.kernel",
            "misshaped",
        ),  # a parallel-shaped adapter in a series bundle
    ],
    ids=[
        "missing-adapter",
        "missing-bn-stat",
        "shared-weight",
        "extra",
        "misshaped-bn",
        "misshaped-head",
        "parallel-shaped-adapter",
    ],
)
def test_bundle_tensor_mismatch(bundle_bytes: bytes, mutate, name: str, kind: str) -> None:
    """A missing, unexpected or misshaped bundle tensor -> tensors, naming it."""
    error = refuse("tensors", name, lambda: load_bundle(forge(bundle_bytes, mutate)))
    assert kind in str(error)


@pytest.mark.parametrize("bias", [None, (5, 1), ()], ids=["absent", "2-D", "scalar"])
def test_bundle_without_usable_classifier_bias(bundle_bytes: bytes, bias) -> None:
    """The class count comes from classifier.bias; without a 1-D one the bundle is refused (tensors)."""
    mutate = _pop("classifier.bias") if bias is None else _add("classifier.bias", bias)
    refuse("tensors", "classifier.bias", lambda: load_bundle(forge(bundle_bytes, mutate)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weights(backbone_bytes: bytes, bundle_bytes: bytes, value: float) -> None:
    """NaN or infinite weights -> non_finite, naming the tensor."""

    def poison(name):
        def mutate(t):
            array = t[name].copy()
            array.flat[3] = value
            t[name] = array

        return mutate

    refuse(
        "non_finite",
        "stage1_block1_conv2_conv3x3.kernel",
        lambda: load_backbone(forge(backbone_bytes, poison("stage1_block1_conv2_conv3x3.kernel"))),
    )
    refuse(
        "non_finite",
        "head_bn.moving_variance",
        lambda: load_bundle(forge(bundle_bytes, poison("head_bn.moving_variance"))),
    )


# --- fingerprint and architecture compatibility -----------------------------------------------


def test_bundle_for_another_backbone(bundle_bytes: bytes, backbone: Backbone) -> None:
    """A bundle made for another backbone of the same architecture -> fingerprint, naming both."""
    other = make_backbone(CONFIG, seed=99)
    assert other.fingerprint != backbone.fingerprint
    error = refuse("fingerprint", other.fingerprint, lambda: load_bundle(bundle_bytes, backbone=other))
    assert backbone.fingerprint in str(error)
    bundle = load_bundle(bundle_bytes)
    refuse("fingerprint", None, lambda: to_keras_model(other, bundle))


def test_forged_backbone_fingerprint_in_bundle(bundle_bytes: bytes, backbone: Backbone) -> None:
    """Editing the bundle's recorded backbone fingerprint makes it incompatible with its real backbone."""
    forged = forge(bundle_bytes, metadata=set_meta("backbone_fingerprint", "sha256:" + "0" * 64))
    refuse("fingerprint", "sha256:" + "0" * 64, lambda: load_bundle(forged, backbone=backbone))


@pytest.mark.parametrize(
    "other_config",
    [
        CONFIG.replace(adapter="parallel"),
        CONFIG.replace(adapter="none"),
        CONFIG.replace(input_size=32),
        CONFIG.replace(width_factor=0.5),
    ],
    ids=["parallel", "none", "input-32", "width-0.5"],
)
def test_bundle_for_another_architecture(backbone: Backbone, other_config: ArchConfig) -> None:
    """A bundle for a different adapter mode, input size or width does not load on this backbone."""
    other_backbone = make_backbone(other_config, seed=0)
    other_bundle = bundle_to_bytes(make_bundle(other_backbone, "p", 5, seed=1))
    error = refuse("fingerprint", "backbone is adapter=series", lambda: load_bundle(other_bundle, backbone=backbone))
    assert f"adapter={other_config.adapter}" in str(error)
    assert load_bundle(other_bundle, backbone=other_backbone).config == other_config


def test_tampered_backbone(backbone_bytes: bytes) -> None:
    """One weight changed, recorded fingerprint kept -> fingerprint ('altered or damaged')."""

    def tamper(t):
        array = t["stage3_block2_conv1_conv3x3.kernel"].copy()
        array.flat[0] += 1e-3
        t["stage3_block2_conv1_conv3x3.kernel"] = array

    refuse("fingerprint", "altered", lambda: load_backbone(forge(backbone_bytes, tamper)))
    refuse(
        "fingerprint",
        "altered",
        lambda: load_backbone(forge(backbone_bytes, metadata=set_meta("fingerprint", "sha256:" + "1" * 64))),
    )


def test_renamed_backbone_tensor_changes_fingerprint(backbone: Backbone) -> None:
    """The fingerprint covers names and values: swapping two same-shaped kernels changes it."""
    weights = dict(backbone.weights)
    a, b = "stage1_block2_conv1_conv3x3.kernel", "stage1_block2_conv2_conv3x3.kernel"
    weights[a], weights[b] = weights[b], weights[a]
    assert Backbone.from_weights(CONFIG, weights).fingerprint != backbone.fingerprint


# --- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (["a", "b", "c", "d"], "4 labels"),
        (["a", "b", "c", "d", "e", "f"], "6 labels"),
        ([], "0 labels"),
        (["a", "b", "c", "d", "a"], "repeated"),
        (["a", "b", "", "d", "e"], "1-200 characters"),
        (["a", "b", "c", "d", "x" * 201], "1-200 characters"),
        (["a", "b", "c", "d", 5], "list of strings"),
        ({"a": 1}, "list of strings"),
        ("abcde", "list of strings"),
    ],
    ids=["too-few", "too-many", "none", "duplicate", "empty", "too-long", "not-string", "object", "string"],
)
def test_bad_labels(bundle_bytes: bytes, backbone: Backbone, labels, fragment: str) -> None:
    """Label count differing from the head, duplicates, empty or non-string labels -> labels."""
    refuse("labels", fragment, lambda: load_bundle(forge(bundle_bytes, metadata=set_json("labels", labels))))
    if isinstance(labels, list):
        refuse(
            "labels",
            fragment,
            lambda: AdapterBundle.from_weights("dtd", CONFIG, random_weights(CONFIG, 1, "domain"), labels, backbone),
        )


# --- domain names ------------------------------------------------------------------------------

VALID_DOMAINS = ["a", "dtd", "my-domain_2", "0", "9lives", "a" * 63]
INVALID_DOMAINS = ["", "../x", "a/b", "Caps", "ünï", "-x", "_x", "a b", "a.b", "a\n", "a" * 64, "a" * 300]


@pytest.mark.parametrize("name", VALID_DOMAINS)
def test_valid_domain_names(bundle_bytes: bytes, name: str) -> None:
    """Lowercase letters, digits, '_' and '-', 1-63 chars, starting alphanumeric, are accepted everywhere."""
    assert check_domain_name(name) == name
    assert load_bundle(bundle_bytes, domain=name).domain == name
    assert load_bundle(forge(bundle_bytes, metadata=set_meta("domain", name))).domain == name


@pytest.mark.parametrize("name", INVALID_DOMAINS, ids=lambda n: repr(n[:12]) + f"-len{len(n)}")
def test_invalid_domain_names(bundle_bytes: bytes, backbone: Backbone, name: str) -> None:
    """Bad names -> domain_name, whether passed to load_bundle, recorded in the file, or used to build."""
    refuse("domain_name", "Invalid domain name", lambda name=name: check_domain_name(name))
    refuse("domain_name", "Invalid domain name", lambda: load_bundle(bundle_bytes, domain=name))
    refuse(
        "domain_name",
        "Invalid domain name",
        lambda: load_bundle(forge(bundle_bytes, metadata=set_meta("domain", name))),
    )
    refuse("domain_name", "Invalid domain name", lambda: make_bundle(backbone, name, 5, seed=1))


def test_non_string_domain_name() -> None:
    """Non-strings are not domain names."""
    for name in (None, 5, b"dtd"):
        refuse("domain_name", "Invalid domain name", lambda name=name: check_domain_name(name))


# --- preprocessing -----------------------------------------------------------------------------

GOOD_PREP = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": 18, "crop": 16, "grayscale": False}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"crop": 32, "resize": 36}, "crop 32 must equal the input size 16"),
        ({"std": [0.25, 0.0, 0.25]}, "std positive"),
        ({"std": [0.25, -0.1, 0.25]}, "std positive"),
        ({"std": [0.25, float("nan"), 0.25]}, "std positive"),
        ({"mean": [0.5, float("inf"), 0.5]}, "mean must be finite"),
        ({"mean": [0.5, 0.5]}, "3 values"),
        ({"std": [0.1, 0.2, 0.3, 0.4]}, "3 values"),
        ({"resize": 15}, "resize 15"),
        ({"resize": 65}, "resize 65"),
        ({"mean": 0.5}, "malformed"),
        ({"mean": ["a", "b", "c"]}, "malformed"),
        ({"resize": "big"}, "malformed"),
        ({"colour": "rgb"}, "malformed"),
        ({"crop": None}, "malformed"),
    ],
    ids=[
        "crop",
        "std-zero",
        "std-negative",
        "std-nan",
        "mean-inf",
        "mean-2",
        "std-4",
        "resize-small",
        "resize-large",
        "mean-scalar",
        "mean-strings",
        "resize-string",
        "unknown-key",
        "crop-null",
    ],
)
def test_bad_preprocessing(bundle_bytes: bytes, changes: dict, fragment: str) -> None:
    """Invalid or malformed preprocessing -> metadata, saying what is wrong."""
    prep = {**GOOD_PREP, **changes}
    refuse("metadata", fragment, lambda: load_bundle(forge(bundle_bytes, metadata=set_json("preprocessing", prep))))


@pytest.mark.parametrize("value", [[1, 2], "x", None, 3])
def test_preprocessing_not_an_object(bundle_bytes: bytes, value) -> None:
    """Preprocessing that is JSON but not an object -> metadata."""
    refuse("metadata", "malformed", lambda: load_bundle(forge(bundle_bytes, metadata=set_json("preprocessing", value))))


@pytest.mark.parametrize("key", ["mean", "std", "resize", "crop"])
def test_preprocessing_missing_key(bundle_bytes: bytes, key: str) -> None:
    """Every preprocessing key but grayscale is required."""
    prep = {k: v for k, v in GOOD_PREP.items() if k != key}
    refuse("metadata", key, lambda: load_bundle(forge(bundle_bytes, metadata=set_json("preprocessing", prep))))


def test_preprocessing_grayscale_optional(bundle_bytes: bytes) -> None:
    """grayscale defaults to False; a valid custom preprocessing loads as written."""
    prep = {k: v for k, v in GOOD_PREP.items() if k != "grayscale"}
    loaded = load_bundle(forge(bundle_bytes, metadata=set_json("preprocessing", prep)))
    assert loaded.preprocessing == Preprocessing(resize=18, crop=16)


def test_preprocessing_grayscale_must_be_boolean(bundle_bytes: bytes) -> None:
    """A non-boolean grayscale (e.g. the string "false") is malformed, not silently True."""
    prep = {**GOOD_PREP, "grayscale": "false"}
    refuse("metadata", "grayscale", lambda: load_bundle(forge(bundle_bytes, metadata=set_json("preprocessing", prep))))


# --- golden tensors ----------------------------------------------------------------------------


def _golden(inputs_shape, logits_shape):
    def mutate(t):
        if inputs_shape is not None:
            t["golden.inputs"] = np.zeros(inputs_shape, np.float32)
        if logits_shape is not None:
            t["golden.logits"] = np.zeros(logits_shape, np.float32)

    return mutate


@pytest.mark.parametrize(
    ("inputs_shape", "logits_shape"),
    [
        ((2, 32, 32, 3), (2, 5)),  # wrong image size
        ((2, 16, 16, 1), (2, 5)),  # wrong channels
        ((2, 16, 16), (2, 5)),  # 3-D
        ((2, 16, 16, 3), (2, 4)),  # wrong classes
        ((2, 16, 16, 3), (3, 5)),  # N differs
        ((2, 16, 16, 3), (10,)),  # flat logits
        ((0, 16, 16, 3), (0, 5)),  # empty
        ((17, 16, 16, 3), (17, 5)),  # more than 16
        ((2, 16, 16, 3), None),  # inputs only
        (None, (2, 5)),  # logits only
    ],
    ids=[
        "size",
        "channels",
        "3d",
        "classes",
        "n-differs",
        "flat-logits",
        "empty",
        "too-many",
        "inputs-only",
        "logits-only",
    ],
)
def test_bad_golden_tensors(bundle_bytes: bytes, inputs_shape, logits_shape) -> None:
    """Golden tensors of the wrong shapes, counts, or only one of the pair -> golden."""
    refuse("golden", "golden.inputs", lambda: load_bundle(forge(bundle_bytes, _golden(inputs_shape, logits_shape))))


def test_golden_tensors_accepted_at_limits(bundle_bytes: bytes) -> None:
    """1 and 16 golden pairs are accepted."""
    for n in (1, 16):
        loaded = load_bundle(forge(bundle_bytes, _golden((n, 16, 16, 3), (n, 5))))
        assert loaded.golden_inputs.shape == (n, 16, 16, 3) and loaded.golden_logits.shape == (n, 5)


def test_non_finite_golden_tensors(bundle_bytes: bytes) -> None:
    """NaN in golden inputs or Inf in golden logits -> non_finite."""

    def mutate(name, value):
        def apply(t):
            _golden((2, 16, 16, 3), (2, 5))(t)
            t[name].flat[0] = value

        return apply

    refuse("non_finite", "golden.inputs", lambda: load_bundle(forge(bundle_bytes, mutate("golden.inputs", np.nan))))
    refuse("non_finite", "golden.logits", lambda: load_bundle(forge(bundle_bytes, mutate("golden.logits", np.inf))))


# --- write_safetensors and atomic writes -------------------------------------------------------


def test_write_safetensors_converts_and_keeps_metadata() -> None:
    """write_safetensors stores float32 and leaves the caller's dicts unchanged."""
    tensors = {"x": np.arange(6, dtype=np.float64).reshape(2, 3)}
    metadata = {"k": "v"}
    data = write_safetensors(tensors, metadata)
    loaded, meta = read_safetensors(data, "file")
    assert loaded["x"].dtype == np.float32 and loaded["x"].shape == (2, 3)
    np.testing.assert_array_equal(loaded["x"], tensors["x"])
    assert meta == {"k": "v"} and metadata == {"k": "v"} and tensors["x"].dtype == np.float64


def _temp_files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_writes_and_replaces(tmp_path: pathlib.Path) -> None:
    """The content is written (and overwritten), readable by others, with no temporary file left."""
    path = tmp_path / "f.safetensors"
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_bytes(str(path), b"second version")
    assert path.read_bytes() == b"second version"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path: pathlib.Path, monkeypatch) -> None:
    """If the final rename fails, the old content stays and the temporary file is removed."""
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"old content")

    def fail(src, dst):
        assert pathlib.Path(src).exists()  # the temp file was fully written before the rename
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert _temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_atomic_write_bytes_failure_while_writing(tmp_path: pathlib.Path, monkeypatch) -> None:
    """If writing itself fails (fsync error), nothing is replaced and no temporary file remains."""
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"old content")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_save_functions_are_atomic(
    backbone: Backbone, bundle: AdapterBundle, tmp_path: pathlib.Path, monkeypatch
) -> None:
    """save_backbone / save_bundle go through the atomic write: a failed save keeps the previous file."""
    bb_path, bd_path = tmp_path / "backbone.safetensors", tmp_path / "dtd.safetensors"
    save_backbone(backbone, bb_path)
    save_bundle(bundle, bd_path)
    before = bb_path.read_bytes(), bd_path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        save_backbone(make_backbone(CONFIG, seed=7), bb_path)
    with pytest.raises(OSError):
        save_bundle(make_bundle(backbone, "dtd", 5, seed=8), bd_path)
    monkeypatch.undo()
    assert (bb_path.read_bytes(), bd_path.read_bytes()) == before
    assert _temp_files(tmp_path) == []
    assert load_backbone(bb_path).fingerprint == backbone.fingerprint
