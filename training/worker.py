"""The training worker: runs the jobs queued in a store (a directory, `training.jobs`, or PostgreSQL,
`training.jobs_postgres`), one at a time, in a process of its own, so that training never takes an
inference process's interpreter.

A job adapts the backbone to the job's archive (`training.archive`) with the `adapt` recipe. Its
recipe fields (`epochs`, `batch_size`, `lr`, `val_share`, `preset`) override the defaults. While it
trains, a thread renews the claim every third of the lease. After each epoch the checkpoint goes into
the store, with an event. A worker killed mid-job loses the epoch it was in: the next worker that
claims the job, once the heartbeat has lapsed, resumes from the checkpoint. A trained job leaves its
bundle in the store: it ends `succeeded` there when it asked for the bundle only, else it waits,
`registering`, for the service to validate and register it (`service.engine.registrar`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import threading
import time

from training.archive import ArchiveError, decode, read_archive
from training.data import DataError, Dataset
from training.jobs import Claim, DirectoryJobs, Job
from training.jobs_postgres import PostgresJobs

Store = DirectoryJobs | PostgresJobs

_log = logging.getLogger(__name__)
RECIPE_FIELDS = ("epochs", "batch_size", "lr")
STEP_EVENT_S = 2.0  # at most one step event this often (and each epoch's last step)


def _eta(step: dict, epochs: int | None) -> float | None:
    """Seconds left: this epoch's rest and the epochs after it, at this epoch's pace so far."""
    if not epochs:
        return None
    per_epoch = step["seconds"] * step["steps"] / step["step"]
    return per_epoch * (epochs - step["epoch"]) + per_epoch - step["seconds"]


def _limit_gpu_memory(mb: int) -> None:
    """Hold TensorFlow to `mb` on each GPU, as the engine's budget expects: before it first touches one."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=mb)])
        except RuntimeError:  # initialised already (an earlier job in this process): the limit holds
            pass


class Cancelled(Exception):
    """The job was cancelled while it ran."""


class Lost(Exception):
    """Another worker took the job over (this one's heartbeat lapsed)."""


class Heartbeat(threading.Thread):
    """Renews a claim until stopped; `held` turns False once the claim is lost."""

    def __init__(self, store: Store, claim: Claim):
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.claim, self.held = store, claim, True
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.store.lease_s / 3):
            if not self.store.heartbeat(self.claim):
                self.held = False
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Worker:
    """Claims jobs from `store` and trains them on `backbone`, in `scratch` (a temporary folder per job)."""

    def __init__(self, store: Store, backbone: pathlib.Path, name: str | None = None, gpu_memory_mb: int | None = None):
        self.store, self.backbone = store, pathlib.Path(backbone)
        self.name = name or f"{os.uname().nodename}-{os.getpid()}"
        self.gpu_memory_mb = gpu_memory_mb  # the most GPU memory this worker's TensorFlow takes (None: no limit)

    def run(self, poll_s: float = 1.0, once: bool = False) -> None:
        """Run jobs until stopped (`once`: until none is queued)."""
        while True:
            job = self.run_one()
            if job is None:
                if once:
                    return
                time.sleep(poll_s)

    def run_one(self) -> Job | None:
        """Claim and run one job; the job as it ended, or None when there was none (or it was lost)."""
        claim = self.store.claim(self.name)
        if claim is None:
            return None
        beat = Heartbeat(self.store, claim)
        beat.start()
        try:
            accuracy, bundle = self._train(claim, beat)
            self.store.save_bundle(claim, bundle)
            if self.store.get(claim.job_id).register:  # the service validates and registers it
                return self.store.trained(claim, accuracy=accuracy)
            return self.store.finish(claim, "succeeded", accuracy=accuracy)
        except Cancelled:
            return self.store.finish(claim, "cancelled", reason="cancelled by request")
        except Lost:
            _log.warning("job %s was taken over by another worker; this one stops", claim.job_id)
            return None
        except (ArchiveError, DataError) as exc:
            return self.store.finish(claim, "failed", reason=str(exc))
        except Exception as exc:
            _log.exception("job %s failed", claim.job_id)
            return self.store.finish(claim, "failed", reason=f"The training failed: {type(exc).__name__}: {exc}")
        finally:
            beat.stop()

    def _train(self, claim: Claim, beat: Heartbeat) -> tuple[float, bytes]:
        from training.commands import TrainSpec, run_training  # the framework, once there is a job
        from training.trainer import CHECKPOINT_DIR

        if self.gpu_memory_mb is not None:
            _limit_gpu_memory(self.gpu_memory_mb)

        job = self.store.get(claim.job_id)
        members = read_archive(self.store.upload(claim))
        with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as scratch:
            out = pathlib.Path(scratch)
            checkpoint = out / f"{job.domain}_run" / CHECKPOINT_DIR / "last.safetensors"
            resumed = self.store.checkpoint(claim)
            if resumed is not None:
                checkpoint.parent.mkdir(parents=True)
                checkpoint.write_bytes(resumed[1])
                self.store.event(claim, {"type": "resumed", "after_epoch": resumed[0], "worker": self.name})
            spec = TrainSpec(
                "adapt",
                data=f"the upload of {job.id}",
                domain=job.domain,
                out=out,
                val_split=float(job.recipe.get("val_share", 0.1)),
                backbone=self.backbone,
                preset=job.recipe.get("preset", "natural"),
                overrides={k: job.recipe[k] for k in RECIPE_FIELDS if k in job.recipe},
                resume=resumed is not None,
                progress=False,
            )

            def datasets(side: int) -> tuple[Dataset, Dataset]:
                train = decode(members, side)
                if "val" in members.splits:
                    return train, decode(members, side, split="val")
                return train.split(spec.val_split, spec.seed)

            epochs = int(job.recipe.get("epochs") or 0) or None  # None: the preset's
            last_step = [0.0]

            def on_step(record: dict) -> None:
                now = time.monotonic()
                if now - last_step[0] >= STEP_EVENT_S or record["step"] == record["steps"]:
                    last_step[0] = now
                    self.store.event(claim, {"type": "step", **record, "eta_s": _eta(record, epochs)})

            def on_epoch(record: dict) -> None:
                if not beat.held:
                    raise Lost()
                self.store.save_checkpoint(claim, record["epoch"], checkpoint.read_bytes())
                self.store.update(claim, epochs_done=record["epoch"])
                left = (epochs - record["epoch"]) * record["seconds"] if epochs else None
                self.store.event(claim, {"type": "epoch", **record, "eta_s": left})
                if self.store.cancelled(claim):
                    raise Cancelled()

            metrics = run_training(spec, datasets=datasets, on_epoch=on_epoch, on_step=on_step)
            return metrics["val_top1"], pathlib.Path(metrics["bundle"]).read_bytes()
