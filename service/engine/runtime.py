"""The engine's framework, picked per process before Keras is first imported (`RA_BACKEND`), its
thread pools, and the report of which devices the engine computes on. Only the engine's process
imports a framework (the functions import it when called).
"""

from __future__ import annotations

import logging
import os
import sys

from service.views import DeviceReport

_log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The engine cannot run on the framework asked for in this process."""


def use_backend(name: str) -> None:
    """Make Keras (and so the engine) run on `name` in this process: set before Keras is imported, or
    checked when it already is (a process runs one backend)."""
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise BackendError(
                f"RA_BACKEND={name} but Keras already runs on {keras.backend.backend()} in this "
                "process: a process runs one backend. Start the service in a fresh process."
            )
        return
    os.environ["KERAS_BACKEND"] = name
    try:
        import keras
    except ImportError as exc:
        raise BackendError(
            f"RA_BACKEND={name} needs {name} installed ({exc}). Install it, or use RA_BACKEND=tensorflow."
        ) from None


def configure_threads(cores: int | None) -> None:
    """Give the framework's thread pools `cores` CPU cores (None: leave them all to it, its default)."""
    if cores is None:
        return
    from model import backends

    backends.current().configure_threads(cores)


class NoGpuError(RuntimeError):
    """RA_REQUIRE_GPU is set and the framework sees no GPU: refuse to serve on a silent CPU fallback."""


def device_report(compute_dtype: str, require_gpu: bool) -> DeviceReport:
    """The devices the framework will use. With `require_gpu` and no GPU visible, raise `NoGpuError`
    (on a CPU-only host TensorFlow also logs "failed call to cuInit": that only means no GPU)."""
    from model import backends

    backend = backends.current()
    found = backend.devices()
    report = DeviceReport(
        backend=backend.version(),
        devices=found.names,
        gpu=found.gpu,
        compute_dtype=compute_dtype,
        free_bytes=found.free_bytes,
    )
    if require_gpu and not found.gpu:
        raise NoGpuError(
            f"RA_REQUIRE_GPU is set but {backend.version()} sees no GPU. Run the container with the "
            "GPU (docker compose with the NVIDIA container toolkit, `docker run --gpus all`), or unset "
            "RA_REQUIRE_GPU to serve on the CPU."
        )
    return report
