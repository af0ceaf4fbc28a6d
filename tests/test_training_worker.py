"""The training worker (`training.worker`, `python -m training worker`): a job in the store becomes a bundle;
a worker killed with `kill -9` mid-job loses at most the epoch it was in, and the next one resumes."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from model.backbone import load_backbone
from model.bundle import load_bundle
from training.archive import read_archive
from training.jobs import DirectoryJobs, Job, new_id
from training.worker import Worker

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKBONE = REPO / "service" / "demo" / "backbone.safetensors"


def digits_zip(per_class: int = 20) -> bytes:
    """Two digits of scikit-learn's set as PNGs, one folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for label in (0, 1):
            for i, image in enumerate(digits.images[digits.target == label][:per_class]):
                png = io.BytesIO()
                Image.fromarray((image * 16).astype(np.uint8)).resize((32, 32)).save(png, "PNG")
                archive.writestr(f"digits/{label}/{i}.png", png.getvalue())
    return out.getvalue()


def submit(store: DirectoryJobs, epochs: int, register: bool = False) -> Job:
    upload = digits_zip()
    members = read_archive(upload)
    recipe = {"epochs": epochs, "batch_size": 8, "lr": 0.05, "preset": "digits", "val_share": 0.25}
    job = Job(
        new_id(), "lab", "zeros-ones", recipe, "", 0, list(members.classes), len(members.images), register=register
    )
    return store.submit(job, upload)


def test_a_job_becomes_a_bundle_with_its_accuracy_and_leaves_no_upload(tmp_path):
    store = DirectoryJobs(tmp_path)
    queued = submit(store, epochs=2)
    done = Worker(store, BACKBONE, "w").run_one()
    assert done.state == "succeeded", done.reason
    assert 0.0 <= done.accuracy <= 1.0 and done.epochs_done == 2
    bundle = load_bundle(store.bundle(queued.id), load_backbone(BACKBONE))
    assert bundle.domain == "zeros-ones" and bundle.labels == ("0", "1") and bundle.golden_inputs is not None
    assert [e["epoch"] for e in store.events(queued.id) if e["type"] == "epoch"] == [1, 2]
    left = sorted(p.name for p in (store.root / queued.id).iterdir())
    assert left == ["bundle.safetensors", "events.jsonl", "job.json"]


def test_a_job_to_register_waits_for_the_service_once_trained(tmp_path, monkeypatch):
    store = DirectoryJobs(tmp_path)
    queued = submit(store, epochs=1, register=True)
    monkeypatch.setattr(Worker, "_train", lambda self, claim, beat: (0.9, b"the bundle"))  # trained above
    done = Worker(store, BACKBONE, "w").run_one()
    assert done.state == "registering" and done.accuracy is not None and done.finished_at is None
    assert store.claim("again") is None  # nothing left to train
    claim = store.claim("service", stage="register")
    assert claim.job_id == queued.id and store.claim("other", stage="register") is None
    assert store.finish(claim, "succeeded", version=3).version == 3
    left = sorted(p.name for p in (store.root / queued.id).iterdir())
    assert left == ["bundle.safetensors", "job.json"]  # no events: the training was stood in for


def test_a_bad_upload_fails_the_job_with_a_reason(tmp_path):
    store = DirectoryJobs(tmp_path)
    job = Job(new_id(), "lab", "x", {}, "", 0, [], 0)
    store.submit(job, b"not an archive")
    done = Worker(store, BACKBONE, "w").run_one()
    assert done.state == "failed" and "neither a zip nor a tar" in done.reason


EPOCHS = 5  # killed after its second checkpoint, with epochs still to go


@pytest.mark.slow
def test_a_worker_killed_mid_job_loses_at_most_the_epoch_it_was_in(tmp_path):
    store = DirectoryJobs(tmp_path, lease_s=2.0)
    queued = submit(store, epochs=EPOCHS)
    command = ["worker", "--store", str(tmp_path), "--backbone", str(BACKBONE), "--lease-s", "2", "--once"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "training", *command],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while store.get(queued.id).checkpoint_epoch < 2:
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not checkpoint"
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
    killed_at = store.get(queued.id)
    assert killed_at.state == "running" and killed_at.epochs_done < EPOCHS
    assert Worker(store, BACKBONE, "second").run_one() is None  # the claim has not lapsed yet
    time.sleep(2.5)
    done = Worker(store, BACKBONE, "second").run_one()
    assert done.state == "succeeded" and done.attempts == 2 and done.worker == "second"
    events = store.events(queued.id)
    (resumed,) = [e for e in events if e["type"] == "resumed"]
    after = events[events.index(resumed) + 1 :]
    assert after[0]["epoch"] == resumed["after_epoch"] + 1  # nothing before the checkpoint is trained again
    assert resumed["after_epoch"] >= killed_at.checkpoint_epoch
    assert [e["epoch"] for e in after if e["type"] == "epoch"][-1] == EPOCHS
    assert not (store.root / queued.id / "upload.bin").exists()
