"""The inference engine: exact against the unfolded Keras model, mixed batches, no retracing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import make_backbone, make_bundle
from model.bundle import to_keras_model
from model.config import ArchConfig
from model.engine import InferenceEngine, UnknownDomainError
from model.safetensors_io import InvalidFileError

CLASSES = {"a": 3, "b": 7, "c": 12}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def keras_logits(backbone, bundle, x: np.ndarray) -> np.ndarray:
    return np.asarray(to_keras_model(backbone, bundle)(x, training=False))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module", params=["series", "parallel", "none"])
def setup(request):
    config = ArchConfig(width_factor=0.25, input_size=32, adapter=request.param)
    backbone = make_backbone(config, seed=1)
    bundles = {d: make_bundle(backbone, d, k, seed=10 + i) for i, (d, k) in enumerate(CLASSES.items())}
    engine = InferenceEngine(backbone, capacity=2, class_capacity=4)  # both grow while adding
    for bundle in bundles.values():
        engine.add(bundle)
    return backbone, bundles, engine


def test_mixed_batch_equals_keras_model(setup):
    backbone, bundles, engine = setup
    x = images(7, 32)
    domains = ["a", "b", "c", "c", "a", "b", "a"]
    got = engine.predict(x, domains)
    for i, domain in enumerate(domains):
        want = keras_logits(backbone, bundles[domain], x[i : i + 1])[0]
        assert got[i].shape == (CLASSES[domain],)
        assert relative_error(got[i], want) < 1e-4


def test_single_domain_batch_equals_keras_model(setup):
    backbone, bundles, engine = setup
    x = images(5, 32, seed=1)
    for domain, bundle in bundles.items():
        got = np.stack(engine.predict(x, domain))
        assert relative_error(got, keras_logits(backbone, bundle, x)) < 1e-4


def test_single_and_mixed_paths_agree(setup):
    _, _, engine = setup
    x = images(4, 32, seed=2)
    single = np.stack(engine.predict(x, "b"))
    mixed = engine.predict(np.concatenate([x, x[:1]]), ["b"] * 4 + ["a"])
    assert relative_error(np.stack(mixed[:4]), single) < 1e-5


@pytest.fixture()
def tiny():
    config = ArchConfig(width_factor=0.125, input_size=16, adapter="series")
    backbone = make_backbone(config, seed=3)
    return backbone, lambda domain, seed, k=4: make_bundle(backbone, domain, k, seed)


def test_registration_never_retraces(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=8, class_capacity=6)
    engine.add(bundle("a", 1))
    engine.warm_up()
    x = images(3, 16)
    engine.predict(x, ["a", "a", "a"])
    before = engine.tracing_count()
    engine.add(bundle("b", 2, k=6))
    engine.add(bundle("a", 3))  # replace
    engine.remove("b")
    engine.add(bundle("c", 4, k=2))
    engine.predict(x, ["a", "c", "a"])
    engine.predict(x[:2], "c")
    engine.predict(images(5, 16), ["a", "c", "a", "c", "c"])  # another batch size
    assert engine.tracing_count() == before


def test_growth_past_capacity_retraces_once(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2, class_capacity=4)
    for i in range(2):
        engine.add(bundle(f"d{i}", i))
    engine.warm_up()
    before = engine.tracing_count()
    engine.add(bundle("d2", 2))  # no free slot: doubles
    assert engine.capacity == 4
    engine.warm_up()
    assert engine.tracing_count() == before + 2  # one trace for each of the two paths
    x = images(3, 16)
    want = {d: engine.predict(x, d) for d in ("d0", "d1", "d2")}  # old rows copied over
    got = engine.predict(x, ["d0", "d1", "d2"])
    for i, d in enumerate(("d0", "d1", "d2")):
        assert relative_error(got[i], want[d][i]) < 1e-5


def test_removed_slots_are_reused(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2)
    for i in range(10):
        engine.add(bundle(f"d{i}", i))
        engine.remove(f"d{i}")
        engine.add(bundle("keep", 100 + i))  # replacing retires the old slot
    assert engine.capacity == 2
    assert engine.domains == ["keep"]


def test_unknown_domain_and_bad_shapes(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone)
    engine.add(bundle("a", 1))
    with pytest.raises(UnknownDomainError, match="'nope'"):
        engine.predict(images(1, 16), "nope")
    engine.remove("a")
    with pytest.raises(UnknownDomainError):
        engine.predict(images(1, 16), "a")
    with pytest.raises(UnknownDomainError):
        engine.remove("a")
    engine.add(bundle("a", 1))
    with pytest.raises(ValueError, match="shape"):
        engine.predict(np.zeros((1, 15, 16, 3), np.float32), "a")
    with pytest.raises(ValueError, match="one domain per image"):
        engine.predict(images(2, 16), ["a"])
    assert engine.predict(np.zeros((0, 16, 16, 3), np.float32), []) == []


def test_other_backbone_is_refused(tiny):
    backbone, bundle = tiny
    other = make_backbone(backbone.config, seed=99)
    engine = InferenceEngine(other)
    with pytest.raises(InvalidFileError) as info:
        engine.add(bundle("a", 1))
    assert info.value.code == "fingerprint"


def test_golden_self_test(tiny):
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=1)
    good = bundle("a", 1)
    x = images(2, 16)
    good = good.with_golden(x, keras_logits(backbone, good, x))
    engine.add(good)
    before = np.stack(engine.predict(x, "a"))
    bad = bundle("a", 2).with_golden(x, good.golden_logits + 1.0)
    with pytest.raises(InvalidFileError) as info:
        engine.add(bad)
    assert info.value.code == "golden"
    np.testing.assert_array_equal(np.stack(engine.predict(x, "a")), before)  # the old version still serves
    assert engine.capacity == 2  # the failed slot went back to the free list, no leak
    engine.add(bundle("b", 3))
    assert engine.capacity == 2


def test_replace_does_not_affect_a_running_batch(tiny):
    """A call that resolved the old version finishes on it, even if slots are recycled meanwhile."""
    backbone, bundle = tiny
    engine = InferenceEngine(backbone, capacity=2)
    old, new = bundle("a", 1), bundle("a", 2)
    engine.add(old)
    x = images(2, 16)
    want_old = np.stack(engine.predict(x, "a"))
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
    worker = threading.Thread(target=lambda: result.setdefault("logits", engine.predict(x, "a")))
    worker.start()
    assert started.wait(10)
    engine.add(new)  # replace while the old version is in use
    engine.add(bundle("b", 3))
    engine.remove("b")
    engine.add(bundle("c", 4))  # would reuse the old slot if it were freed too early
    tables.single = original
    release.set()
    worker.join(10)
    np.testing.assert_array_equal(np.stack(result["logits"]), want_old)
    assert relative_error(np.stack(engine.predict(x, "a")), keras_logits(backbone, new, x)) < 1e-4
