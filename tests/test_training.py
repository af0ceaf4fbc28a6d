"""Training: a tiny run learns, adapt keeps the backbone, per-group decay, resume, pipelines, evaluate.

Every run is a width-0.125 ResNet-26 on 16x16 inputs, a few dozen generated images, 1-3 epochs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_backbone, make_bundle
from PIL import Image

from model.backbone import load_backbone, save_backbone
from model.bundle import Preprocessing, load_bundle, save_bundle
from model.config import ArchConfig
from model.engine import InferenceEngine
from model.keras_weights import to_keras_model
from model.preprocessing import center_crop, normalize, open_image, preprocess
from model.resnet26 import build_resnet26
from model.safetensors_io import read_safetensors
from model.weights import count_parameters, fingerprint, is_shared
from training import trainer as trainer_module
from training.commands import TrainSpec, run_training
from training.data import Dataset, load_data
from training.evaluate import evaluate
from training.pipeline import eval_inputs, train_batches
from training.recipe import Recipe, auto_adapter_decay, decay_group
from training.trainer import CHECKPOINT_DIR, Trainer, freeze_shared

INPUT = 16
SIDE = 18  # round(16 * 9 / 8): the natural preset's resize for input 16
OVERRIDES = {"epochs": 3, "batch_size": 8, "lr": 0.05}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def easy_npz(path: pathlib.Path, n: int = 32, seed: int = 0) -> pathlib.Path:
    """Class 0 dark, class 1 bright: separable from the first batch on."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    dark = rng.integers(0, 80, (n, SIDE, SIDE, 3))
    bright = rng.integers(170, 256, (n, SIDE, SIDE, 3))
    x = np.where(y[:, None, None, None] == 0, dark, bright).astype(np.uint8)
    np.savez(path, x=x, y=y, labels=np.array(["dark", "bright"]))
    return path


