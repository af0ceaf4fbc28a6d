"""Importing the reference PyTorch state_dict: fixture logits, width/class inference, the CLI."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import FIXTURES, random_weights
from numeric import assert_logits_close

from model import reference
from model.backbone import load_backbone
from model.bundle import load_bundle
from model.config import ArchConfig
from model.keras_weights import get_weights, set_weights, to_keras_model
from model.resnet26 import build_resnet26
from model.weights import WeightsMismatchError

ADAPTERS = ("series", "parallel")


def fixture_path(adapter: str) -> pathlib.Path:
    return FIXTURES / f"reference_resnet26_{adapter}_adapters.npz"


def load_fixture(adapter: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(state_dict arrays without the 'param/' prefix, NHWC input, reference logits); skip if absent."""
    path = fixture_path(adapter)
    if not path.exists():
        pytest.skip(f"reference fixture {path} is missing (see /work/shared/fixtures/README.md)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
        images = data["input_nchw"].transpose(0, 2, 3, 1)
        logits = data["logits"]
    return arrays, images, logits


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_reference_fixture_logits(adapter: str) -> None:
    """The imported weights reproduce the PyTorch reference's eval-mode logits."""
    arrays, images, logits = load_fixture(adapter)
    model = reference.from_reference_state_dict(arrays, adapter)
    config_width = model.get_layer("stem_conv3x3").filters
    assert config_width == 8 and model.output_shape == (None, 7)
    # PyTorch sums in its own order: reproduced to 2e-7..4e-7 of the scale, against the shared bound of 1e-4 of it;
    # a slip to Keras' default BatchNorm epsilon (1e-3 for PyTorch's 1e-5) exceeds that 40x (4e-3 of the scale),
    # the wrong adapter mode by 4 orders of magnitude
    assert_logits_close(np.asarray(model(images, training=False)), logits, err_msg=f"{adapter} vs PyTorch")


@pytest.mark.parametrize(
    ("adapter", "wrong"), [("series", "parallel"), ("series", "none"), ("parallel", "series"), ("parallel", "none")]
)
def test_wrong_adapter_mode_is_rejected(adapter: str, wrong: str) -> None:
    """Importing a fixture under another adapter mode raises WeightsMismatchError naming that mode."""
    arrays, _, _ = load_fixture(adapter)
    with pytest.raises(WeightsMismatchError, match=f"adapter={wrong!r}"):
        reference.from_reference_state_dict(arrays, wrong)


def test_missing_and_extra_state_dict_keys_are_rejected() -> None:
    """A dropped or an unknown tensor is a WeightsMismatchError naming it; num_batches_tracked is ignored."""
    arrays, _, _ = load_fixture("series")
    dropped = dict(arrays)
    del dropped["layer2.1.conv2.1.bns.0.1.running_var"]
    with pytest.raises(WeightsMismatchError, match=r"layer2\.1\.conv2\.1\.bns\.0\.1\.running_var"):
        reference.reference_to_canonical(dropped, "series")
    extra = {**arrays, "linears.1.weight": np.zeros((3, 64), np.float32)}
    with pytest.raises(WeightsMismatchError, match=r"linears\.1\.weight"):
        reference.reference_to_canonical(extra, "series")
    no_stem = {k: v for k, v in arrays.items() if k != "pre_layers_conv.conv.weight"}
    with pytest.raises(WeightsMismatchError, match=r"pre_layers_conv\.conv\.weight"):
        reference.reference_to_canonical(no_stem, "series")
    tracked = {**arrays, "layer1.0.conv1.bns.0.1.num_batches_tracked": np.array(5, np.int64)}
    config, _ = reference.reference_to_canonical(tracked, "series")
    assert config.adapter == "series"


def test_misshaped_reference_tensor_is_rejected() -> None:
    """A tensor of the wrong shape under a right name is a WeightsMismatchError."""
    arrays, _, _ = load_fixture("parallel")
    arrays = dict(arrays)
    arrays["layer3.2.conv1.parallel_conv.0.conv.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(WeightsMismatchError, match="misshaped"):
        reference.reference_to_canonical(arrays, "parallel")


# --- width and class count come from the arrays --------------------------------------------------


def to_torch_state_dict(config: ArchConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Invert the name and layout mapping: canonical weights -> a reference state_dict for one task."""
    state = {}
    for ours, theirs in reference._torch_names(config).items():
        array = weights[ours]
        if array.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
            array = array.transpose(3, 2, 0, 1)
        elif ours == "classifier.kernel":  # (channels, classes) -> (classes, channels)
            array = array.T
        state[theirs] = np.ascontiguousarray(array)
        if theirs.endswith("running_var"):  # PyTorch's state_dict also has these
            state[theirs.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return state


@pytest.mark.parametrize("adapter", ["none", "series", "parallel"])
def test_width_and_classes_come_from_the_arrays(adapter: str) -> None:
    """A width-0.5, 3-class state_dict gives that architecture and the same logits as the canonical weights."""
    config = ArchConfig(width_factor=0.5, input_size=64, adapter=adapter, num_classes=3)
    weights = random_weights(config, seed=11)
    state = to_torch_state_dict(config, weights)

    parsed, canonical = reference.reference_to_canonical(state, adapter)
    assert parsed == config
    assert canonical.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(canonical[name], weights[name], err_msg=name)

    imported = reference.from_reference_state_dict(state, adapter)
    assert imported.output_shape == (None, 3)
    assert imported.get_layer("stem_conv3x3").filters == 16
    for name, value in get_weights(imported).items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)

    expected_model = build_resnet26(config)
    set_weights(expected_model, weights)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(imported(x, training=False)), np.asarray(expected_model(x, training=False))
    )


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_writes_backbone_and_bundle_that_reproduce_logits(tmp_path: pathlib.Path, capsys) -> None:
    """`python -m model.reference FIXTURE --adapter series --out DIR --domain ref` writes loadable files."""
    _, images, logits = load_fixture("series")
    out = tmp_path / "export"
    reference.main([str(fixture_path("series")), "--adapter", "series", "--out", str(out), "--domain", "ref"])
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "ref.safetensors"]

    backbone = load_backbone(out / "backbone.safetensors")
    bundle = load_bundle(out / "ref.safetensors", backbone=backbone)
    assert bundle.domain == "ref"
    assert bundle.labels == tuple(f"class_{i}" for i in range(7))
    assert (backbone.config.width_factor, backbone.config.adapter) == (0.25, "series")
    assert bundle.backbone_fingerprint == backbone.fingerprint

    summary = json.loads(capsys.readouterr().out)
    assert summary["fingerprint"] == backbone.fingerprint
    assert (summary["num_classes"], summary["adapter"]) == (7, "series")

    model = to_keras_model(backbone, bundle)
    assert_logits_close(np.asarray(model(images, training=False)), logits)


def test_cli_labels_and_wrong_adapter(tmp_path: pathlib.Path) -> None:
    """--labels sets the bundle's labels; a wrong --adapter fails without writing files."""
    load_fixture("parallel")
    labels = ",".join(f"c{i}" for i in range(7))
    reference.main(
        [str(fixture_path("parallel")), "--adapter", "parallel", "--out", str(tmp_path / "ok"), "--labels", labels]
    )
    bundle = load_bundle(tmp_path / "ok" / "reference.safetensors")
    assert bundle.labels == tuple(labels.split(","))
    with pytest.raises(WeightsMismatchError):
        reference.main([str(fixture_path("parallel")), "--adapter", "series", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
