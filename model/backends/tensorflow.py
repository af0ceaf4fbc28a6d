"""The engine's table and compiled calls on TensorFlow: a `tf.Variable` written in place by one
scatter op, gathered inside two `tf.function`s traced once for any batch size."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from model.backends import Devices

NAME = "tensorflow"
_log = logging.getLogger(__name__)


def version() -> str:
    return f"TensorFlow {tf.__version__}"


def devices() -> Devices:
    """TensorFlow's GPUs (it cannot tell their free memory before allocating on them)."""
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(f"{gpu.name.removeprefix('/physical_device:')} {details.get('device_name', '')}".strip())
    return Devices(tuple(names) or ("CPU",), bool(gpus))


def configure_threads(cores: int) -> None:
    """Give TensorFlow's thread pools `cores` CPU cores (only before its runtime starts)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cores)))
    except RuntimeError as exc:  # the runtime was already started in this process (e.g. tests)
        _log.warning("TensorFlow is already initialised; its thread pools stay as they are: %s", exc)
        return
    _log.info("%d of %d cores for TensorFlow's thread pools", cores, len(os.sched_getaffinity(0)))


def constants(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, tf.Variable]:
    """The shared kernels as variables (captured by the compiled calls, not folded into their graphs)."""
    return {name: tf.Variable(tf.constant(array, dtype), trainable=False) for name, array in arrays.items()}


class Table:
    """`capacity` rows of `width` numbers in `dtype`, and the two forward functions over them.

    `forward(kernels, rows, images, single)` is the engine's arithmetic in `keras.ops`: `rows` are the
    call's gathered rows, one per image (`single`: the one row of the batch's only domain).
    A row is written before any call reads it, so the table starts uninitialised (untouched pages cost
    no memory). Writes go to rows no running call reads (the engine's slot bookkeeping sees to it).
    """

    def __init__(
        self,
        capacity: int,
        width: int,
        dtype: str,
        kernels: Mapping,
        forward: Callable,
        input_size: int,
        jit_compile: bool = False,
    ):
        self.dtype = tf.as_dtype(dtype)
        self.rows = tf.Variable(
            tf.raw_ops.Empty(shape=(capacity, width), dtype=self.dtype, init=False), trainable=False
        )
        image = tf.TensorSpec((None, input_size, input_size, 3), tf.float32)
        self._mixed = tf.function(
            lambda x, slots: forward(kernels, tf.gather(self.rows, slots), x, False),
            input_signature=[image, tf.TensorSpec((None,), tf.int32)],
            jit_compile=jit_compile,
            reduce_retracing=True,
            autograph=False,  # the forward's loops and branches are over its static structure
        )
        self._single = tf.function(
            lambda x, slot: forward(kernels, tf.gather(self.rows, slot), x, True),
            input_signature=[image, tf.TensorSpec((), tf.int32)],
            jit_compile=jit_compile,
            reduce_retracing=True,
            autograph=False,  # the forward's loops and branches are over its static structure
        )

    def mixed(self, images: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self._mixed(tf.constant(images), tf.constant(slots, tf.int32)).numpy()

    def single(self, images: np.ndarray, slot: int) -> np.ndarray:
        return self._single(tf.constant(images), tf.constant(slot, tf.int32)).numpy()

    def write(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write full-width `rows` into `slots`: one op, in place."""
        tf.raw_ops.ResourceScatterUpdate(
            resource=self.rows.handle, indices=tf.constant(slots, tf.int32), updates=tf.constant(rows, self.dtype)
        )

    def read(self, slots: np.ndarray) -> np.ndarray:
        """The rows of `slots` as float32 host arrays."""
        rows = tf.raw_ops.ResourceGather(
            resource=self.rows.handle, indices=tf.constant(slots, tf.int32), dtype=self.dtype
        )
        return np.asarray(rows.numpy(), np.float32)

    def tracing_count(self) -> int:
        return self._mixed.experimental_get_tracing_count() + self._single.experimental_get_tracing_count()

    def warm_up(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Trace both calls (once: any batch size) and run them at `batch_sizes`."""
        for n in batch_sizes:
            x = np.zeros((n, input_size, input_size, 3), np.float32)
            self.single(x, 0)
            self.mixed(x, np.zeros((n,), np.int32))
