"""tf.data pipelines: deterministic reference augmentation for training, center crops for evaluation."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from model.bundle import Preprocessing
from model.preprocessing import center_crop, normalize
from training.data import Dataset


def train_batches(
    data: Dataset, prep: Preprocessing, batch_size: int, flip: bool, random_crop: bool, seed: int, epoch: int
) -> tf.data.Dataset:
    """One epoch of shuffled, augmented, normalised batches; the same seed and epoch give the same batches."""
    n = len(data.labels)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    crop = prep.crop
    mean = tf.constant(prep.mean, tf.float32)
    std = tf.constant(prep.std, tf.float32)

    def augment(index, image, label):
        op_seed = tf.stack([tf.constant(seed * 100003 + epoch, tf.int64), tf.cast(index, tf.int64)])
        if random_crop:
            image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=op_seed)
        else:
            offset = (prep.resize - crop) // 2
            image = image[offset : offset + crop, offset : offset + crop, :]
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=op_seed[::-1])
        image = (tf.cast(image, tf.float32) / 255.0 - mean) / std
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((np.arange(n), data.images[order], data.labels[order]))
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def eval_inputs(data: Dataset, prep: Preprocessing) -> np.ndarray:
    """The preprocessed evaluation inputs (center crop), exactly as the service computes them."""
    return normalize(center_crop(data.images, prep.crop), prep)
