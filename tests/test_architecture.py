"""The architecture: parameter counts, weight names and shapes, config validation, weight get/set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import FIXTURES, random_weights
from numeric import assert_logits_close

from model.config import ArchConfig, conv_units
from model.keras_weights import get_weights, set_weights
from model.resnet26 import build_resnet26
from model.weights import (
    WeightsMismatchError,
    count_parameters,
    expected_shapes,
    is_shared,
)

MODES = ("series", "parallel", "none")
REFERENCE_MODES = {"bn": "none", "series_adapters": "series", "parallel_adapters": "parallel"}


def _param_count_cases() -> list:
    path = FIXTURES / "reference_param_counts.json"
    if not path.exists():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"fixture {path} is missing"))]
    cases = []
    for key, counts in json.loads(path.read_text()).items():
        mode, factor, classes = key.split("/")  # e.g. series_adapters/factor1/classes10
        config = ArchConfig(
            width_factor=float(factor.removeprefix("factor")),
            input_size=64,
            adapter=REFERENCE_MODES[mode],
            num_classes=int(classes.removeprefix("classes")),
        )
        cases.append(pytest.param(config, counts, id=key))
    return cases


def _tiny(adapter: str = "series", num_classes: int = 5, input_size: int = 16) -> ArchConfig:
    return ArchConfig(width_factor=0.25, input_size=input_size, adapter=adapter, num_classes=num_classes)


# --- parameter counts --------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "counts"), _param_count_cases())
def test_parameter_counts_match_reference(config: ArchConfig, counts: dict) -> None:
    """Total, shared-3x3 and domain-specific counts equal the PyTorch reference's, for every mode and head."""
    assert count_parameters(config) == counts["total"]
    assert count_parameters(config, "shared") == counts["shared_3x3"]
    assert count_parameters(config, "domain") == counts["domain_specific"]


@pytest.mark.parametrize("adapter", MODES)
def test_parameter_count_matches_keras_trainable_weights(adapter: str) -> None:
    """count_parameters agrees with the Keras model's trainable weights (BN statistics not counted)."""
    model = build_resnet26(_tiny(adapter))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert count_parameters(_tiny(adapter)) == trainable
    everything = sum(int(np.prod(s)) for s in expected_shapes(_tiny(adapter)).values())
    assert everything == sum(int(np.prod(w.shape)) for w in model.weights)


# --- weight names and shapes -------------------------------------------------------------------


@pytest.mark.parametrize("adapter", MODES)
def test_keras_model_has_exactly_the_expected_weights(adapter: str) -> None:
    """build_resnet26's weights are exactly expected_shapes (names and shapes), 25 of them shared 3x3 kernels."""
    config = _tiny(adapter)
    model = build_resnet26(config)
    actual = {name: tuple(array.shape) for name, array in get_weights(model).items()}
    expected = expected_shapes(config)
    assert actual == expected
    shared = expected_shapes(config, "shared")
    assert len(shared) == 25 == len(conv_units(config))
    assert all(
        name.endswith("_conv3x3.kernel") and len(shape) == 4 and shape[:2] == (3, 3) for name, shape in shared.items()
    )
    assert set(get_weights(model, "shared")) == set(shared)
    assert set(get_weights(model, "domain")) == set(expected) - set(shared)
    assert not any(is_shared(name) for name in expected_shapes(config, "domain"))


def test_adapter_shapes_follow_the_mode() -> None:
    """Series adapters are (1,1,out,out) with their own BN; parallel ones map in->out; 'none' has no adapter."""
    series = expected_shapes(_tiny("series"))
    parallel = expected_shapes(_tiny("parallel"))
    none = expected_shapes(_tiny("none"))
    # stage2_block1_conv1 maps 16 -> 32 channels at width 0.25
    assert series["stage2_block1_conv1_adapter.kernel"] == (1, 1, 32, 32)
    assert series["stage2_block1_conv1_adapter_bn.gamma"] == (32,)
    assert parallel["stage2_block1_conv1_adapter.kernel"] == (1, 1, 16, 32)
    assert "stage2_block1_conv1_adapter_bn.gamma" not in parallel
    assert not any("adapter" in name for name in none)
    assert series["classifier.kernel"] == (64, 5) and series["classifier.bias"] == (5,)


# --- ArchConfig validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"adapter": "bn"}, "adapter"),
        ({"adapter": "Series"}, "adapter"),
        ({"adapter": ""}, "adapter"),
        ({"input_size": 60}, "input_size"),
        ({"input_size": 63}, "input_size"),
        ({"input_size": 12}, "input_size"),
        ({"input_size": 0}, "input_size"),
        ({"input_size": -8}, "input_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": -3}, "num_classes"),
        ({"width_factor": 0.0}, "width_factor"),
        ({"width_factor": -1.0}, "width_factor"),
        ({"width_factor": 0.01}, "width_factor"),  # stem int(0.32) == 0 channels
        ({"width_factor": math.nan}, "width_factor"),
        pytest.param({"width_factor": math.inf}, "width_factor", id="width-inf"),
    ],
)
def test_arch_config_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    """ArchConfig raises ValueError naming the offending field."""
    with pytest.raises(ValueError, match=fragment):
        ArchConfig(**kwargs)


