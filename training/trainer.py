"""The training loop: SGD with per-group weight decay, per-epoch validation, best-on-validation
weights, checkpoints to resume from, training curves.

The loop is written out (GradientTape) rather than `model.fit` because each parameter group has
its own decay, and the frozen 3x3 convolutions must get no weight gradients at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from model.bundle import Preprocessing
from model.keras_weights import get_weights, set_weights
from model.safetensors_io import atomic_write_bytes, read_safetensors, write_safetensors
from training.data import Dataset
from training.pipeline import eval_inputs, train_batches
from training.recipe import MOMENTUM, Recipe, decay_group

_log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"


@dataclasses.dataclass
class TrainResult:
    best_weights: dict[str, np.ndarray]
    best_epoch: int
    best_val_top1: float
    history: list[dict]
    seconds: float


def freeze_shared(model: keras.Model) -> None:
    """Freeze the shared 3x3 convolutions (they then get no gradient and no decay)."""
    for layer in model.layers:
        if layer.name.endswith("_conv3x3"):
            layer.trainable = False


def predict_logits(model: keras.Model, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    if len(inputs) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(
        [np.asarray(model(inputs[i : i + batch_size], training=False)) for i in range(0, len(inputs), batch_size)]
    )


def top1(model: keras.Model, data: Dataset, prep: Preprocessing) -> float:
    logits = predict_logits(model, eval_inputs(data, prep))
    return float(np.mean(np.argmax(logits, -1) == data.labels))


class Trainer:
    """Train `model`'s trainable weights on `train` with the `recipe`; checkpoints go to `out_dir`."""

    def __init__(
        self,
        model: keras.Model,
        recipe: Recipe,
        prep: Preprocessing,
        out_dir: pathlib.Path,
        seed: int,
        steps_per_epoch: int,
        strategy: tf.distribute.Strategy | None = None,
    ):
        """Build the trainer inside `strategy.scope()` when a strategy is given (several GPUs)."""
        self.model, self.recipe, self.prep, self.seed = model, recipe, prep, seed
        self.strategy = strategy or tf.distribute.get_strategy()
        self.out_dir = out_dir
        names = {id(v): f"{layer.name}.{v.name}" for layer in model.layers for v in layer.trainable_weights}
        self.variables = list(model.trainable_weights)
        rates = {"3x3": recipe.wd_3x3, "adapter": recipe.wd_adapter, "head": recipe.wd, "bn": recipe.wd_bn}
        self.decays = [rates[decay_group(names[id(v)])] for v in self.variables]
        boundaries, values = recipe.lr_boundaries(steps_per_epoch)
        self.schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
        self.optimizer = keras.optimizers.SGD(learning_rate=self.schedule, momentum=MOMENTUM)
        self.optimizer.build(self.variables)
        # The step has no Python control flow over tensors, so it is traced without AutoGraph's conversion,
        # which took most of the tracing time (a first step of 10 s on a CPU, 4 s without it).
        self.train_step = tf.function(self._train_step, autograph=False)  # (summed loss, correct) per batch
        self._epoch_step: tuple[object, Callable] | None = None  # (element spec, step compiled for it)

    def _replica_step(self, images, labels):
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example)  # over the global batch: replicas' gradients add up
        grads = tape.gradient(loss, self.variables)
        # Each parameter decays at its own group's rate (L2 gradient, as PyTorch SGD's weight_decay);
        # split across replicas so that their sum is one decay.
        replicas = self.strategy.num_replicas_in_sync
        grads = [g + (wd / replicas) * v.value if wd else g for g, v, wd in zip(grads, self.variables, self.decays)]
        self.optimizer.apply(grads, self.variables)
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
        return tf.reduce_sum(per_example), tf.reduce_sum(hits)

    def _train_step(self, images, labels):
        """One SGD step on a (possibly distributed) batch: (summed loss, correct count) over it."""
        loss_sum, correct = self.strategy.run(self._replica_step, args=(images, labels))
        reduce = tf.distribute.ReduceOp.SUM
        return self.strategy.reduce(reduce, loss_sum, axis=None), self.strategy.reduce(reduce, correct, axis=None)

    def _step_for(self, batches) -> Callable:
        """The step compiled once for the batches' element spec, whose batch dimension is open: the
        smaller last batch of an epoch would otherwise trace the whole step again (seconds on a CPU)."""
        spec = batches.element_spec
        if self._epoch_step is None or self._epoch_step[0] != spec:
            self._epoch_step = (spec, tf.function(self._train_step, input_signature=list(spec), autograph=False))
        return self._epoch_step[1]

    def fit(
        self,
        train: Dataset,
        val: Dataset,
        resume: bool = False,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
    ) -> TrainResult:
        """Train from the last checkpoint (`resume`) to the recipe's last epoch. `on_epoch` hears each
        epoch's record once its checkpoint is written; `on_step` each step's running figures."""
        start_epoch, history, best = 0, [], (-1.0, -1, None)
        if resume:
            start_epoch, history, best = self._restore()
        started = time.perf_counter() - sum(h["seconds"] for h in history)
        for epoch in range(start_epoch, self.recipe.epochs):
            t0 = time.perf_counter()
            batches = self.strategy.experimental_distribute_dataset(
                train_batches(
                    train,
                    self.prep,
                    self.recipe.batch_size,
                    self.recipe.flip,
                    self.recipe.random_crop,
                    self.seed,
                    epoch,
                )
            )
            steps = int(np.ceil(len(train.labels) / self.recipe.batch_size))
            train_step = self._step_for(batches)
            total_loss = correct = seen = 0.0
            bar = tqdm(
                batches,
                total=steps,
                desc=f"epoch {epoch + 1}/{self.recipe.epochs}",
                disable=not progress,
                leave=False,
                unit="batch",
            )
            for step, (images, labels) in enumerate(bar):
                loss_sum, hits = train_step(images, labels)
                n = min(self.recipe.batch_size, len(train.labels) - step * self.recipe.batch_size)
                total_loss, correct, seen = total_loss + float(loss_sum), correct + float(hits), seen + n
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", top1=f"{correct / seen:.3f}")
                if on_step:
                    on_step(
                        {
                            "epoch": epoch + 1,
                            "step": step + 1,
                            "steps": steps,
                            "loss": total_loss / seen,
                            "train_top1": correct / seen,
                            "seconds": time.perf_counter() - t0,
                            "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                        }
                    )
            val_top1 = top1(self.model, val, self.prep)
            record = {
                "epoch": epoch + 1,
                "loss": total_loss / seen,
                "train_top1": correct / seen,
                "val_top1": val_top1,
                "lr": float(self.schedule(self.optimizer.iterations - 1)),
                "seconds": time.perf_counter() - t0,
                "images_per_s": len(train.labels) / max(time.perf_counter() - t0, 1e-9),
            }
            history.append(record)
            if val_top1 > best[0]:
                best = (val_top1, epoch + 1, get_weights(self.model))
            self._checkpoint(epoch + 1, history, best)
            if progress:
                print(
                    f"epoch {epoch + 1}/{self.recipe.epochs}: loss {record['loss']:.4f} "
                    f"train_top1 {record['train_top1']:.4f} val_top1 {val_top1:.4f} ({record['seconds']:.0f}s)",
                    flush=True,
                )
            if on_epoch:
                on_epoch(record)
        if best[2] is None:  # resumed a finished run
            best = (history[-1]["val_top1"], history[-1]["epoch"], get_weights(self.model))
        return TrainResult(best[2], best[1], best[0], history, time.perf_counter() - started)

    # ----- checkpoints -----------------------------------------------------------------------

    def _checkpoint(self, epoch: int, history: list[dict], best: tuple) -> None:
        folder = self.out_dir / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in get_weights(self.model).items()}
        tensors.update({f"optimizer.{i}": np.asarray(v, np.float32) for i, v in enumerate(self.optimizer.variables)})
        tensors.update({f"best.{k}": v for k, v in best[2].items()})
        state = {
            "epoch": epoch,
            "history": history,
            "best_val_top1": best[0],
            "best_epoch": best[1],
            "seed": self.seed,
            "recipe": dataclasses.asdict(self.recipe),
        }
        atomic_write_bytes(folder / "last.safetensors", write_safetensors(tensors, {"state": json.dumps(state)}))

    def _restore(self) -> tuple[int, list[dict], tuple]:
        path = self.out_dir / CHECKPOINT_DIR / "last.safetensors"
        if not path.is_file():
            _log.warning("--resume: no checkpoint at %s, starting from scratch", path)
            return 0, [], (-1.0, -1, None)
        tensors, metadata = read_safetensors(path.read_bytes(), "checkpoint")
        state = json.loads(metadata["state"])
        if state["recipe"] != dataclasses.asdict(self.recipe) or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint in {path.parent} was made with other settings "
                f"({state['recipe']}, seed {state['seed']}); resume with the same options or use a new --out."
            )
        set_weights(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, var in enumerate(self.optimizer.variables):
            var.assign(tensors[f"optimizer.{i}"].astype(var.dtype))
        best_weights = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        print(f"resuming after epoch {state['epoch']} from {path}", flush=True)
        return state["epoch"], state["history"], (state["best_val_top1"], state["best_epoch"], best_weights)


def save_curves(history: list[dict], path: pathlib.Path, title: str) -> None:
    """Loss and top-1 per epoch as a PNG next to the output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title=title)
    ax2.plot(epochs, [h["train_top1"] for h in history], marker="o", label="train")
    ax2.plot(epochs, [h["val_top1"] for h in history], marker="o", label="validation")
    ax2.set(xlabel="epoch", ylabel="top-1", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
