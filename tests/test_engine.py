"""The inference engine: exact against the unfolded Keras model, mixed batches, no retracing.

Every test runs on TensorFlow; the ones marked `every_backend` also run on JAX and PyTorch
(tests/test_backends.py): what a backend implements (the table, its writes while calls run, the compiled
calls and when they retrace) and exactness (the reference fixture, and the TensorFlow engine's logits on a
workload that grows the table, mixes domains and reloads a read-back row). The rest is the engine's own
bookkeeping, the same code on every backend."""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from conftest import make_backbone, make_bundle
from numeric import assert_logits_close

from model.config import ArchConfig
from model.engine import InferenceEngine, ReleasedSlotError
from model.keras_weights import to_keras_model
from model.safetensors_io import InvalidFileError

CLASSES = {"a": 3, "b": 7, "c": 12}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def keras_logits(backbone, bundle, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(to_keras_model(backbone, bundle)(x, training=False))


@pytest.fixture(scope="module", params=["series", "parallel", "none"])
def setup(request):
    config = ArchConfig(width_factor=0.25, input_size=32, adapter=request.param)
    backbone = make_backbone(config, seed=1)
    bundles = {d: make_bundle(backbone, d, k, seed=10 + i) for i, (d, k) in enumerate(CLASSES.items())}
    engine = InferenceEngine(backbone, capacity=2, class_capacity=4)  # both grow while loading
    slots = {d: engine.load(bundle) for d, bundle in bundles.items()}
    return backbone, bundles, engine, slots


def test_mixed_batch_equals_keras_model(setup):
    backbone, bundles, engine, slots = setup
    x = images(7, 32)
    domains = ["a", "b", "c", "c", "a", "b", "a"]
    got = engine.predict(x, [slots[d] for d in domains])
    for i, domain in enumerate(domains):
        want = keras_logits(backbone, bundles[domain], x[i : i + 1])[0]
        assert got[i].shape == (CLASSES[domain],)
        assert_logits_close(got[i], want, err_msg=f"{domain} in a mixed batch vs Keras")


def test_single_domain_batch_equals_keras_model(setup):
    backbone, bundles, engine, slots = setup
    x = images(5, 32, seed=1)
    for domain, bundle in bundles.items():
        got = np.stack(engine.predict(x, slots[domain]))
        assert_logits_close(got, keras_logits(backbone, bundle, x), err_msg=f"{domain}: engine vs Keras")


def test_single_and_mixed_paths_agree(setup):
    _, _, engine, slots = setup
    x = images(4, 32, seed=2)
    single = np.stack(engine.predict(x, slots["b"]))
    mixed = engine.predict(np.concatenate([x, x[:1]]), [slots["b"]] * 4 + [slots["a"]])
    # the folded single-domain path and the mixed path sum in different orders: float32 rounding of the scale
    assert_logits_close(np.stack(mixed[:4]), single, err_msg="mixed vs single-domain path")


@pytest.fixture()
def tiny():
    config = ArchConfig(width_factor=0.125, input_size=16, adapter="series")
    backbone = make_backbone(config, seed=3)
    return backbone, lambda domain, seed, k=4: make_bundle(backbone, domain, k, seed)


@pytest.mark.every_backend
def test_loading_never_retraces(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=8, class_capacity=6)
    a = engine.load(bundle("a", 1))
    engine.warm_up((1, 2, 3, 5))  # the batch sizes used below (JAX compiles one program per size bucket)
    x = images(3, 16)
    engine.predict(x, [a, a, a])
    before = engine.tracing_count()
    b = engine.load(bundle("b", 2, k=6))
    a2 = engine.load(bundle("a", 3))
    engine.release(a)
    engine.release(b)
    c = engine.load(bundle("c", 4, k=2))
    engine.predict(x, [a2, c, a2])
    engine.predict(x[:2], c)
    engine.predict(images(5, 16), [a2, c, a2, c, c])  # another batch size
    assert engine.tracing_count() == before


def test_cycling_many_domains_through_few_slots_never_retraces(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=4)
    engine.warm_up()
    before = engine.tracing_count()
    x = images(2, 16)
    held = []
    for i in range(12):
        held.append(engine.load(bundle(f"d{i}", i)))
        engine.predict(x, held[-1])
        if len(held) == 4:
            engine.release(held.pop(0))
    assert engine.capacity == 4 and engine.loaded == 3
    assert engine.tracing_count() == before


@pytest.mark.every_backend
def test_growth_past_capacity_retraces_once(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2, class_capacity=4)
    slots = [engine.load(bundle(f"d{i}", i)) for i in range(2)]
    engine.warm_up()
    before = engine.tracing_count()
    slots.append(engine.load(bundle("d2", 2)))  # no free slot: doubles
    assert engine.capacity == 4
    engine.warm_up((1, 2, 3))
    grown = engine.tracing_count()
    # TensorFlow: one trace for each of the two paths; JAX: one per path and batch-size bucket; PyTorch: none
    assert grown == before + {"tensorflow": 2, "jax": 6, "torch": 0}[engine.backend.NAME]
    x = images(3, 16)
    want = [engine.predict(x, slot) for slot in slots]  # old rows copied over
    got = engine.predict(x, slots)
    engine.load(bundle("d3", 3))  # into the grown table: no retrace
    assert engine.tracing_count() == grown
    for i in range(3):
        assert_logits_close(got[i], want[i][i], err_msg=f"slot {i}: mixed batch vs its own batch")


def test_released_slots_are_reused(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2)
    keep = engine.load(bundle("keep", 99))
    for i in range(10):
        engine.release(engine.load(bundle(f"d{i}", i)))
        new = engine.load(bundle("keep", 100 + i))
        engine.release(keep)
        keep = new
    assert engine.capacity == 2
    assert engine.loaded == 1


def test_released_slot_and_bad_shapes(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone)
    a = engine.load(bundle("a", 1))
    engine.release(a)
    engine.release(a)  # twice is harmless
    with pytest.raises(ReleasedSlotError, match="released"):
        engine.predict(images(1, 16), a)
    b = engine.load(bundle("b", 1))  # reuses a's rows: a's handle stays dead
    assert b.index == a.index
    with pytest.raises(ReleasedSlotError):
        engine.predict(images(2, 16), [b, a])
    with pytest.raises(ValueError, match="shape"):
        engine.predict(np.zeros((1, 15, 16, 3), np.float32), b)
    with pytest.raises(ValueError, match="one slot per image"):
        engine.predict(images(2, 16), [b])
    assert engine.predict(np.zeros((0, 16, 16, 3), np.float32), []) == []


def test_other_backbone_is_refused(tiny):
    backbone, bundle = tiny
    other = make_backbone(backbone.config, seed=99)
    engine = InferenceEngine(other)
    with pytest.raises(InvalidFileError) as info:
        engine.load(bundle("a", 1))
    assert info.value.code == "fingerprint"
    assert engine.loaded == 0


def test_golden_self_test(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=1)
    good = bundle("a", 1)
    x = images(2, 16)
    good = good.with_golden(x, keras_logits(backbone, good, x))
    a = engine.load(good)
    before = np.stack(engine.predict(x, a))
    bad = bundle("a", 2).with_golden(x, good.golden_logits + 1.0)
    with pytest.raises(InvalidFileError) as info:
        engine.load(bad)
    assert info.value.code == "golden"
    np.testing.assert_array_equal(np.stack(engine.predict(x, a)), before)  # the old version still serves
    assert engine.capacity == 2 and engine.loaded == 1  # the failed slot went back to the free list, no leak
    engine.load(bundle("b", 3))
    assert engine.capacity == 2


@pytest.mark.every_backend
def test_release_does_not_affect_a_running_batch(tiny):
    """A call that holds a slot finishes on its rows, even if slots are recycled meanwhile."""
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2)
    old, new = bundle("a", 1), bundle("a", 2)
    a = engine.load(old)
    x = images(2, 16)
    want_old = np.stack(engine.predict(x, a))
    tables = engine._tables
    started, release = threading.Event(), threading.Event()
    original = tables.single

    class SlowSingle:  # the compiled function, made to wait inside the call
        def __call__(self, *args):
            started.set()
            release.wait(10)
            return original(*args)

        def __getattr__(self, name):
            return getattr(original, name)

    tables.single = SlowSingle()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("logits", engine.predict(x, a)))
    worker.start()
    assert started.wait(10)
    a2 = engine.load(new)  # a new version while the old one is in use
    engine.release(a)
    engine.release(engine.load(bundle("b", 3)))
    engine.load(bundle("c", 4))  # would reuse the old slot if it were freed too early
    tables.single = original
    release.set()
    worker.join(10)
    np.testing.assert_array_equal(np.stack(result["logits"]), want_old)
    assert_logits_close(np.stack(engine.predict(x, a2)), keras_logits(backbone, new, x), err_msg="new version")


