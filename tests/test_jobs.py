"""Training jobs in the store directory (`training.jobs`): stored whole, claimed once, taken over when a
worker stops beating, and cleaned up when they end."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from training import jobs as jobs_module
from training.jobs import DirectoryJobs, Job, JobNotFound, new_id


def job(tenant: str = "shop", domain: str = "shoes") -> Job:
    return Job(new_id(), tenant, domain, {"epochs": 3}, "", 0, ["a", "b"], 10)


def test_a_submitted_job_is_queued_with_its_upload_and_listed_for_its_tenant_only(tmp_path):
    store = DirectoryJobs(tmp_path)
    first = store.submit(job(), b"archive bytes")
    store.submit(job(tenant="other"), b"x")
    assert store.get(first.id).state == "queued" and store.get(first.id).upload_bytes == 13
    assert [j.id for j in store.page("shop", None, 10)] == [first.id]
    assert store.queued("shop") == 1
    with pytest.raises(JobNotFound):
        store.get("job-0-nothere")
    with pytest.raises(JobNotFound):
        store.get("../../etc")


def test_a_submit_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    store = DirectoryJobs(tmp_path)
    real = jobs_module.atomic_write_bytes

    def failing(path, data):
        if path.name == "job.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(jobs_module, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        store.submit(job(), b"archive")
    assert list(store.root.iterdir()) == []


def test_one_worker_holds_a_job_until_its_heartbeat_lapses_then_another_resumes_it(tmp_path):
    store = DirectoryJobs(tmp_path, lease_s=0.3)
    queued = store.submit(job(), b"archive")
    a = store.claim("worker-a")
    assert a is not None and store.get(queued.id).state == "running"
    assert store.upload(a) == b"archive"
    store.save_checkpoint(a, 1, b"epoch one")
    assert store.heartbeat(a)
    assert store.claim("worker-b") is None  # a beats: nothing to take
    time.sleep(0.4)  # a stopped beating (killed)
    b = store.claim("worker-b")
    assert b is not None and b.job_id == queued.id
    assert store.checkpoint(b) == (1, b"epoch one")
    assert store.get(queued.id).attempts == 2 and store.get(queued.id).worker == "worker-b"
    assert not store.heartbeat(a)  # a learns it lost the job


def test_a_job_that_ends_keeps_its_record_and_events_and_loses_its_upload_and_checkpoint(tmp_path):
    store = DirectoryJobs(tmp_path)
    queued = store.submit(job(), b"archive")
    claim = store.claim("w")
    store.event(claim, {"epoch": 1, "loss": 0.5})
    store.save_checkpoint(claim, 1, b"ckpt")
    done = store.finish(claim, "succeeded", accuracy=0.9, version=2)
    assert (done.state, done.accuracy, done.version) == ("succeeded", 0.9, 2)
    assert sorted(p.name for p in (store.root / queued.id).iterdir()) == ["events.jsonl", "job.json"]
    assert [e["loss"] for e in store.events(queued.id)] == [0.5]
    assert store.claim("w") is None


def test_cancel_ends_a_queued_job_at_once_and_asks_a_running_one_to_stop(tmp_path):
    store = DirectoryJobs(tmp_path)
    queued = store.submit(job(), b"a")
    assert store.cancel(queued.id).state == "cancelled"
    assert not (store.root / queued.id / "upload.bin").exists()
    running = store.submit(job(), b"b")
    claim = store.claim("w")
    assert store.cancel(running.id).state == "running" and store.cancelled(claim)


def _claim_all(root, worker, out):
    store = DirectoryJobs(root)
    got = []
    while (claim := store.claim(worker)) is not None:
        got.append(claim.job_id)
    out.put(got)


def test_workers_claiming_at_once_take_each_job_exactly_once(tmp_path):
    store = DirectoryJobs(tmp_path)
    ids = {store.submit(job(), b"x").id for _ in range(30)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(tmp_path, f"w{i}", out)) for i in range(3)]
    for w in workers:
        w.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    flat = [i for got in claimed for i in got]
    assert sorted(flat) == sorted(ids)  # every job once, none twice


def test_an_upload_that_no_longer_matches_its_checksum_is_refused(tmp_path):
    store = DirectoryJobs(tmp_path)
    queued = store.submit(job(), b"archive")
    (store.root / queued.id / "upload.bin").write_bytes(b"tampered")
    claim = store.claim("w")
    with pytest.raises(OSError, match="checksum"):
        store.upload(claim)
