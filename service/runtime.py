"""TensorFlow's process-wide settings for a serving process, applied before TensorFlow starts its runtime.

With several workers on one host each process gets an equal share of the CPU cores for its thread
pools (TensorFlow would otherwise give every process all of them), and GPU memory grows on demand
so that the processes can share one GPU (TensorFlow takes all of it by default).
"""

from __future__ import annotations

import logging
import os

_log = logging.getLogger(__name__)


def configure_tensorflow(workers: int) -> None:
    """Split the cores between `workers` processes and let them share GPUs; a no-op for one worker."""
    if workers <= 1:
        return
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0))
    intra = max(1, cores // workers)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, intra)))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # the runtime was already started in this process (e.g. tests)
        _log.warning("TensorFlow is already initialised; its thread pools stay as they are: %s", exc)
        return
    _log.info("worker of %d: %d of %d cores for TensorFlow's thread pools", workers, intra, cores)
