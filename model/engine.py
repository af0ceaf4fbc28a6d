"""The inference engine: one backbone in device memory serving any mix of domains in one call.

Each domain's folded tables are one row (`model.folding.RowLayout`) of one table variable with a
fixed number of slots. A call gathers each sample's row by slot index, so a batch of 32 requests for 32 domains is
one forward pass: the shared 3x3 convolutions run once for the whole batch, the adapters as a
per-sample batched matmul, the head with a per-sample class mask (`-inf` logits past a domain's
class count). A batch that is all one domain takes a cheaper path that folds the domain into the
3x3 kernels wherever that costs fewer FLOPs than applying it to the activations.

The engine knows no domain names: `load` writes a bundle into a free slot and returns a `Slot`
handle, `predict` computes over handles, `release` gives a slot back. Who owns which handle (and
under which name and version) is the caller's business: the service's registry. Loading writes
one row with one op (a copy), releasing writes nothing: the compiled functions never retrace
unless the slots or the class width must grow (then once). A released slot is not reused until every call that holds it
has finished.

The arithmetic is written once in `keras.ops` and runs on the framework Keras runs on in this process
(TensorFlow, JAX or PyTorch: `KERAS_BACKEND`); the table, its writes and the compiled calls are the
backend's (`model.backends`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from keras import ops

from model import backends
from model.backbone import Backbone
from model.bundle import AdapterBundle, check_compatible
from model.config import ConvUnit, topology
from model.folding import RowLayout
from model.safetensors_io import InvalidFileError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
GOLDEN_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}  # relative to max |logit|
NOMINAL_BATCH = 8  # the single-domain path folds into the kernel when that is cheaper at this batch
GROW_CHUNK_ROWS = 256  # rows copied at a time when the table grows
CLASS_CAPACITY = 16  # the head width an engine starts with


class ReleasedSlotError(RuntimeError):
    """`predict` was handed a slot that was released before the call could hold it: resolve it again."""


@dataclasses.dataclass(frozen=True)
class _UnitPlan:
    unit: ConvUnit
    out_size: int  # output side in pixels
    fold_single: bool  # single-domain path: fold the per-domain matrix into the 3x3 kernel


@dataclasses.dataclass(frozen=True)
class _BlockPlan:
    conv1: _UnitPlan
    conv2: _UnitPlan
    projects: bool  # the shortcut pools and zero-pads (see `model.config.Block`)


class Slot:
    """A handle to one loaded domain's rows in the engine's tables.

    Unique per `load`: once released, the handle stays dead even after its rows are reused.
    Its fields are the engine's bookkeeping (changed only under the engine's lock).
    """

    __slots__ = ("index", "num_classes", "refs", "released")

    def __init__(self, index: int, num_classes: int):
        self.index, self.num_classes = index, num_classes
        self.refs, self.released = 1, False  # the loader holds it until it is published

    def __repr__(self) -> str:
        return f"Slot({self.index}, classes={self.num_classes}{', released' if self.released else ''})"


class _Tables:
    """Every slot's row (see `model.folding.RowLayout`) in one backend table (`model.backends`) with
    its head `class_capacity` wide, and the two compiled forward functions that read it. A load is one
    row written by one op; a call gathers its slots' rows."""

    def __init__(self, engine: InferenceEngine, capacity: int, class_capacity: int):
        self.capacity, self.class_capacity = capacity, class_capacity
        self.layout = engine.layout
        self.width = self.layout.length(class_capacity)
        self._padding = self.layout.padding(class_capacity)
        self.store = engine.backend.Table(
            capacity,
            self.width,
            engine.compute_dtype,
            engine._kernels,
            functools.partial(engine._forward, self),
            engine.input_size,
            engine.jit_compile,
        )
        self.mixed, self.single = self.store.mixed, self.store.single  # (images, slots) / (images, slot) -> logits

    def parts(self, rows, single: bool) -> dict[tuple[str, str], object]:
        """(unit, part) -> the tables in the gathered `rows` (one slot: its table; else one per sample, batch first)."""
        lead = () if single else (-1,)
        out = {
            (unit, part): ops.reshape(rows[..., a:b], (*lead, *shape))
            for unit, part, shape, a, b in self.layout.offsets
        }
        c = self.layout.feature_width
        classes = ops.reshape(rows[..., self.layout.base :], (*lead, self.class_capacity, c + 1))
        out["head", "kernel"], out["head", "logit_bias"] = classes[..., :c], classes[..., c]  # (K, C), (K,)
        return out

    def write(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write `rows` (each at most `width` long: narrower heads are padded) into `slots`."""
        if rows.shape[1] < self.width:
            pad = np.broadcast_to(self._padding[: self.width - rows.shape[1]], (len(rows), self.width - rows.shape[1]))
            rows = np.concatenate([rows, pad], axis=1)
        self.store.write(slots, rows)

    def read(self, slots: np.ndarray) -> np.ndarray:
        """The rows of `slots`, full width, as float32."""
        return self.store.read(slots)

    def tracing_count(self) -> int:
        return self.store.tracing_count()


class InferenceEngine:
    """Serve many domains on one backbone.

    Args:
        backbone: the shared weights; every bundle must carry its fingerprint.
        capacity: domain slots: allocated at once (pages untouched until rows are written), so
            give what the memory budget fits; when every slot is taken the table doubles (a copy,
            retracing once).
        class_capacity: initial head width; a domain with more classes grows it (retracing once).
        compute_dtype: "float32" (default, and the only sensible choice on CPU), or "bfloat16" /
            "float16" on a GPU.
        jit_compile: on TensorFlow, compile with XLA (only if it measures faster on the target
            machine); JAX always compiles with XLA, PyTorch runs eagerly.

    Example:
        >>> engine = InferenceEngine(backbone, capacity=64)
        >>> flowers, cars = engine.load(flowers_bundle), engine.load(cars_bundle)
        >>> logits = engine.predict(images, [flowers, cars, flowers])
        >>> engine.release(cars)
    """

    def __init__(
        self,
        backbone: Backbone,
        capacity: int = 16,
        class_capacity: int = CLASS_CAPACITY,
        compute_dtype: str = "float32",
        jit_compile: bool = False,
    ):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}. Received: compute_dtype={compute_dtype!r}"
            )
        if capacity < 1 or class_capacity < 1:
            raise ValueError(f"capacity and class_capacity must be >= 1. Received: {capacity}, {class_capacity}")
        self.backbone = backbone
        self.adapter = backbone.config.adapter
        self.input_size = backbone.config.input_size
        self.backend = backends.current()
        self.compute_dtype = compute_dtype
        self.jit_compile = jit_compile
        self.layout = RowLayout.of(backbone.config)
        self.stem, self.blocks = self._make_plan()
        self.plan = [self.stem] + [p for b in self.blocks for p in (b.conv1, b.conv2)]
        self._kernels = self.backend.constants(
            {p.unit.name: backbone.weights[f"{p.unit.name}_conv3x3.kernel"] for p in self.plan}, compute_dtype
        )
        self._lock = threading.Lock()  # guards the slot bookkeeping below (never held while computing)
        self._write_lock = threading.Lock()  # serialises table writes and growth
        self._used: dict[int, Slot] = {}  # rows held by a live or a still-referenced released slot
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._retired_traces = 0
        self._tables = _Tables(self, capacity, class_capacity)

    # ----- the computation -------------------------------------------------------------------

    def _make_plan(self) -> tuple[_UnitPlan, list[_BlockPlan]]:
        """`model.config.topology` with each unit's output size and single-path fold decision."""
        size = self.input_size

        def unit_plan(unit: ConvUnit) -> _UnitPlan:
            nonlocal size
            size //= unit.stride
            return _UnitPlan(unit, size, fold_single=9 * unit.in_channels < NOMINAL_BATCH * size * size)

        stem, blocks = topology(self.backbone.config)
        stem_plan = unit_plan(stem)
        return stem_plan, [_BlockPlan(unit_plan(b.conv1), unit_plan(b.conv2), b.projects) for b in blocks]

    @staticmethod
    def _conv(x, kernel, stride: int):
        if stride == 1:
            return ops.conv(x, kernel, 1, "same")
        return ops.conv(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), kernel, stride, "valid")  # PyTorch's padding=1

    def _unit(self, kernels: Mapping, parts: dict, p: _UnitPlan, x, single: bool):
        """One conv unit; `parts` holds its tables for one slot (single) or one slot per sample (mixed)."""
        name, u = p.unit.name, p.unit
        kernel = kernels[name]
        bias = parts[name, "bias"]
        out_shape = (-1, p.out_size, p.out_size, u.out_channels)
        if single:
            if self.adapter == "series":
                matrix = parts[name, "matrix"]
                if p.fold_single:
                    kernel = ops.reshape(
                        ops.reshape(kernel, (-1, u.out_channels)) @ matrix, (3, 3, u.in_channels, u.out_channels)
                    )
                    return self._conv(x, kernel, u.stride) + bias
                z = self._conv(x, kernel, u.stride)
                return ops.reshape(ops.reshape(z, (-1, u.out_channels)) @ matrix + bias, out_shape)
            kernel = kernel * parts[name, "scale"]
            if self.adapter == "parallel":  # the strided 1x1 reads the 3x3's centre tap: fold it there
                kernel = kernel + ops.pad(parts[name, "side"][None, None], [[1, 1], [1, 1], [0, 0], [0, 0]])
            return self._conv(x, kernel, u.stride) + bias

        hw = p.out_size * p.out_size
        z = self._conv(x, kernel, u.stride)
        if self.adapter == "series":
            z = ops.reshape(z, (-1, hw, u.out_channels)) @ parts[name, "matrix"]
            return ops.reshape(z + bias[:, None, :], out_shape)
        z = z * parts[name, "scale"][:, None, None, :] + bias[:, None, None, :]
        if self.adapter == "parallel":
            xs = x[:, :: u.stride, :: u.stride, :]
            side = ops.reshape(xs, (-1, hw, u.in_channels)) @ parts[name, "side"]
            z = z + ops.reshape(side, out_shape)
        return z

    def _forward(self, t: _Tables, kernels: Mapping, rows, x, single: bool):
        """Logits (float32, `t.class_capacity` wide) of images `x` under the gathered `rows` (`model.backends`)."""
        parts = t.parts(rows, single)
        x = ops.cast(x, self.compute_dtype)
        x = self._unit(kernels, parts, self.stem, x, single)  # the stem: no ReLU after it
        for block in self.blocks:
            y = ops.relu(self._unit(kernels, parts, block.conv1, x, single))
            y = self._unit(kernels, parts, block.conv2, y, single)
            if block.projects:
                unit = block.conv1.unit
                x = ops.average_pool(x, 2, 2, "valid")
                x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, unit.out_channels - unit.in_channels]])
            x = ops.relu(y + x)
        scale, shift = parts["head", "scale"], parts["head", "bias"]
        kernel, logit_bias = parts["head", "kernel"], parts["head", "logit_bias"]  # (K, C) per slot, (K,)
        if not single:
            scale, shift = scale[:, None, None, :], shift[:, None, None, :]
        pooled = ops.mean(ops.relu(x * scale + shift), axis=(1, 2))
        logits = pooled @ ops.transpose(kernel) if single else ops.einsum("bc,bkc->bk", pooled, kernel)
        return ops.cast(logits + logit_bias, "float32")

    # ----- slots -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._tables.capacity

    @property
    def loaded(self) -> int:
        """Slots whose rows are in use (live, or released but still held by a running call)."""
        with self._lock:
            return len(self._used)

    @property
    def row_bytes(self) -> int:
        """Bytes one loaded domain takes in the table at its current head width."""
        return self._tables.width * backends.DTYPE_BYTES[self.compute_dtype]

    @staticmethod
    def row_bytes_for(backbone: Backbone, compute_dtype: str = "float32", class_capacity: int = CLASS_CAPACITY) -> int:
        """`row_bytes` of an engine not made yet (to size its capacity from a memory budget)."""
        return RowLayout.of(backbone.config).length(class_capacity) * backends.DTYPE_BYTES[compute_dtype]

    @property
    def busy_s(self) -> float | None:
        """Seconds the device has computed, where the engine can tell: not here (a GPU's own counters
        can: `nvidia-smi`); `model.simulated.SimulatedDevice` can."""
        return None

    def tracing_count(self) -> int:
        """How many times the forward functions were traced (to prove that loading never retraces)."""
        return self._retired_traces + self._tables.tracing_count()

    def fold(self, bundle: AdapterBundle) -> np.ndarray:
        """The bundle as the table holds it: its row (see `model.folding`); keep it to `load_row` it again."""
        check_compatible(bundle, self.backbone)
        return self.layout.fold(bundle.weights)

    def load(self, bundle: AdapterBundle, verify_golden: bool = True) -> Slot:
        """Write `bundle` into a free slot, self-test it on its golden inputs, and return its handle.

        On failure (`InvalidFileError`) the slot goes back to the free list and nothing changes.
        """
        return self.load_row(self.fold(bundle), bundle if verify_golden else None)

    def load_row(self, row: np.ndarray, golden: AdapterBundle | None = None, wait: bool = True) -> Slot | None:
        """Write a folded row into a free slot (self-tested against `golden`'s tensors if given).

        With `wait=False` it returns None instead of waiting: when another write holds the table or
        the table would have to grow first (the caller then calls again where it may wait).
        """
        num_classes = self.layout.num_classes(row)
        if not self._write_lock.acquire(blocking=wait):
            return None
        try:
            if not self._has_room(num_classes):
                if not wait:
                    return None
                self._ensure_room(num_classes)
            with self._lock:
                slot = Slot(self._free.pop(), num_classes)
                self._used[slot.index] = slot
            try:
                self._tables.write(np.array([slot.index]), row[None])
            except BaseException:
                self._discard(slot)
                raise
        finally:
            self._write_lock.release()
        if golden is not None and golden.golden_inputs is not None:
            try:
                self._verify_golden(golden, slot)
            except BaseException:
                self._discard(slot)
                raise
        self._unref([slot])
        return slot

    def _discard(self, slot: Slot) -> None:
        """A slot whose load failed goes back to the free list."""
        self.release(slot)
        self._unref([slot])

    def read_back(self, slot: Slot) -> np.ndarray:
        """A live slot's row, copied to host memory (to `load_row` it again later)."""
        with self._lock:
            if slot.released:
                raise ReleasedSlotError(f"{slot!r} was released")
            slot.refs += 1
            tables = self._tables
        try:
            return tables.read(np.array([slot.index]))[0, : self.layout.length(slot.num_classes)].copy()
        finally:
            self._unref([slot])

    def release(self, slot: Slot) -> None:
        """No new call may use `slot`; its rows are reused once the calls that hold it have finished."""
        with self._lock:
            if slot.released:
                return
            slot.released = True
            self._free_if_unused(slot)

    def _free_if_unused(self, slot: Slot) -> None:
        """Hold `_lock`."""
        if slot.released and slot.refs == 0 and self._used.get(slot.index) is slot:
            del self._used[slot.index]
            self._free.append(slot.index)

    def _unref(self, slots: Sequence[Slot]) -> None:
        """Drop one reference per entry of `slots`; free released slots that nobody holds any more."""
        with self._lock:
            for slot in slots:
                slot.refs -= 1
                self._free_if_unused(slot)

    def _has_room(self, num_classes: int) -> bool:
        with self._lock:
            return bool(self._free) and num_classes <= self._tables.class_capacity

    def _ensure_room(self, num_classes: int) -> None:
        """Hold `_write_lock`. Grow the table (doubling) when no slot is free or the head is too narrow;
        retraces once. Rows are copied in chunks, so growing needs little memory beyond both tables."""
        old = self._tables
        with self._lock:
            full = not self._free
        if not full and num_classes <= old.class_capacity:
            return
        capacity = old.capacity * 2 if full else old.capacity
        new = _Tables(self, capacity, max(old.class_capacity, num_classes))
        for start in range(0, old.capacity, GROW_CHUNK_ROWS):
            slots = np.arange(start, min(start + GROW_CHUNK_ROWS, old.capacity))
            new.write(slots, old.read(slots))
        with self._lock:
            self._retired_traces += old.tracing_count()
            self._tables = new
            self._free = list(range(capacity - 1, old.capacity - 1, -1)) + self._free

    def _verify_golden(self, bundle: AdapterBundle, slot: Slot) -> None:
        """Compare the slot's logits on the bundle's golden inputs with the logits it was made with."""
        got = np.stack(self.predict(bundle.golden_inputs, slot))
        want = bundle.golden_logits
        error = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
        tolerance = GOLDEN_TOLERANCE[self.compute_dtype]
        if not error <= tolerance:
            raise InvalidFileError(
                "golden",
                f"The bundle's golden self-test failed on this backbone: logits differ by {error:.2e} of their "
                f"largest value (tolerance {tolerance:.0e}). The bundle does not behave as when it was made.",
            )

    # ----- inference -------------------------------------------------------------------------

    def predict(self, images: np.ndarray, slots: Slot | Sequence[Slot]) -> list[np.ndarray]:
        """Logits for preprocessed NHWC float32 `images`, one slot per image (or one for all).

        Returns one float32 array of its slot's class count per image. Raises `ReleasedSlotError`
        when a slot was released before this call could hold it.
        """
        images = np.asarray(images, np.float32)
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must have shape (N, {s}, {s}, 3). Received: {images.shape}")
        held = [slots] * len(images) if isinstance(slots, Slot) else list(slots)
        if len(held) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(held)} slots; give one slot per image.")
        if not held:
            return []
        with self._lock:
            released = [slot for slot in held if slot.released]
            if released:
                raise ReleasedSlotError(f"These slots were released: {sorted(set(map(repr, released)))}")
            for slot in held:
                slot.refs += 1
            tables = self._tables
        try:
            logits = self._compute(tables, images, [slot.index for slot in held])
        finally:
            self._unref(held)
        return [row[: slot.num_classes] for row, slot in zip(logits, held)]

    def _compute(self, tables: _Tables, images: np.ndarray, indices: list[int]) -> np.ndarray:
        """The device's part of `predict`: (N, class capacity) float32 logits of `images` under the slots' rows."""
        if len(set(indices)) == 1:
            return tables.single(images, indices[0])
        return tables.mixed(images, np.array(indices, np.int32))

    def warm_up(self, batch_sizes: Sequence[int] = (1, 2)) -> None:
        """Compile and run both paths (and the table copy to host) once so that no request pays a compilation."""
        self._tables.read(np.array([0]))
        self._tables.store.warm_up(batch_sizes, self.input_size)
