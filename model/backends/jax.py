"""The engine's table and compiled calls on JAX: the table is an argument of two `jax.jit` programs
(so writing it never recompiles), written in place by a scatter that donates it.

JAX compiles one program per input shape, so a call is padded to a batch-size bucket
(`model.backends.bucket`): `warm_up` compiles the buckets the service will use. JAX waits for calls
already running on a table before the scatter that donates it writes (measured: same buffer, reads
see the old row), and a lock keeps a call from picking up a table that a write is donating.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the memory budget sizes what the engine takes

import jax
import jax.numpy as jnp
import numpy as np

from model.backends import Devices, bucket

NAME = "jax"


def version() -> str:
    return f"JAX {jax.__version__} ({jax.default_backend()})"


def devices() -> Devices:
    """JAX's devices; an accelerator's free memory from its allocator's statistics."""
    found = jax.devices()
    gpu = found[0].platform != "cpu"
    free = None
    if gpu:
        stats = found[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    names = tuple(f"{d.platform.upper()}:{d.id} {d.device_kind}" for d in found) if gpu else ("CPU",)
    return Devices(names, gpu, free)


def configure_threads(cores: int) -> None:
    """XLA's CPU thread pool is not resizable from Python: JAX uses every core it sees."""


def constants(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, jax.Array]:
    return {name: jnp.asarray(array, dtype) for name, array in arrays.items()}


class Table:
    """See `model.backends.tensorflow.Table` for the contract. (JAX zero-fills the table: its pages are
    touched at once.)"""

    def __init__(
        self,
        capacity: int,
        width: int,
        dtype: str,
        kernels: Mapping,
        forward: Callable,
        input_size: int,
        jit_compile: bool = True,
    ):
        self.dtype = jnp.dtype(dtype)
        self.rows = jnp.zeros((capacity, width), self.dtype)
        self._kernels = kernels
        self._lock = threading.Lock()
        self._traces = 0

        def mixed(kernels, table, x, slots):
            self._traces += 1  # runs once per compilation
            return forward(kernels, jnp.take(table, slots, axis=0), x, False)

        def single(kernels, table, x, slot):
            self._traces += 1
            return forward(kernels, table[slot], x, True)

        self._mixed, self._single = jax.jit(mixed), jax.jit(single)
        self._scatter = jax.jit(lambda table, slots, rows: table.at[slots].set(rows), donate_argnums=0)

    def _call(self, fn: Callable, images: np.ndarray, index: np.ndarray | int) -> np.ndarray:
        n = len(images)
        padded = bucket(n)
        if padded != n:
            images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
            if isinstance(index, np.ndarray):
                index = np.concatenate([index, np.full(padded - n, index[0], index.dtype)])
        with self._lock:
            out = fn(self._kernels, self.rows, images, index)
        return np.asarray(out)[:n]

    def mixed(self, images: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self._call(self._mixed, images, np.asarray(slots, np.int32))

    def single(self, images: np.ndarray, slot: int) -> np.ndarray:
        return self._call(self._single, images, np.int32(slot))

    def write(self, slots: np.ndarray, rows: np.ndarray) -> None:
        update = jnp.asarray(rows, self.dtype)
        with self._lock:
            self.rows = self._scatter(self.rows, jnp.asarray(slots, jnp.int32), update)

    def read(self, slots: np.ndarray) -> np.ndarray:
        with self._lock:
            rows = jnp.take(self.rows, jnp.asarray(slots, jnp.int32), axis=0)
        return np.asarray(rows, np.float32)

    def tracing_count(self) -> int:
        return self._traces

    def warm_up(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Compile both calls for the bucket of each of `batch_sizes`."""
        for n in sorted({bucket(n) for n in batch_sizes}):
            x = np.zeros((n, input_size, input_size, 3), np.float32)
            self.single(x, 0)
            self.mixed(x, np.zeros((n,), np.int32))
