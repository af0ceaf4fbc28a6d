"""The engine on each of Keras 3's backends. Keras runs one backend per process, so each other backend
runs the `every_backend` tests of tests/test_engine.py in a process of its own (the PyTorch reference's
logits, the table's writes while calls run, no retracing, and the same logits as the TensorFlow engine
within 1e-5), and serves the demo over HTTP end to end."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from service_helpers import png_bytes
from service_process import ServiceProcess
from test_engine import parity_logits

ROOT = pathlib.Path(__file__).resolve().parents[1]
OTHERS = ("jax", "torch")


def need(backend: str) -> None:
    """CI installs every backend (the dev extras): a missing one there is a failure, not a skip."""
    if importlib.util.find_spec(backend) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{backend} is not installed; `pip install -e .[dev]` installs it")
        pytest.skip(f"{backend} is not installed")


@pytest.mark.parametrize("backend", OTHERS)
def test_the_engine_tests_pass_and_equal_tensorflow_on(backend, tmp_path):
    need(backend)
    reference = tmp_path / "tensorflow.npz"
    np.savez(reference, **parity_logits())
    env = {**os.environ, "KERAS_BACKEND": backend, "RA_TF_ENGINE_LOGITS": str(reference), "CUDA_VISIBLE_DEVICES": ""}
    # XLA's CPU optimisation passes off: JAX compiles these small programs in half the time, and their logits must
    # still equal TensorFlow's; the service test below runs JAX with its default flags.
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "-m",
            "every_backend",
            "tests/test_engine.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "skipped" not in summary, run.stdout[-3000:]  # the parity test ran


@pytest.fixture(scope="module")
def tensorflow_answer(tmp_path_factory):
    return serve_and_predict("tensorflow", tmp_path_factory.mktemp("tensorflow"))


def serve_and_predict(backend: str, tmp: pathlib.Path) -> dict:
    server = ServiceProcess({"RA_BACKEND": backend, "RA_STORE_DIR": str(tmp / "store")}, tmp / "server.log")
    server.start()
    try:
        server.wait_ready(240)
        with server.client() as client:
            ready = client.get("/readyz").json()
            answer = client.post(
                "/predict/fashion", params={"top_k": 10}, files={"file": ("noise.png", png_bytes(3, (28, 28)))}
            ).json()
            metadata = client.get("/v2/models/fashion").json()
    finally:
        server.stop()
    return {"ready": ready, "answer": answer, "metadata": metadata}


@pytest.mark.parametrize("backend", OTHERS)
def test_the_service_serves_the_demo_on(backend, tensorflow_answer, tmp_path):
    need(backend)
    got = serve_and_predict(backend, tmp_path)
    assert got["ready"]["device"]["backend"].split()[0] == {"jax": "JAX", "torch": "PyTorch"}[backend]
    assert got["metadata"]["platform"] == f"residual_adapters_{backend}"
    want = tensorflow_answer["answer"]
    assert [p["label"] for p in got["answer"]["predictions"]] == [p["label"] for p in want["predictions"]]
    np.testing.assert_allclose(
        [p["score"] for p in got["answer"]["predictions"]], [p["score"] for p in want["predictions"]], atol=1e-5
    )
