"""Service settings, read from `RA_*` environment variables (pydantic-settings).

Read by every process.
"""

from __future__ import annotations

import os
import pathlib
from typing import Annotated, Literal

from pydantic import Field, SecretStr, TypeAdapter, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "demo"


class Settings(BaseSettings):
    """Every setting has a safe default: `python -m service` serves the shipped demo with no configuration.

    An empty or unset `RA_ADMIN_TOKEN` disables the management endpoints (they answer 403); it
    never leaves them open.
    """

    model_config = SettingsConfigDict(env_prefix="RA_", env_file=None, extra="ignore")

    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in the container image)")
    port: int = Field(8000, ge=1, le=65535, description="port (the container's health check follows it)")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="the Open Inference Protocol over gRPC on this port (every front end); unset = no gRPC",
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for POST/DELETE /adapters; unset = disabled")
    api_keys_file: pathlib.Path | None = Field(
        None,
        description="JSON keys with domain scopes, admin flags and rate limits; unset = predicting and listing open",
    )
    api_keys_poll_s: float = Field(1.0, gt=0, description="how often the keys file is checked for changes")
    store_dir: pathlib.Path = Field(
        pathlib.Path.home() / ".local/share/residual-adapters/store",
        description="the directory registry of record (used when registry_url is unset)",
    )
    registry_url: SecretStr | None = Field(
        None,
        description="postgresql://user:pass@host:port/db: the registry of record in PostgreSQL instead of store_dir",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="front-end processes on one port, fed by one engine process "
        "(python -m service --workers); 1 serves from one process",
    )
    arena_mb: float = Field(64, gt=0, description="shared memory per front end for images on their way to the engine")
    resync_interval_s: float = Field(30.0, gt=0, description="full resync with the registry of record, as a safety net")
    poll_interval_ms: float = Field(
        20.0, gt=0, le=1000, description="directory registry: how often to look for changes"
    )
    backbone: pathlib.Path = Field(DEMO_DIR / "backbone.safetensors", description="the backbone .safetensors")
    demo_adapters: bool = Field(True, description="seed an empty store with the shipped demo bundles (once)")
    max_batch_size: int | None = Field(
        None, ge=1, le=1024, description="images per device call; unset: 32 on a CPU, 256 on an accelerator"
    )
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long a batch waits to fill")
    max_queue: int | None = Field(
        None, ge=1, description="queued images before requests get 503; unset: 16 batches of max_batch_size"
    )
    domain_queue_share: float = Field(
        0.5, gt=0, le=1, description="fraction of the queue one domain may hold before its requests get 429"
    )
    request_timeout_s: float = Field(30.0, gt=0)
    device_memory_mb: float | None = Field(
        None,
        gt=0,
        description="memory for the resident domains' tables "
        "(default: RA_DEVICE_MEMORY_FRACTION of the memory available at start)",
    )
    device_memory_fraction: float = Field(
        0.5, gt=0, le=0.95, description="the default budget's share of the available memory (host memory on a CPU host)"
    )
    max_resident: int | None = Field(
        None,
        ge=1,
        description="cap on resident domains below what the budget fits "
        "(evicted in `service.engine.eviction`'s segmented-LRU order)",
    )
    host_cache_mb: float | None = Field(
        None,
        ge=0,
        description="host memory for the folded tables of evicted "
        "domains (default: 1024 with a GPU; on a CPU host, one memory with the "
        "device tier, what the budget leaves beyond RA_MAX_RESIDENT)",
    )
    pinned: str = Field("", description="comma-separated domains this process loads at start and never evicts")
    load_concurrency: int = Field(8, ge=1, description="domain loads at a time")
    loader_processes: int = Field(
        2,
        ge=0,
        le=64,
        description="with several workers: processes beside the engine "
        "process that validate and fold bundles (0: threads of the engine process)",
    )
    load_timeout_s: float = Field(10.0, gt=0, description="longest a request waits for its domain to load")
    max_fanout: int = Field(64, ge=1, description="domains one POST /predict may name (or 'all' may mean)")
    backend: Literal["tensorflow", "jax", "torch"] = Field(
        "tensorflow", description="the framework the engine runs on (Keras 3's backends)"
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    simulated_device_img_s: float = Field(
        0,
        ge=0,
        description="benches and tests only: a device that computes nothing at this many images/s "
        "(`model.simulated`), answering zeros; 0: the real engine",
    )
    require_gpu: bool = Field(
        False, description="refuse to start without a GPU instead of running on the CPU (set in the GPU compose files)"
    )
    max_bundle_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        le=178_956_970,
        description="largest image by its header; Pillow refuses over 178,956,970 itself",
    )
    max_files: int = Field(32, ge=1, description="images per predict request")
    preprocess_threads: int = Field(4, ge=1)
    trainers: int = Field(
        1,
        ge=0,
        le=16,
        description="training worker processes beside the service (python -m training worker); 0: none here "
        "(another host's workers, or none, run the jobs)",
    )
    trainer_gpu_memory_mb: int = Field(
        4096,
        ge=256,
        description="on a GPU host: the most GPU memory each training worker takes (its TensorFlow is held to "
        "it); the engine's default residency budget leaves it out",
    )
    trainer_nice: int = Field(
        10, ge=0, le=19, description="how much lower a trainer's CPU priority is than the engine's"
    )
    max_training_upload_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="largest archive POST /training/jobs accepts"
    )
    max_training_images: int = Field(50_000, ge=2, description="images one training upload may hold")
    max_training_classes: int = Field(1_000, ge=2, description="classes one training upload may hold")
    max_queued_jobs: int = Field(4, ge=1, description="queued training jobs per tenant; beyond: 429")
    training_lease_s: float = Field(
        30.0, gt=0, description="a training job's claim lapses after this long without a heartbeat"
    )

    access_log: bool = Field(
        False,
        description="one log line per request (method, path, status, ms, request id, trace id, domain, "
        "tenant, error code); with RA_LOG_FORMAT=json a JSON object",
    )
    metrics_domains: int = Field(
        20,
        ge=0,
        le=1000,
        description="domains with a series of their own in ra_predictions_total (the most used at start, then "
        'the first served); the others are counted as domain="_other"',
    )

    @field_validator("admin_token", "registry_url")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("registry_url")
    @classmethod
    def _postgresql_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("RA_REGISTRY_URL must be a postgresql://user:password@host:port/database URL")
        return value

    @field_validator("pinned")
    @classmethod
    def _pinned_names(cls, value: str) -> str:
        from model.names import DOMAIN_NAME

        bad = [d for d in (x.strip() for x in value.split(",")) if d and not DOMAIN_NAME.fullmatch(d)]
        if bad:
            raise ValueError(f"RA_PINNED names invalid domains: {bad}")
        return value

    @property
    def pinned_domains(self) -> frozenset[str]:
        return frozenset(d.strip() for d in self.pinned.split(",") if d.strip())

    @property
    def jobs_location(self) -> str:
        """Where the training jobs live: beside the registry of record (`training.jobs.open_jobs`)."""
        return self.registry_url.get_secret_value() if self.registry_url is not None else str(self.store_dir)

    @property
    def max_request_bytes(self) -> int:
        """The largest body any endpoint accepts (multipart overhead included)."""
        return max(self.max_bundle_bytes, self.max_image_bytes * self.max_files) + 64 * 1024


def one_setting(name: str):
    """One setting from its `RA_` variable (or its default), validated alone: for the launcher, which
    starts the processes that read them all (a bad value of another one is theirs to refuse)."""
    field = Settings.model_fields[name]
    raw = os.environ.get(f"RA_{name.upper()}")
    if raw is None:
        return field.default
    return TypeAdapter(Annotated[field.annotation, field]).validate_python(raw)
