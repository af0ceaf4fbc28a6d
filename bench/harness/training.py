"""A training job for a bench to run beside its load: an archive of scikit-learn's digits, submitted to
the service's own training worker (RA_TRAINERS), waited for until it trains, cancelled after."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
from PIL import Image

from bench.harness.servers import TOKEN
from training.jobs import ENDED

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def digits_archive(per_class: int = 60) -> bytes:
    """Ten classes of digits as 32x32 PNGs, one folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for label in range(10):
            for i, image in enumerate(digits.images[digits.target == label][:per_class]):
                png = io.BytesIO()
                Image.fromarray((image * 16).astype(np.uint8)).resize((32, 32)).save(png, "PNG")
                archive.writestr(f"digits/{label}/{i}.png", png.getvalue())
    return out.getvalue()


def start_training(url: str, timeout: float = 180.0) -> str:
    """Submit a job long enough to outlast a bench round; return its id once its first step has run (the
    worker has imported the framework and computes)."""
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        job = client.post(
            "/training/jobs",
            files={"archive": ("digits.zip", digits_archive())},
            data={"domain": "bench-training", "epochs": "200", "batch_size": "32", "preset": "digits"},
        )
        job.raise_for_status()
        job_id = job.json()["id"]
        deadline = time.monotonic() + timeout
        with client.stream("GET", f"/training/jobs/{job_id}/events", timeout=timeout) as events:
            for line in events.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("type") == "step":
                    return job_id
                if time.monotonic() > deadline:
                    break
    raise TimeoutError(f"the training job {job_id} did not start within {timeout}s")


def stop_training(url: str, job_id: str, timeout: float = 180.0) -> None:
    """Cancel the job and wait until it has ended (a running job stops at its next epoch), so that the
    rounds after it run without it."""
    import httpx

    httpx.post(f"{url}/training/jobs/{job_id}/cancel", headers=AUTH, timeout=30).raise_for_status()
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/training/jobs/{job_id}", headers=AUTH, timeout=30).json()["state"] not in ENDED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the training job {job_id} did not stop within {timeout}s")
        time.sleep(0.5)
