"""Adapter training vs learn-all training: step time on the same batch.

    python -m bench.train [--width 0.5] [--input-size 32] [--batch 128] [--rounds 5]

`adapt` freezes the shared 3x3 convolutions, so its backward pass computes no 3x3 weight
gradients; `full` learns every weight. Both use the same SGD step with per-group weight decay
(`training.trainer.Trainer`). Rounds alternate adapt/full; medians, ratio per round.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    # imported after the arguments, so that --help answers without loading TensorFlow
    import numpy as np
    import tensorflow as tf

    from bench.harness.synthetic import median, time_call
    from model.bundle import Preprocessing
    from model.config import ArchConfig
    from model.resnet26 import build_resnet26
    from training.recipe import Recipe
    from training.trainer import Trainer, freeze_shared

    config = ArchConfig(args.width, args.input_size, "series", args.classes)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(args.batch, args.input_size, args.input_size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, args.classes, args.batch).astype(np.int64))
    prep = Preprocessing.for_input_size(args.input_size)
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("adapt", "full"):
            model = build_resnet26(config, name=mode)
            if mode == "adapt":
                freeze_shared(model)
            trainer = Trainer(model, Recipe(), prep, pathlib.Path(tmp), seed=0, steps_per_epoch=1000)
            step = trainer.train_step
            step(images, labels)  # trace
            steps[mode] = (lambda s: lambda: [t.numpy() for t in s(images, labels)])(step)
        rounds = [{mode: time_call(fn, args.seconds) for mode, fn in steps.items()} for _ in range(args.rounds)]
    result = {
        "adapt_step_ms": round(median([r["adapt"] for r in rounds]) * 1000, 1),
        "full_step_ms": round(median([r["full"] for r in rounds]) * 1000, 1),
        "adapt_img_s": round(args.batch / median([r["adapt"] for r in rounds]), 1),
        "full_img_s": round(args.batch / median([r["full"] for r in rounds]), 1),
        "adapt_over_full": round(median([r["adapt"] / r["full"] for r in rounds]), 3),
        "settings": {
            "width": args.width,
            "input": args.input_size,
            "batch": args.batch,
            "rounds": args.rounds,
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