def test_read_back_then_load_row_serves_the_same_logits(setup):
    _, _, engine, slots = setup
    x = images(3, 32, seed=4)
    want = np.stack(engine.predict(x, slots["b"]))
    copy = engine.read_back(slots["b"])
    again = engine.load_row(copy)
    assert again.index != slots["b"].index and again.num_classes == CLASSES["b"]
    # the same path, batch shape and folded numbers, only another slot: the same sums in the same order (bit-equal
    # here), so much tighter than the cross-batch 1e-4; a lossy read-back (bf16/fp16: 1e-3 or more) fails it
    assert_logits_close(np.stack(engine.predict(x, again)), want, rtol_scale=1e-6, err_msg="read back and reloaded")
    engine.release(again)


# ----- the same engine on every backend (tests/test_backends.py runs this file under each) -----------------


@pytest.mark.every_backend
@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_engine_reproduces_the_reference_fixture(adapter):
    """The PyTorch reference's logits, from the engine's single and mixed paths (the fixture's README)."""
    from conftest import FIXTURES

    from model.backbone import Backbone
    from model.bundle import AdapterBundle
    from model.reference import load_npz_state_dict, reference_to_canonical

    path = FIXTURES / f"reference_resnet26_{adapter}_adapters.npz"
    if not path.exists():
        pytest.skip(f"reference fixture {path} is missing")
    config, weights = reference_to_canonical(load_npz_state_dict(path), adapter)
    backbone = Backbone.from_weights(config, weights)
    bundle = AdapterBundle.from_weights("ref", config, weights, labels=[f"c{i}" for i in range(7)], backbone=backbone)
    with np.load(path) as data:
        x, want = data["input_nchw"].transpose(0, 2, 3, 1), data["logits"]
    engine = InferenceEngine(backbone, capacity=2)
    first, second = engine.load(bundle), engine.load(bundle)
    assert_logits_close(np.stack(engine.predict(x, first)), want, err_msg=f"{adapter}: single path vs PyTorch")
    mixed = engine.predict(x, [first, second, first, second])
    assert_logits_close(np.stack(mixed), want, err_msg=f"{adapter}: mixed path vs PyTorch")