def test_arch_config_accepts_edge_values() -> None:
    """The smallest legal values are accepted and widths scale with the factor."""
    config = ArchConfig(width_factor=1 / 32, input_size=8, adapter="none", num_classes=1)
    assert config.stem_width == 1 and config.stage_widths == (2, 4, 8) and config.feature_width == 8
    assert ArchConfig().stage_widths == (64, 128, 256) and ArchConfig().stem_width == 32


# --- input sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("input_size", "adapter"), [(32, "series"), (72, "parallel"), (8, "none")])
def test_other_input_sizes(input_size: int, adapter: str) -> None:
    """Any multiple of 8 builds and gives (N, num_classes) finite logits."""
    config = _tiny(adapter, num_classes=3, input_size=input_size)
    model = build_resnet26(config)
    x = np.random.default_rng(0).normal(size=(2, input_size, input_size, 3)).astype(np.float32)
    logits = np.asarray(model(x, training=False))
    assert logits.shape == (2, 3)
    assert np.isfinite(logits).all()


# --- get_weights / set_weights -----------------------------------------------------------------


def _images(config: ArchConfig, n: int = 2, seed: int = 0) -> np.ndarray:
    s = config.input_size
    return np.random.default_rng(seed).normal(size=(n, s, s, 3)).astype(np.float32)


@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_set_get_weights_round_trip_by_part(adapter: str) -> None:
    """Shared and domain parts are set independently, read back unchanged, and together fix the output."""
    config = _tiny(adapter)
    weights = random_weights(config, seed=1)
    source = build_resnet26(config)
    set_weights(source, weights)
    for name, value in get_weights(source).items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)

    target = build_resnet26(config)
    domain_before = get_weights(target, "domain")
    set_weights(target, get_weights(source, "shared"), part="shared")
    # only the shared part changed
    for name, value in get_weights(target, "shared").items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    for name, value in get_weights(target, "domain").items():
        np.testing.assert_array_equal(value, domain_before[name], err_msg=name)

    x = _images(config)
    assert not np.allclose(np.asarray(target(x, training=False)), np.asarray(source(x, training=False)))
    set_weights(target, get_weights(source, "domain"), part="domain")
    for name, value in get_weights(target).items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    # the same architecture, weights and batch: the same sums in the same order, so far tighter than the cross-batch
    # 1e-4; one part left unset is off by the order of the scale (the assert above)
    assert_logits_close(
        np.asarray(target(x, training=False)),
        np.asarray(source(x, training=False)),
        rtol_scale=1e-6,
        err_msg="weights set by part vs all at once",
    )


@pytest.fixture(scope="module")
def series_model():
    config = _tiny("series")
    model = build_resnet26(config)
    set_weights(model, random_weights(config, seed=2))
    return model


@pytest.mark.parametrize(
    ("part", "mutate", "key", "kind"),
    [
        ("domain", lambda w: w.pop("stage2_block3_conv2_bn.beta"), "stage2_block3_conv2_bn.beta", "missing"),
        (
            "shared",
            lambda w: w.pop("stage3_block4_conv2_conv3x3.kernel"),
            "stage3_block4_conv2_conv3x3.kernel",
            "missing",
        ),
        (
            "domain",
            lambda w: w.__setitem__("bogus_layer.kernel", np.zeros(3, np.float32)),
            "bogus_layer.kernel",
            "unexpected",
        ),
        ("shared", lambda w: w.__setitem__("stem_bn.gamma", np.ones(8, np.float32)), "stem_bn.gamma", "unexpected"),
        ("domain", lambda w: w.__setitem__("classifier.bias", np.zeros(6, np.float32)), "classifier.bias", "misshaped"),
        (
            "shared",
            lambda w: w.__setitem__("stem_conv3x3.kernel", np.zeros((3, 3, 3, 9), np.float32)),
            "stem_conv3x3.kernel",
            "misshaped",
        ),
    ],
    ids=[
        "domain-missing",
        "shared-missing",
        "domain-extra",
        "shared-gets-domain-key",
        "domain-misshaped",
        "shared-misshaped",
    ],
)
def test_set_weights_rejects_mismatch(series_model, part: str, mutate, key: str, kind: str) -> None:
    """A missing, extra or misshaped tensor raises WeightsMismatchError naming it, and changes nothing."""
    weights = get_weights(series_model, part)
    before = get_weights(series_model)
    mutate(weights)
    with pytest.raises(WeightsMismatchError, match=kind) as info:
        set_weights(series_model, weights, part=part)
    assert key in str(info.value)
    after = get_weights(series_model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("adapter", MODES)
def test_a_fold_does_not_depend_on_how_the_weights_lie_in_memory(adapter: str) -> None:
    """Kernels converted from PyTorch arrive transposed (not C-contiguous) and tensors read from a file as
    views: the folded row is the same numbers, to the bit, as from contiguous copies."""
    from model.folding import fold_domain

    config = ArchConfig(width_factor=0.25, input_size=32, adapter=adapter, num_classes=5)
    weights = {k: np.asarray(v, np.float32) for k, v in random_weights(config, 3, "domain").items()}
    strided = {k: np.asfortranarray(v) if v.ndim > 1 else np.repeat(v, 2)[::2] for k, v in weights.items()}
    assert not strided["classifier.kernel"].flags.c_contiguous
    assert np.array_equal(fold_domain(config, strided), fold_domain(config, weights))
