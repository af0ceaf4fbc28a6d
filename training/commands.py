"""What each `python -m training` command does, apart from parsing arguments.

pretrain/scratch learn every weight from random initialisation; adapt freezes the backbone's 3x3
convolutions and learns one domain's BatchNorms, adapters and head (starting, as the reference
does, from the source domain's BatchNorms and adapters when `--source` names its bundle); finetune
learns every weight starting from the backbone (the paper's baseline: a full network per domain).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from model.backbone import Backbone, load_backbone, save_backbone
from model.bundle import AdapterBundle, Preprocessing, load_bundle, save_bundle
from model.config import ArchConfig
from model.keras_weights import get_weights, set_weights
from model.resnet26 import build_resnet26
from model.weights import count_parameters
from training.data import DataError, Dataset, load_data
from training.pipeline import eval_inputs
from training.recipe import PRESETS, Recipe, auto_adapter_decay
from training.trainer import Trainer, freeze_shared, predict_logits, save_curves

Mode = Literal["pretrain", "scratch", "adapt", "finetune"]
GOLDEN_COUNT = 2


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    mode: Mode
    data: str
    domain: str
    out: pathlib.Path
    val: str | None = None
    val_split: float = 0.1
    seed: int = 0
    backbone: pathlib.Path | None = None  # adapt / finetune
    source: pathlib.Path | None = None  # adapt / finetune: the source domain's bundle
    width_factor: float = 0.5  # pretrain / scratch
    input_size: int = 64
    adapter: str = "series"
    preset: str = "natural"
    overrides: dict = dataclasses.field(default_factory=dict)  # Recipe fields the user set
    resume: bool = False
    progress: bool = True


def _say(text: str, progress: bool) -> None:
    if progress:
        print(text, flush=True)


def load_train_val(spec: TrainSpec, side: int) -> tuple[Dataset, Dataset]:
    train = load_data(spec.data, side, spec.domain)
    _say(f"training data: {train.describe()}", spec.progress)
    if spec.val:
        val = load_data(spec.val, side, spec.domain)
        if val.class_names != train.class_names:
            raise DataError(
                f"The validation classes {list(val.class_names)[:10]} differ from the training classes "
                f"{list(train.class_names)[:10]}."
            )
    else:
        train, val = train.split(spec.val_split, spec.seed)
    _say(f"validation data: {val.describe()}", spec.progress)
    return train, val


def run_training(
    spec: TrainSpec,
    datasets: Callable[[int], tuple[Dataset, Dataset]] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train as `spec.mode` says, write the bundle (and backbone), return the final metrics. `datasets`
    gives (train, val) at a side instead of `spec.data` (a training job's upload); `on_epoch` hears each
    epoch's record once its checkpoint is written, `on_step` each training step's running figures."""
    keras.utils.set_random_seed(spec.seed)
    backbone = load_backbone(spec.backbone) if spec.backbone else None
    if spec.mode in ("adapt", "finetune") and backbone is None:
        raise ValueError(f"{spec.mode} needs --backbone.")
    source = load_bundle(spec.source, backbone) if spec.source else None
    input_size = backbone.config.input_size if backbone else spec.input_size
    preset = PRESETS[spec.preset]
    resize = round(input_size * 9 / 8) if preset["random_crop"] else input_size
    train, val = datasets(resize) if datasets else load_train_val(spec, resize)

    config = backbone.config if backbone else ArchConfig(spec.width_factor, input_size, spec.adapter)
    config = config.replace(num_classes=train.num_classes)
    mean, std = train.channel_stats()
    prep = Preprocessing(mean=mean, std=std, resize=resize, crop=input_size, grayscale=train.grayscale)
    auto_decay = auto_adapter_decay(len(train.labels))
    defaults = {**preset, "wd_adapter": auto_decay if spec.mode == "adapt" else 0.0005}
    overrides = {k: auto_decay if v == "auto" else v for k, v in spec.overrides.items()}
    recipe = Recipe(**{**defaults, **overrides})

    strategy = (
        tf.distribute.MirroredStrategy()
        if len(tf.config.list_logical_devices("GPU")) > 1
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        model = build_resnet26(config, name=f"resnet26_{spec.domain}")
    if backbone:
        set_weights(model, backbone.weights, "shared")
    if source:
        initial = get_weights(model, "domain")
        initial.update({k: v for k, v in source.weights.items() if not k.startswith("classifier.")})
        set_weights(model, initial, "domain")
    if spec.mode == "adapt":
        freeze_shared(model)

    spec.out.mkdir(parents=True, exist_ok=True)
    steps = int(np.ceil(len(train.labels) / recipe.batch_size))
    with strategy.scope():
        trainer = Trainer(model, recipe, prep, spec.out / f"{spec.domain}_run", spec.seed, steps, strategy)
    result = trainer.fit(train, val, resume=spec.resume, progress=spec.progress, on_epoch=on_epoch, on_step=on_step)
    set_weights(model, result.best_weights)

    full_network = spec.mode != "adapt"
    if full_network:
        backbone = Backbone.from_weights(config, result.best_weights)
        save_backbone(backbone, spec.out / "backbone.safetensors")
    metrics = {
        "command": spec.mode,
        "domain": spec.domain,
        "val_top1": round(result.best_val_top1, 6),
        "best_epoch": result.best_epoch,
        "epochs": recipe.epochs,
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "num_classes": train.num_classes,
        "params_domain": count_parameters(config) if full_network else count_parameters(config, "domain"),
        "params_total": count_parameters(config),
        "seconds": round(result.seconds, 1),
        "recipe": dataclasses.asdict(recipe),
        "seed": spec.seed,
    }
    bundle = AdapterBundle.from_weights(
        spec.domain,
        config,
        result.best_weights,
        train.class_names,
        backbone,
        prep,
        {k: v for k, v in metrics.items() if k != "recipe"},
    )
    golden = eval_inputs(val.subset(np.arange(min(GOLDEN_COUNT, len(val.labels)))), prep)
    bundle = bundle.with_golden(golden, predict_logits(model, golden))
    bundle_path = spec.out / f"{spec.domain}.safetensors"
    save_bundle(bundle, bundle_path)
    save_curves(result.history, spec.out / f"{spec.domain}_curves.png", f"{spec.mode} {spec.domain}")
    (spec.out / f"{spec.domain}_metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=1))
    _say(
        f"wrote {bundle_path}"
        + (f" and {spec.out / 'backbone.safetensors'}" if full_network else "")
        + f" (domain {spec.domain}, {train.num_classes} classes, val top-1 {result.best_val_top1:.4f}; "
        f"register it with POST /adapters, multipart field bundle)",
        spec.progress,
    )
    return {**metrics, "bundle": str(bundle_path)}
