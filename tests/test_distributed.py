"""Training under tf.distribute.MirroredStrategy, on two logical CPU devices (in a subprocess,
because logical devices must be set before TensorFlow starts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, pathlib, tempfile
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from model.bundle import Preprocessing
    from model.config import ArchConfig
    from model.resnet26 import build_resnet26
    from training.data import Dataset
    from training.recipe import Recipe
    from training.trainer import Trainer
    rng = np.random.default_rng(0)
    y = np.arange(48) % 2
    x = np.where(y[:, None, None, None] == 1, 220, 30).astype(np.uint8) * np.ones((48, 18, 18, 3), np.uint8)
    data = Dataset(x, y.astype(np.int64), ("dark", "bright"), "npz")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_resnet26(ArchConfig(0.125, 16, "series", 2))
        trainer = Trainer(model, Recipe(epochs=3, batch_size=16, lr=0.05), Preprocessing(resize=18, crop=16),
                          pathlib.Path(tempfile.mkdtemp()), 0, 3, strategy)
    result = trainer.fit(data, data, progress=False)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "losses": [h["loss"] for h in result.history],
                      "val": result.best_val_top1}))
""")


def test_mirrored_strategy_trains_on_two_devices():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert all(np.isfinite(loss) for loss in result["losses"])
    assert result["losses"][-1] < result["losses"][0]
