"""TensorFlow's process-wide settings for the engine, applied before TensorFlow starts its runtime, and
the report of which devices the engine computes on. Only the engine's process imports TensorFlow
(the functions import it when called).
"""

from __future__ import annotations

import dataclasses
import logging
import os

_log = logging.getLogger(__name__)


def configure_tensorflow(cores: int | None) -> None:
    """Give TensorFlow's thread pools `cores` CPU cores (None: leave them all to it, its default)."""
    if cores is None:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cores)))
    except RuntimeError as exc:  # the runtime was already started in this process (e.g. tests)
        _log.warning("TensorFlow is already initialised; its thread pools stay as they are: %s", exc)
        return
    _log.info("%d of %d cores for TensorFlow's thread pools", cores, len(os.sched_getaffinity(0)))


class NoGpuError(RuntimeError):
    """RA_REQUIRE_GPU is set and the framework sees no GPU: refuse to serve on a silent CPU fallback."""


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What the engine computes on, logged once at start and shown by /readyz."""

    backend: str  # the framework and its version
    devices: tuple[str, ...]  # the engine's devices, e.g. ("GPU:0 NVIDIA H200",) or ("CPU",)
    gpu: bool
    compute_dtype: str

    def describe(self) -> str:
        where = ", ".join(self.devices) if self.gpu else "CPU (no GPU found, running on CPU)"
        return f"engine on {where}; {self.backend}; compute dtype {self.compute_dtype}"


def device_report(compute_dtype: str, require_gpu: bool) -> DeviceReport:
    """The devices TensorFlow will use. With `require_gpu` and no GPU visible, raise `NoGpuError`
    (on a CPU-only host TensorFlow also logs "failed call to cuInit": that only means no GPU)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(f"{gpu.name.removeprefix('/physical_device:')} {details.get('device_name', '')}".strip())
    report = DeviceReport(backend=f"TensorFlow {tf.__version__}", devices=tuple(names) or ("CPU",), gpu=bool(gpus),
                          compute_dtype=compute_dtype)
    if require_gpu and not gpus:
        raise NoGpuError("RA_REQUIRE_GPU is set but TensorFlow sees no GPU. Run the container with the GPU "
                         "(docker compose with the NVIDIA container toolkit, `docker run --gpus all`), or unset "
                         "RA_REQUIRE_GPU to serve on the CPU.")
    return report
