"""The simulated device (`RA_SIMULATED_DEVICE_IMG_S`): what `bench.dispatch` measures the engine against."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from model.simulated import SimulatedDevice


@pytest.fixture
def device(assets):
    engine = SimulatedDevice(assets.backbone, capacity=4, class_capacity=8, img_s=1_000)
    slots = {d: engine.load(b, verify_golden=False) for d, b in assets.bundles.items()}
    return engine, slots


def test_a_call_holds_the_device_for_batch_over_rate_and_answers_zeros(assets, device):
    engine, slots = device
    size = assets.backbone.config.input_size
    images = np.ones((20, size, size, 3), np.float32)
    start = time.perf_counter()
    logits = engine.predict(images, [slots["alpha"]] * 10 + [slots["beta"]] * 10)
    assert time.perf_counter() - start >= 0.02
    assert engine.busy_s == pytest.approx(0.02)  # compute time, not the sleep's wall time
    assert [len(row) for row in logits] == [slots["alpha"].num_classes] * 10 + [slots["beta"].num_classes] * 10
    assert not np.any(np.concatenate(logits))


def test_the_device_does_not_hold_the_interpreter_lock(assets, device):
    """Another thread runs Python while a call computes, as it would beside a GPU kernel."""
    engine, slots = device
    size = assets.backbone.config.input_size
    counted, computing = [0], threading.Event()

    def count() -> None:
        computing.wait()
        while computing.is_set():
            counted[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    computing.set()
    engine.predict(np.zeros((100, size, size, 3), np.float32), slots["alpha"])  # 0.1 s
    computing.clear()
    counter.join()
    assert counted[0] > 10_000


def test_a_rate_must_be_positive(assets):
    with pytest.raises(ValueError, match="img_s must be > 0"):
        SimulatedDevice(assets.backbone, capacity=1, img_s=0)
