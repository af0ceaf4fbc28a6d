"""A device that computes nothing at a rate you set: to measure what feeds a device without one.

`SimulatedDevice` is an `InferenceEngine` in everything but the arithmetic: domains load into its
table and lease its slots as on a real device, but a call holds the "device" for `len(images) / img_s`
seconds, asleep (so without the interpreter lock, as a GPU kernel runs beside Python), and answers
zero logits. For benches and tests only (`RA_SIMULATED_DEVICE_IMG_S`): its answers mean nothing.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from model.engine import InferenceEngine

if TYPE_CHECKING:
    from model.engine import _Tables

PR_SET_TIMERSLACK = 29
TIMER_SLACK_NS = 1_000  # Linux lets a sleeping thread oversleep by 50 µs by default: most of a small batch


def _tight_sleeps() -> None:
    """Ask Linux to wake this thread within 1 µs of its sleep's end (per thread; best effort)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class SimulatedDevice(InferenceEngine):
    """An engine whose device takes `1 / img_s` seconds an image and answers zeros."""

    def __init__(self, *args, img_s: float, **kwargs):
        if not img_s > 0:
            raise ValueError(f"img_s must be > 0. Received: {img_s}")
        super().__init__(*args, **kwargs)
        self.img_s = img_s
        self._busy_s = 0.0
        self._tight = threading.local()

    @property
    def busy_s(self) -> float:
        """The device's compute time over every call, as a GPU's counters would have it: `batch / img_s`
        each, not the sleep's wall time, which also holds the oversleep and the wait for the interpreter
        lock after it (time in which a real device would have idled)."""
        return self._busy_s

    def _compute(self, tables: _Tables, images: np.ndarray, indices: list[int]) -> np.ndarray:
        if not getattr(self._tight, "set", False):
            _tight_sleeps()
            self._tight.set = True
        held = len(images) / self.img_s
        time.sleep(held)
        self._busy_s += held
        return np.zeros((len(images), tables.class_capacity), np.float32)

    def _verify_golden(self, bundle, slot) -> None:
        """Nothing to verify: the simulated device answers zeros, which no golden self-test would pass."""

    def warm_up(self, batch_sizes=(1, 2)) -> None:
        """Nothing to compile; the table's copy to host is warmed as on a device."""
        self._tables.read(np.array([0]))
