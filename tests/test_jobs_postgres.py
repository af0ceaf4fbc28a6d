"""Training jobs in PostgreSQL (`training.jobs_postgres`), on a throwaway cluster: the directory store's
behaviour, and two worker processes, one killed with `kill -9` mid-job, that train each epoch once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from training.jobs import Job, JobNotFound, new_id
from training.jobs_postgres import PostgresJobs


@pytest.fixture
def url(cluster):
    import psycopg

    database = f"jobs_{new_id().replace('-', '_')}"
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    return cluster.url.rsplit("/", 1)[0] + f"/{database}"


def job(tenant: str = "shop") -> Job:
    return Job(new_id(), tenant, "shoes", {"epochs": 1}, "", 0, ["a", "b"], 10)


def test_submit_list_and_cancel(url):
    store = PostgresJobs(url)
    first = store.submit(job(), b"archive")
    other = store.submit(job(tenant="other"), b"x")
    assert store.get(first.id).state == "queued" and store.queued("shop") == 1
    assert [j.id for j in store.page("shop", None, 10)] == [first.id]
    with pytest.raises(JobNotFound):
        store.get("job-0-nothere")
    assert store.cancel(first.id).state == "cancelled" and store.queued("shop") == 0
    claim = store.claim("w")  # the oldest queued job of any tenant; never the cancelled one
    assert claim.job_id == other.id and store.get(other.id).state == "running"
    assert store.cancel(other.id).state == "running" and store.cancelled(claim)
    assert store.claim("w2") is None


def test_a_lapsed_claim_is_taken_over_and_the_old_worker_writes_nothing_more(url):
    store = PostgresJobs(url, lease_s=0.3)
    queued = store.submit(job(), b"archive")
    a = store.claim("a")
    assert store.upload(a) == b"archive"
    store.save_checkpoint(a, 1, b"epoch one")
    assert store.claim("b") is None
    time.sleep(0.4)
    b = store.claim("b")
    assert b.job_id == queued.id and store.checkpoint(b) == (1, b"epoch one")
    assert not store.heartbeat(a)
    store.update(a, epochs_done=99)  # the old worker, unaware: ignored
    assert store.get(queued.id).epochs_done == 0 and store.get(queued.id).attempts == 2
    store.event(b, {"type": "epoch", "epoch": 2})
    store.save_bundle(b, b"bundle")
    done = store.finish(b, "succeeded", accuracy=0.8)
    assert (done.state, done.accuracy) == ("succeeded", 0.8)
    assert store.bundle(queued.id) == b"bundle" and [e["epoch"] for e in store.events(queued.id)] == [2]
    assert store.checkpoint(b) is None and store.claim("c") is None
    assert [j.id for j in store.ended_between(done.finished_at, time.time() + 1)] == [queued.id]
    assert store.ended_between(0, done.finished_at) == [] and store.counts()["succeeded"] == 1


@pytest.mark.slow
def test_two_workers_one_killed_mid_job_run_each_job_once_and_resume_from_the_checkpoint(url):
    """Two `python -m training worker` processes on one PostgreSQL record; one is killed with `kill -9`
    after a checkpoint. The other takes that job over once its lease lapses and resumes after the
    checkpoint; every epoch of every job is trained once, but the one the killed worker was in."""
    from test_training_worker import BACKBONE, REPO, submit

    epochs = 3
    store = PostgresJobs(url, lease_s=2.0)
    ids = [submit(store, epochs=epochs).id for _ in range(2)]
    command = ["-m", "training", "worker", "--store", url, "--backbone", str(BACKBONE), "--lease-s", "2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = {
        worker.pid: worker
        for worker in (
            subprocess.Popen(
                [sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(2)
        )
    }
    try:
        deadline = time.monotonic() + 180
        while not (checkpointed := [store.get(i) for i in ids if store.get(i).checkpoint_epoch >= 1]):
            assert time.monotonic() < deadline, "no worker checkpointed an epoch"
            time.sleep(0.02)
        victim = checkpointed[0]
        pid = int(victim.worker.rsplit("-", 1)[1])
        workers[pid].send_signal(signal.SIGKILL)
        workers.pop(pid).wait(10)
        killed_at = store.get(victim.id)
        assert killed_at.state == "running" and killed_at.epochs_done < epochs
        (survivor,) = workers.values()
        while any(store.get(i).state != "succeeded" for i in ids):
            assert survivor.poll() is None and time.monotonic() < deadline, [store.get(i) for i in ids]
            time.sleep(0.1)
    finally:
        for worker in workers.values():
            worker.kill()
    for job_id in ids:
        done = store.get(job_id)
        trained = [e["epoch"] for e in store.events(job_id) if e["type"] == "epoch"]
        if job_id != victim.id:
            assert done.attempts == 1 and trained == list(range(1, epochs + 1)), (done, trained)
            continue
        assert done.attempts == 2 and done.worker == f"{victim.worker.rsplit('-', 1)[0]}-{survivor.pid}"
        events = store.events(job_id)
        (resumed,) = [e for e in events if e["type"] == "resumed"]
        assert resumed["after_epoch"] >= killed_at.checkpoint_epoch
        after = [e["epoch"] for e in events[events.index(resumed) + 1 :] if e["type"] == "epoch"]
        assert after == list(range(resumed["after_epoch"] + 1, epochs + 1))  # nothing before it again
    import psycopg

    with psycopg.connect(url) as conn:  # ended jobs keep no upload or checkpoint
        left = conn.execute("SELECT count(*) FROM ra_training_jobs WHERE upload IS NOT NULL OR checkpoint IS NOT NULL")
        assert left.fetchone()[0] == 0


def test_a_trained_job_waits_for_one_registrar_and_can_still_be_cancelled(url):
    store = PostgresJobs(url, lease_s=0.3)
    first, second = store.submit(job(), b"a"), store.submit(job(), b"b")
    for expected in (first, second):
        claim = store.claim("w")
        assert claim.job_id == expected.id
        store.save_bundle(claim, b"bundle")
        assert store.trained(claim, accuracy=0.9).state == "registering"
    assert store.claim("w") is None and store.counts()["registering"] == 2
    registrar = store.claim("engine", stage="register")
    assert registrar.job_id == first.id
    assert store.claim("engine-2", stage="register").job_id == second.id  # skips the held one
    assert store.cancel(second.id).state == "registering"  # held: asked, not forced
    assert store.finish(registrar, "succeeded", version=1).version == 1
    time.sleep(0.4)  # engine-2 stopped beating: its job is claimed again
    assert store.claim("engine-3", stage="register").job_id == second.id
