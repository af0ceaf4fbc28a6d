"""The few pieces of the engine that differ by framework, one module per Keras 3 backend.

The engine's arithmetic is written once in `keras.ops` (`model.engine`); what each framework does its
own way lives in its module here: the table of domain rows (allocated, written row by row in place,
gathered inside the compiled call), compiling the two forward functions, and what devices it sees.
Keras runs on one backend per process, fixed when it is first imported (`KERAS_BACKEND`), so the
backend is a property of the process, read from Keras: `current()`.

Each module provides `NAME`, `version()`, `devices() -> Devices`, `configure_threads(cores)`,
`constants(arrays, dtype)` (the shared kernels on the device) and `Table` (see `tensorflow.Table`
for the contract).
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

BACKENDS = ("tensorflow", "jax", "torch")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Devices:
    """What a backend computes on: device names (("CPU",) without an accelerator) and the free memory
    of the first accelerator in bytes, when the framework can tell (None otherwise)."""

    names: tuple[str, ...]
    gpu: bool
    free_bytes: int | None = None


def current() -> ModuleType:
    """The backend module of the framework Keras runs on in this process."""
    import keras

    name = keras.backend.backend()
    if name not in BACKENDS:
        raise RuntimeError(f"Keras runs on {name!r} here; the engine supports {BACKENDS}. Set KERAS_BACKEND.")
    return importlib.import_module(f"model.backends.{name}")


def bucket(n: int) -> int:
    """The batch size a compiled call is padded to, for frameworks that compile one program per shape
    (JAX): the next power of two, so that a few programs cover every batch size."""
    return 1 << max(0, n - 1).bit_length()
