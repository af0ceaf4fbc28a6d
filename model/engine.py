"""The inference engine: one backbone in device memory serving any mix of domains in one call.

Per-domain folded tables (see `model.folding`) are stacked in `tf.Variable`s with a fixed number of
slots. A call gathers each sample's rows by slot index, so a batch of 32 requests for 32 domains is
one forward pass: the shared 3x3 convolutions run once for the whole batch, the adapters as a
per-sample batched matmul, the head with a per-sample class mask (`-inf` logits past a domain's
class count). A batch that is all one domain takes a cheaper path that folds the domain into the
3x3 kernels wherever that costs fewer FLOPs than applying it to the activations.

The engine knows no domain names: `load` writes a bundle into a free slot and returns a `Slot`
handle, `predict` computes over handles, `release` gives a slot back. Who owns which handle (and
under which name and version) is the caller's business: the service's registry. Loading and
releasing write table rows only: the compiled functions never retrace unless the slots or the
class width must grow (then once). A released slot is not reused until every call that holds it
has finished.

This module is TensorFlow-specific (tf.function, tf.Variable); the service runs on TensorFlow.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from model.backbone import Backbone
from model.bundle import AdapterBundle, check_compatible
from model.config import ConvUnit, topology
from model.folding import FoldedDomain, FoldedUnit, fold_domain
from model.safetensors_io import InvalidFileError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
GOLDEN_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}  # relative to max |logit|
NOMINAL_BATCH = 8  # the single-domain path folds into the kernel when that is cheaper at this batch


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
    """The stacked per-domain tables and the two compiled forward functions that read them."""

    def __init__(self, engine: "InferenceEngine", capacity: int, class_capacity: int):
        self.capacity, self.class_capacity = capacity, class_capacity
        dt, mode = engine.compute_dtype, engine.adapter
        c = engine.backbone.config.feature_width

        def table(shape, fill=0.0):
            return tf.Variable(tf.fill((capacity, *shape), tf.constant(fill, dt)), trainable=False)

        self.bias = {p.unit.name: table((p.unit.out_channels,)) for p in engine.plan}
        if mode == "series":
            self.matrix = {p.unit.name: table((p.unit.out_channels, p.unit.out_channels)) for p in engine.plan}
        else:
            self.scale = {p.unit.name: table((p.unit.out_channels,)) for p in engine.plan}
        if mode == "parallel":
            self.side = {p.unit.name: table((p.unit.in_channels, p.unit.out_channels)) for p in engine.plan}
        self.head_scale, self.head_bias = table((c,)), table((c,))
        self.kernel = table((c, class_capacity))
        self.logit_bias = table((class_capacity,), -np.inf)
        image = tf.TensorSpec((None, engine.input_size, engine.input_size, 3), tf.float32)
        self.mixed = tf.function(lambda x, slots: engine._forward(self, x, slots, single=False),
                                 input_signature=[image, tf.TensorSpec((None,), tf.int32)],
                                 jit_compile=engine.jit_compile, reduce_retracing=True)
        self.single = tf.function(lambda x, slot: engine._forward(self, x, slot, single=True),
                                  input_signature=[image, tf.TensorSpec((), tf.int32)],
                                  jit_compile=engine.jit_compile, reduce_retracing=True)
        self.variables = self._ordered()
        self._shapes = [tuple(v.shape[1:]) for v in self.variables]
        self._sizes = [int(np.prod(shape)) for shape in self._shapes]
        # A domain's rows travel as one flat vector through one compiled call each way: dozens of
        # eager ops, or a call with dozens of arguments, cost milliseconds of Python.
        slot_spec = tf.TensorSpec((), tf.int32)
        self._write_flat = tf.function(self._scatter, input_signature=[slot_spec, tf.TensorSpec((sum(self._sizes),), dt)])
        self._read_flat = tf.function(
            lambda slot: tf.concat([tf.reshape(tf.gather(v, slot), [-1]) for v in self.variables], 0),
            input_signature=[slot_spec])

    def _ordered(self) -> list[tf.Variable]:
        groups = [self.bias, getattr(self, "matrix", {}), getattr(self, "scale", {}), getattr(self, "side", {})]
        return [g[k] for g in groups for k in sorted(g)] + [self.head_scale, self.head_bias, self.kernel,
                                                            self.logit_bias]

    def _scatter(self, slot: tf.Tensor, flat: tf.Tensor) -> None:
        for var, part, shape in zip(self.variables, tf.split(flat, self._sizes), self._shapes):
            var.scatter_nd_update([[slot]], tf.reshape(part, (1, *shape)))

    def write(self, slot: int, folded: FoldedDomain, dtype: tf.DType) -> None:
        """Write one domain's folded tables into row `slot` (in `self.variables` order)."""
        units = folded.units
        groups = [{n: u.bias for n, u in units.items()}, {n: u.matrix for n, u in units.items() if u.matrix is not None},
                  {n: u.scale for n, u in units.items() if u.scale is not None},
                  {n: u.side for n, u in units.items() if u.side is not None}]
        k = folded.kernel.shape[1]
        kernel = np.zeros((folded.kernel.shape[0], self.class_capacity), np.float32)
        kernel[:, :k] = folded.kernel
        logit_bias = np.full((self.class_capacity,), -np.inf, np.float32)
        logit_bias[:k] = folded.logit_bias
        rows = [g[n] for g in groups for n in sorted(g)] + [folded.head_scale, folded.head_bias, kernel, logit_bias]
        flat = np.concatenate([np.ravel(r) for r in rows])
        self._write_flat(tf.constant(slot, tf.int32), tf.constant(flat, dtype))

    def read(self, slot: int, num_classes: int, adapter: str) -> FoldedDomain:
        """The folded tables in row `slot` (the inverse of `write`)."""
        flat = np.asarray(self._read_flat(tf.constant(slot, tf.int32)), np.float32)
        rows = [part.reshape(shape) for part, shape in zip(np.split(flat, np.cumsum(self._sizes)[:-1]), self._shapes)]
        names = sorted(self.bias)
        it = iter(rows)
        bias = {n: next(it) for n in names}
        matrix = {n: next(it) for n in names} if adapter == "series" else {}
        scale = {n: next(it) for n in names} if adapter != "series" else {}
        side = {n: next(it) for n in names} if adapter == "parallel" else {}
        head_scale, head_bias, kernel, logit_bias = it
        units = {n: FoldedUnit(bias=bias[n], matrix=matrix.get(n), scale=scale.get(n), side=side.get(n)) for n in names}
        return FoldedDomain(units=units, head_scale=head_scale, head_bias=head_bias,
                            kernel=kernel[:, :num_classes], logit_bias=logit_bias[:num_classes])

    def tracing_count(self) -> int:
        return self.mixed.experimental_get_tracing_count() + self.single.experimental_get_tracing_count()