def parity_logits() -> dict[str, np.ndarray]:
    """One fixed workload's logits: mixed and single paths, after the table grew (slots and head
    width), and after an eviction and reload, for both adapter modes. The TensorFlow engine's are the
    reference that every other backend must equal (`test_logits_equal_the_tensorflow_engine`)."""
    out = {}
    for adapter in ("series", "parallel"):
        backbone = make_backbone(ArchConfig(width_factor=0.25, input_size=32, adapter=adapter), seed=7)
        bundles = {d: make_bundle(backbone, d, k, seed=20 + i) for i, (d, k) in enumerate(CLASSES.items())}
        engine = InferenceEngine(backbone, capacity=2, class_capacity=4)
        slots = {d: engine.load(b) for d, b in bundles.items()}  # grows: 2 -> 4 slots, 4 -> 12 classes
        x = images(6, 32, seed=5)
        domains = ["a", "b", "c", "c", "a", "b"]
        out[f"{adapter}/mixed"] = np.concatenate(engine.predict(x, [slots[d] for d in domains]))
        out[f"{adapter}/single"] = np.stack(engine.predict(x, slots["c"]))
        row = engine.read_back(slots["a"])
        engine.release(slots["a"])
        engine.load(bundles["b"])  # takes a's old slot
        again = engine.load_row(row)
        out[f"{adapter}/reloaded"] = np.stack(engine.predict(x, again))
    return out


@pytest.mark.every_backend
def test_logits_equal_the_tensorflow_engine():
    import os

    path = os.environ.get("RA_TF_ENGINE_LOGITS")
    if path is None:
        pytest.skip("the TensorFlow run is the reference: tests/test_backends.py compares each other backend with it")
    with np.load(path) as reference:
        want = {key: reference[key] for key in reference.files}
    got = parity_logits()
    assert got.keys() == want.keys()
    for key in want:
        assert_logits_close(got[key], want[key], rtol_scale=1e-5, err_msg=f"{key}: vs the TensorFlow engine")