def stripes_npz(path: pathlib.Path, n: int = 24, seed: int = 1) -> pathlib.Path:
    """A second domain with 3 classes: vertical stripes, horizontal stripes, flat gray."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = np.empty((n, SIDE, SIDE, 3), np.uint8)
    ramp = (np.arange(SIDE) % 4 < 2) * 200 + 20
    for i, c in enumerate(y):
        base = [ramp[None, :].repeat(SIDE, 0), ramp[:, None].repeat(SIDE, 1), np.full((SIDE, SIDE), 120)][c]
        x[i] = np.clip(base[..., None] + rng.integers(-20, 20, (SIDE, SIDE, 3)), 0, 255)
    np.savez(path, x=x, y=y, labels=np.array(["vertical", "horizontal", "flat"]))
    return path


def pretrain_spec(data: pathlib.Path, out: pathlib.Path, **changes) -> TrainSpec:
    spec = TrainSpec(
        mode="pretrain",
        data=str(data),
        domain="easy",
        out=out,
        width_factor=0.125,
        input_size=INPUT,
        overrides=dict(OVERRIDES),
        progress=False,
    )
    return dataclasses.replace(spec, **changes)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = easy_npz(root / "easy.npz")
    out = root / "out"
    metrics = run_training(pretrain_spec(data, out))
    return {"data": data, "out": out, "metrics": metrics, "root": root}


@pytest.fixture(scope="module")
def adapted(pretrained):
    root = pretrained["root"]
    data = stripes_npz(root / "stripes.npz")
    out = root / "adapt"
    backbone_path = pretrained["out"] / "backbone.safetensors"
    spec = TrainSpec(
        mode="adapt",
        data=str(data),
        domain="stripes",
        out=out,
        backbone=backbone_path,
        source=pretrained["out"] / "easy.safetensors",
        overrides={"epochs": 2, "batch_size": 8, "lr": 0.05},
        progress=False,
    )
    metrics = run_training(spec)
    return {"data": data, "out": out, "metrics": metrics, "backbone": backbone_path}


# ----- a short run learns and writes everything -----------------------------------------------


def test_pretrain_lowers_the_loss_and_writes_outputs(pretrained):
    out, metrics = pretrained["out"], pretrained["metrics"]
    for name in ("backbone.safetensors", "easy.safetensors", "easy_curves.png", "easy_metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    history = json.loads((out / "easy_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= metrics["val_top1"] <= 1.0
    assert metrics["epochs"] == 3 and metrics["seconds"] > 0
    config = ArchConfig(0.125, INPUT, "series", num_classes=2)
    assert metrics["params_domain"] == metrics["params_total"] == count_parameters(config)
    assert metrics["train_images"] + metrics["val_images"] == 32
    assert metrics["recipe"]["lr"] == 0.05 and metrics["recipe"]["batch_size"] == 8
    with open(out / "easy_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    backbone = load_backbone(out / "backbone.safetensors")
    bundle = load_bundle(out / "easy.safetensors", backbone)
    assert bundle.labels == ("dark", "bright")
    assert bundle.preprocessing.resize == SIDE and bundle.preprocessing.crop == INPUT
    assert bundle.metrics["val_top1"] == metrics["val_top1"]
    InferenceEngine(backbone, capacity=1).load(bundle)  # golden self-test


def test_engine_matches_keras_model_on_trained_bundle(pretrained):
    backbone = load_backbone(pretrained["out"] / "backbone.safetensors")
    bundle = load_bundle(pretrained["out"] / "easy.safetensors", backbone)
    data = load_data(str(pretrained["data"]), bundle.preprocessing.resize)
    x = eval_inputs(data, bundle.preprocessing)[:12]
    engine = InferenceEngine(backbone, capacity=1, class_capacity=2)
    got = np.stack(engine.predict(x, engine.load(bundle)))
    want = np.asarray(to_keras_model(backbone, bundle)(x, training=False))
    assert got.shape == (12, 2)
    assert relative_error(got, want) < 1e-4


# ----- adapt -----------------------------------------------------------------------------------


def test_adapt_keeps_the_backbone(adapted):
    backbone = load_backbone(adapted["backbone"])
    metrics, out = adapted["metrics"], adapted["out"]
    assert not (out / "backbone.safetensors").exists()  # adapt writes only the bundle
    config = backbone.config.replace(num_classes=3)
    assert metrics["params_domain"] == count_parameters(config, "domain")
    assert metrics["params_total"] == count_parameters(config)
    assert metrics["recipe"]["wd_adapter"] == auto_adapter_decay(metrics["train_images"]) == 0.005
    # The trained model's own shared weights (not just the recorded fingerprint) are the backbone's.
    tensors, _ = read_safetensors((out / "stripes_run" / CHECKPOINT_DIR / "last.safetensors").read_bytes(), "ckpt")
    for prefix in ("model.", "best."):
        shared = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and is_shared(k[len(prefix) :])
        }
        assert len(shared) == 25
        assert fingerprint(shared) == backbone.fingerprint
    bundle = load_bundle(out / "stripes.safetensors", backbone)
    assert bundle.backbone_fingerprint == backbone.fingerprint
    assert bundle.labels == ("vertical", "horizontal", "flat")
    assert bundle.golden_inputs is not None and len(bundle.golden_inputs) >= 1
    engine = InferenceEngine(backbone, capacity=1)
    slot = engine.load(bundle)  # raises if the golden self-test fails
    x = bundle.golden_inputs
    assert relative_error(np.stack(engine.predict(x, slot)), bundle.golden_logits) < 1e-4


def test_adapt_needs_a_backbone(tmp_path):
    spec = TrainSpec(mode="adapt", data=str(tmp_path), domain="x", out=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="adapt needs --backbone"):
        run_training(spec)


# ----- weight decay per group ----------------------------------------------------------------


def test_decay_group_names():
    assert decay_group("stem_conv3x3.kernel") == "3x3"
    assert decay_group("stage3_block4_conv2_conv3x3.kernel") == "3x3"
    assert decay_group("stage1_block1_conv1_adapter.kernel") == "adapter"
    assert decay_group("classifier.kernel") == "head"
    assert decay_group("classifier.bias") == "head"
    assert decay_group("head_bn.gamma") == "bn"
    assert decay_group("stem_adapter_bn.beta") == "bn"
    assert decay_group("stage2_block1_conv1_bn.gamma") == "bn"


RATES = {"head": 0.1, "3x3": 0.2, "adapter": 0.3, "bn": 0.4}
DECAY_RECIPE = Recipe(epochs=1, batch_size=4, lr=1.0, wd=0.1, wd_3x3=0.2, wd_adapter=0.3, wd_bn=0.4)


def trainable_names(model: keras.Model) -> dict[int, str]:
    return {id(v): f"{layer.name}.{v.name}" for layer in model.layers for v in layer.trainable_weights}


@pytest.fixture()
def small_model():
    keras.utils.set_random_seed(0)
    return build_resnet26(ArchConfig(0.125, INPUT, "series", num_classes=3))


def make_trainer(model, tmp_path, recipe=DECAY_RECIPE):
    return Trainer(model, recipe, Preprocessing.for_input_size(INPUT), tmp_path, seed=0, steps_per_epoch=2)


def test_each_variable_gets_its_own_groups_decay(small_model, tmp_path):
    trainer = make_trainer(small_model, tmp_path)
    names = trainable_names(small_model)
    assert len(trainer.variables) == len(trainer.decays) == len(names)
    groups = {}
    for variable, decay in zip(trainer.variables, trainer.decays):
        group = decay_group(names[id(variable)])
        groups.setdefault(group, set()).add(decay)
        assert decay == RATES[group], names[id(variable)]
    assert groups == {g: {r} for g, r in RATES.items()}  # every group present, each with one rate


def test_one_step_applies_each_groups_decay(small_model, tmp_path):
    """First SGD step (momentum buffers 0): v' = v - lr * (g + wd_group * v), for every variable."""
    trainer = make_trainer(small_model, tmp_path)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(4, INPUT, INPUT, 3)).astype(np.float32))
    labels = tf.constant([0, 1, 2, 0], tf.int64)
    before = [np.array(v.numpy()) for v in trainer.variables]
    with tf.GradientTape() as tape:
        logits = small_model(images, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    grads = [g.numpy() for g in tape.gradient(loss, trainer.variables)]
    trainer._train_step(images, labels)  # eager: the same computation as the compiled step
    names = trainable_names(small_model)
    for v, old, g in zip(trainer.variables, before, grads):
        wd = RATES[decay_group(names[id(v)])]  # what the variable's own group asks for
        applied = (old - v.numpy()) / DECAY_RECIPE.lr - g  # the decay term the step used
        np.testing.assert_allclose(applied, wd * old, atol=2e-5 + 1e-3 * np.abs(g).max(), err_msg=names[id(v)])


def test_adapt_trains_no_3x3_kernel(small_model, tmp_path):
    freeze_shared(small_model)
    trainer = make_trainer(small_model, tmp_path)
    names = [trainable_names(small_model)[id(v)] for v in trainer.variables]
    assert names and not any(n.split(".")[0].endswith("_conv3x3") for n in names)
    assert {decay_group(n) for n in names} == {"adapter", "bn", "head"}
    assert all(d == RATES[decay_group(n)] for n, d in zip(names, trainer.decays))
    trainable = sum(int(np.prod(v.shape)) for v in trainer.variables)
    assert trainable == count_parameters(ArchConfig(0.125, INPUT, "series", num_classes=3), "domain")


def test_auto_adapter_decay_thresholds():
    assert auto_adapter_decay(1) == 0.005
    assert auto_adapter_decay(5000) == 0.005
    assert auto_adapter_decay(5001) == 0.002
    assert auto_adapter_decay(50000) == 0.002
    assert auto_adapter_decay(50001) == 0.0005


def test_lr_boundaries():
    boundaries, values = Recipe(epochs=6, lr=0.1).lr_boundaries(10)
    assert boundaries == [40, 50]
    np.testing.assert_allclose(values, [0.1, 0.01, 0.001])
    boundaries, _ = Recipe(epochs=30).lr_boundaries(100)
    assert boundaries == [2000, 2500]
    b1, b2 = Recipe(epochs=1).lr_boundaries(1)[0]
    assert 1 <= b1 < b2  # still increasing on a one-step run


# ----- resume ----------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(pretrained, tmp_path_factory):
    """The pretrain run again in another folder, stopped right after epoch 1's checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "b"
    original = trainer_module.Trainer._checkpoint

    def stop_after_first(self, epoch, history, best):
        original(self, epoch, history, best)
        if epoch == 1:
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_checkpoint", stop_after_first)
        with pytest.raises(Interrupted):
            run_training(pretrain_spec(pretrained["data"], out))
    assert (out / "easy_run" / CHECKPOINT_DIR / "last.safetensors").is_file()
    assert not (out / "easy.safetensors").exists()
    return out


def resume_copy(interrupted: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "b"
    shutil.copytree(interrupted, out)
    return out


def assert_same_as_uninterrupted(pretrained, out_b: pathlib.Path, resumed: dict) -> None:
    """Epochs 2-3 after the resume match the uninterrupted run A: history, last state, bundle."""
    run_a = json.loads((pretrained["out"] / "easy_metrics.json").read_text())["history"]
    run_b = json.loads((out_b / "easy_metrics.json").read_text())["history"]
    assert [h["epoch"] for h in run_b] == [1, 2, 3]
    assert [h["val_top1"] for h in run_b] == [h["val_top1"] for h in run_a]
    np.testing.assert_allclose([h["loss"] for h in run_b], [h["loss"] for h in run_a], rtol=1e-5)
    np.testing.assert_allclose([h["lr"] for h in run_b], [h["lr"] for h in run_a])
    assert resumed["val_top1"] == pretrained["metrics"]["val_top1"]
    assert resumed["best_epoch"] == pretrained["metrics"]["best_epoch"]
    ckpt = pathlib.Path("easy_run") / CHECKPOINT_DIR / "last.safetensors"
    ckpt_a, _ = read_safetensors((pretrained["out"] / ckpt).read_bytes(), "a")
    ckpt_b, _ = read_safetensors((out_b / ckpt).read_bytes(), "b")
    assert set(ckpt_a) == set(ckpt_b)
    for name in ckpt_a:  # last weights, momentum buffers, iteration count, best weights
        np.testing.assert_allclose(ckpt_b[name], ckpt_a[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for name in ("easy.safetensors", "backbone.safetensors"):
        a, _ = read_safetensors((pretrained["out"] / name).read_bytes(), "a")
        b, _ = read_safetensors((out_b / name).read_bytes(), "b")
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}: {key}")


def test_resume_continues_exactly(pretrained, interrupted, tmp_path):
    out_b = resume_copy(interrupted, tmp_path)
    resumed = run_training(pretrain_spec(pretrained["data"], out_b, resume=True))
    assert_same_as_uninterrupted(pretrained, out_b, resumed)


def test_resume_with_other_settings_is_refused(pretrained, tmp_path):
    spec = pretrain_spec(pretrained["data"], pretrained["out"], resume=True, overrides={**OVERRIDES, "lr": 0.01})
    with pytest.raises(ValueError, match="other settings") as info:
        run_training(spec)
    assert "'lr': 0.05" in str(info.value) and "seed 0" in str(info.value)
    with pytest.raises(ValueError, match="other settings"):
        run_training(dataclasses.replace(spec, overrides=dict(OVERRIDES), seed=1))


# ----- pipelines -------------------------------------------------------------------------------


def pipeline_data(n: int = 10) -> Dataset:
    images = np.random.default_rng(0).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    return Dataset(images, np.arange(n) % 2, ("a", "b"), "npz")


def collect(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_train_batches_are_deterministic():
    data, prep = pipeline_data(), Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), resize=SIDE, crop=INPUT)
    batches = lambda seed, epoch: collect(train_batches(data, prep, 4, True, True, seed, epoch))  # noqa: E731
    x1, y1 = batches(7, 0)
    x2, y2 = batches(7, 0)
    assert x1.shape == (10, INPUT, INPUT, 3) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = batches(7, 1)
    assert not np.array_equal(x1, x3)
    x4, _ = batches(8, 0)
    assert not np.array_equal(x1, x4)
    assert [len(y) for _, y in train_batches(data, prep, 4, True, True, 7, 0)] == [4, 4, 2]


def test_digits_preset_takes_the_center_crop():
    data, prep = pipeline_data(), Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), resize=SIDE, crop=INPUT)
    x, y = collect(train_batches(data, prep, 4, flip=False, random_crop=False, seed=3, epoch=2))
    want = normalize(center_crop(data.images, INPUT), prep)
    matched = []
    for image, label in zip(x, y):
        distance = np.abs(want - image).reshape(len(want), -1).max(1)
        i = int(np.argmin(distance))
        assert distance[i] < 1e-5
        assert data.labels[i] == label
        matched.append(i)
    assert sorted(matched) == list(range(len(want)))  # a shuffle of all images, each center-cropped
    assert matched != list(range(len(want)))  # and shuffled


def test_random_crops_are_windows_of_the_square():
    data = pipeline_data(4)
    prep = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=SIDE, crop=INPUT)
    x, _y = collect(train_batches(data, prep, 4, flip=False, random_crop=True, seed=0, epoch=0))
    for image in x:
        pixels = np.round(image * 255).astype(np.uint8)
        assert any(
            np.array_equal(pixels, sq[dy : dy + INPUT, dx : dx + INPUT])
            for sq in data.images
            for dy in range(3)
            for dx in range(3)
        )


def color_folder(root: pathlib.Path) -> list[pathlib.Path]:
    rng = np.random.default_rng(5)
    files = []
    for c in ("a", "b"):
        for i in range(3):
            path = root / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8), "RGB").save(path)
            files.append(path)
    return files


def test_eval_inputs_equal_the_service_preprocessing(tmp_path):
    files = color_folder(tmp_path / "ds")
    prep = Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), resize=SIDE, crop=INPUT)
    data = load_data(str(tmp_path / "ds"), prep.resize, grayscale=prep.grayscale)
    service = np.stack([preprocess(open_image(f), prep) for f in files])
    np.testing.assert_array_equal(eval_inputs(data, prep), service)


def test_eval_inputs_equal_the_service_for_a_grayscale_domain(tmp_path):
    files = color_folder(tmp_path / "ds")
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=SIDE, crop=INPUT, grayscale=True)
    data = load_data(str(tmp_path / "ds"), prep.resize, grayscale=prep.grayscale)
    service = np.stack([preprocess(open_image(f), prep) for f in files])
    np.testing.assert_allclose(eval_inputs(data, prep), service, atol=0.05)


# ----- evaluate --------------------------------------------------------------------------------


def test_evaluate_trained_bundle(pretrained, tmp_path):
    out = pretrained["out"]
    metrics = evaluate(out / "backbone.safetensors", out / "easy.safetensors", str(pretrained["data"]), tmp_path / "ev")
    assert metrics["domain"] == "easy" and metrics["images"] == 32 and metrics["skipped"] == 0
    assert 0.0 <= metrics["test_top1"] <= 1.0
    assert set(metrics["per_class_top1"]) == {"dark", "bright"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["per_class_top1"].values())
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == 32
    assert confusion.sum(1).tolist() == [16, 16]
    assert metrics["test_top1"] == pytest.approx(np.trace(confusion) / 32)
    png = pathlib.Path(metrics["confusion_png"])
    assert png == tmp_path / "ev" / "easy_confusion.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_aligns_labels_by_name(tmp_path):
    """Test data whose classes come in another order is mapped onto the bundle's by name."""
    config = ArchConfig(0.125, INPUT, "series")
    backbone = make_backbone(config, seed=1)
    bundle = make_bundle(backbone, "three", 3, seed=2)  # labels three_label0..2
    bundle = dataclasses.replace(bundle, preprocessing=Preprocessing.for_input_size(INPUT))
    save_backbone(backbone, tmp_path / "backbone.safetensors")
    save_bundle(bundle, tmp_path / "three.safetensors")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, SIDE, SIDE, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    np.savez(tmp_path / "same.npz", x=x, y=y, labels=np.array(list(bundle.labels)))
    np.savez(tmp_path / "reversed.npz", x=x, y=2 - y, labels=np.array(list(bundle.labels)[::-1]))
    same = evaluate(tmp_path / "backbone.safetensors", tmp_path / "three.safetensors", str(tmp_path / "same.npz"))
    flipped = evaluate(
        tmp_path / "backbone.safetensors", tmp_path / "three.safetensors", str(tmp_path / "reversed.npz")
    )
    assert same["confusion"] == flipped["confusion"]
    assert same["test_top1"] == flipped["test_top1"]
    assert "confusion_png" not in same
    # the engine's predictions are the Keras model's
    logits = np.asarray(
        to_keras_model(backbone, bundle)(
            eval_inputs(load_data(str(tmp_path / "same.npz"), SIDE), bundle.preprocessing), training=False
        )
    )
    assert same["test_top1"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))