class InferenceEngine:
    """Serve many domains on one backbone.

    Args:
        backbone: the shared weights; every bundle must carry its fingerprint.
        capacity: initial number of domain slots (grows by doubling, retracing once each time).
        capacity_step: when doubling would pass this number of slots, grow to it instead (the most
            a caller expects to hold; past it, doubling resumes).
        class_capacity: initial head width; a domain with more classes grows it (retracing once).
        compute_dtype: "float32" (default, and the only sensible choice on CPU), or "bfloat16" /
            "float16" on a GPU.
        jit_compile: compile with XLA (only if it measures faster on the target machine).

    Example:
        >>> engine = InferenceEngine(backbone, capacity=64)
        >>> flowers, cars = engine.load(flowers_bundle), engine.load(cars_bundle)
        >>> logits = engine.predict(images, [flowers, cars, flowers])
        >>> engine.release(cars)
    """

    def __init__(self, backbone: Backbone, capacity: int = 16, class_capacity: int = 16,
                 compute_dtype: str = "float32", jit_compile: bool = False, capacity_step: int | None = None):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}. Received: compute_dtype={compute_dtype!r}")
        if capacity < 1 or class_capacity < 1:
            raise ValueError(f"capacity and class_capacity must be >= 1. Received: {capacity}, {class_capacity}")
        self.backbone = backbone
        self.adapter = backbone.config.adapter
        self.input_size = backbone.config.input_size
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.jit_compile = jit_compile
        self.capacity_step = capacity_step
        self.stem, self.blocks = self._make_plan()
        self.plan = [self.stem] + [p for b in self.blocks for p in (b.conv1, b.conv2)]
        self._kernels = {p.unit.name: tf.Variable(tf.constant(backbone.weights[f"{p.unit.name}_conv3x3.kernel"],
                                                              self.compute_dtype), trainable=False)
                         for p in self.plan}
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

    def _conv(self, x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
        if stride == 1:
            return tf.nn.conv2d(x, kernel, 1, "SAME")
        return tf.nn.conv2d(x, kernel, stride, [[0, 0], [1, 1], [1, 1], [0, 0]])

    def _unit(self, t: _Tables, p: _UnitPlan, x: tf.Tensor, slots: tf.Tensor, single: bool) -> tf.Tensor:
        """One conv unit; `slots` is a scalar slot (single) or one slot per sample (mixed)."""
        name, u = p.unit.name, p.unit
        kernel = self._kernels[name]
        bias = tf.gather(t.bias[name], slots)
        if single:
            if self.adapter == "series":
                matrix = tf.gather(t.matrix[name], slots)
                if p.fold_single:
                    kernel = tf.reshape(tf.reshape(kernel, (-1, u.out_channels)) @ matrix, kernel.shape)
                    return self._conv(x, kernel, u.stride) + bias
                z = self._conv(x, kernel, u.stride)
                return tf.reshape(tf.reshape(z, (-1, u.out_channels)) @ matrix + bias, tf.shape(z))
            kernel = kernel * tf.gather(t.scale[name], slots)
            if self.adapter == "parallel":  # the strided 1x1 reads the 3x3's centre tap: fold it there
                side = tf.gather(t.side[name], slots)
                kernel = kernel + tf.pad(side[None, None], [[1, 1], [1, 1], [0, 0], [0, 0]])
            return self._conv(x, kernel, u.stride) + bias

        n, hw = tf.shape(x)[0], p.out_size * p.out_size
        z = self._conv(x, kernel, u.stride)
        if self.adapter == "series":
            z = tf.reshape(z, (n, hw, u.out_channels)) @ tf.gather(t.matrix[name], slots)
            return tf.reshape(z + bias[:, None, :], (n, p.out_size, p.out_size, u.out_channels))
        z = z * tf.gather(t.scale[name], slots)[:, None, None, :] + bias[:, None, None, :]
        if self.adapter == "parallel":
            xs = x[:, :: u.stride, :: u.stride, :]
            side = tf.reshape(xs, (n, hw, u.in_channels)) @ tf.gather(t.side[name], slots)
            z = z + tf.reshape(side, (n, p.out_size, p.out_size, u.out_channels))
        return z

    def _forward(self, t: _Tables, x: tf.Tensor, slots: tf.Tensor, single: bool) -> tf.Tensor:
        x = tf.cast(x, self.compute_dtype)
        x = self._unit(t, self.stem, x, slots, single)  # the stem: no ReLU after it
        for block in self.blocks:
            y = tf.nn.relu(self._unit(t, block.conv1, x, slots, single))
            y = self._unit(t, block.conv2, y, slots, single)
            if block.projects:
                unit = block.conv1.unit
                x = tf.nn.avg_pool2d(x, 2, 2, "VALID")
                x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, unit.out_channels - unit.in_channels]])
            x = tf.nn.relu(y + x)
        scale, shift = tf.gather(t.head_scale, slots), tf.gather(t.head_bias, slots)
        kernel, logit_bias = tf.gather(t.kernel, slots), tf.gather(t.logit_bias, slots)
        if not single:
            scale, shift = scale[:, None, None, :], shift[:, None, None, :]
        pooled = tf.reduce_mean(tf.nn.relu(x * scale + shift), axis=(1, 2))
        logits = pooled @ kernel if single else tf.einsum("bc,bck->bk", pooled, kernel)
        return tf.cast(logits + logit_bias, tf.float32)

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
        """Bytes one loaded domain takes in the tables at their current head width."""
        return sum(self._tables._sizes) * self.compute_dtype.size  # noqa: SLF001 - the engine's own tables

    def tracing_count(self) -> int:
        """How many times the forward functions were traced (to prove that loading never retraces)."""
        return self._retired_traces + self._tables.tracing_count()

    def fold(self, bundle: AdapterBundle) -> FoldedDomain:
        """The bundle in the form the tables hold (see `model.folding`); keep it to `load_folded` it again."""
        check_compatible(bundle, self.backbone)
        return fold_domain(bundle.config, bundle.weights)

    def load(self, bundle: AdapterBundle, verify_golden: bool = True) -> Slot:
        """Write `bundle` into a free slot, self-test it on its golden inputs, and return its handle.

        On failure (`InvalidFileError`) the slot goes back to the free list and nothing changes.
        """
        return self.load_folded(self.fold(bundle), bundle if verify_golden else None)

    def load_folded(self, folded: FoldedDomain, golden: AdapterBundle | None = None) -> Slot:
        """Write already folded tables into a free slot (self-tested against `golden`'s tensors if given)."""
        num_classes = folded.kernel.shape[1]
        with self._write_lock:
            self._ensure_room(num_classes)
            with self._lock:
                slot = Slot(self._free.pop(), num_classes)
                self._used[slot.index] = slot
            try:
                self._tables.write(slot.index, folded, self.compute_dtype)
                if golden is not None and golden.golden_inputs is not None:
                    self._verify_golden(golden, slot.index)
            except BaseException:
                self.release(slot)
                self._unref([slot])
                raise
        self._unref([slot])
        return slot

    def read_back(self, slot: Slot) -> FoldedDomain:
        """A live slot's folded tables, copied to host memory (to `load_folded` them again later)."""
        with self._lock:
            if slot.released:
                raise ReleasedSlotError(f"{slot!r} was released")
            slot.refs += 1
            tables = self._tables
        try:
            return tables.read(slot.index, slot.num_classes, self.adapter)
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

    def _ensure_room(self, num_classes: int) -> None:
        """Grow the tables (doubling) when no slot is free or the head is too narrow; retraces once."""
        old = self._tables
        with self._lock:
            full = not self._free
        if not full and num_classes <= old.class_capacity:
            return
        capacity = old.capacity
        if full:
            capacity *= 2
            if self.capacity_step is not None and old.capacity < self.capacity_step < capacity:
                capacity = self.capacity_step
        class_capacity = max(old.class_capacity, num_classes)
        new = _Tables(self, capacity, class_capacity)
        for src, dst in zip(old.variables, new.variables):
            if src is old.kernel:
                dst[: old.capacity, :, : old.class_capacity].assign(src)
            elif src is old.logit_bias:
                dst[: old.capacity, : old.class_capacity].assign(src)
            else:
                dst[: old.capacity].assign(src)
        with self._lock:
            self._retired_traces += old.tracing_count()
            self._tables = new
            self._free = list(range(capacity - 1, old.capacity - 1, -1)) + self._free

    def _verify_golden(self, bundle: AdapterBundle, slot: int) -> None:
        """Compare the slot's logits on the bundle's golden inputs with the logits it was made with."""
        got = self._tables.single(tf.constant(bundle.golden_inputs), tf.constant(slot, tf.int32)).numpy()
        got = got[:, : bundle.num_classes]
        want = bundle.golden_logits
        error = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
        tolerance = GOLDEN_TOLERANCE[self.compute_dtype.name]
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
            indices = [slot.index for slot in held]
            if len(set(indices)) == 1:
                logits = tables.single(tf.constant(images), tf.constant(indices[0], tf.int32))
            else:
                logits = tables.mixed(tf.constant(images), tf.constant(indices, tf.int32))
            logits = logits.numpy()
        finally:
            self._unref(held)
        return [row[: slot.num_classes] for row, slot in zip(logits, held)]

    def warm_up(self, batch_sizes: Sequence[int] = (1, 2)) -> None:
        """Trace and run both paths (and the table copy to host) once so that no request pays a compilation."""
        s = self.input_size
        slot = tf.constant(0, tf.int32)
        self._tables.read(0, 1, self.adapter)
        for n in batch_sizes:
            x = tf.zeros((n, s, s, 3), tf.float32)
            self._tables.single(x, slot)
            self._tables.mixed(x, tf.zeros((n,), tf.int32))
