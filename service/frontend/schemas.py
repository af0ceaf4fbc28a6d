"""Request and response bodies (pydantic v2): what the OpenAPI docs at /docs show.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    index: int = Field(description="class index in the bundle's label list")
    score: float = Field(description="softmax probability")


class ImageResult(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class Timing(BaseModel):
    total_ms: float
    preprocess_ms: float
    inference_ms: float = Field(description="queueing + batched engine time")


class PredictResponse(BaseModel):
    domain: str
    version: int = Field(description="adapter version that computed the result")
    predictions: list[Prediction] | None = Field(
        description="top-k of the image when one was sent; null with several (see `results`)"
    )
    results: list[ImageResult] = Field(description="top-k of every image, in upload order")
    timing: Timing


class DomainResult(BaseModel):
    domain: str
    version: int
    predictions: list[Prediction]


class FanoutResponse(BaseModel):
    filename: str | None
    results: list[DomainResult]
    timing: Timing


class Preprocessing(BaseModel):
    mean: list[float]
    std: list[float]
    resize: int
    crop: int
    grayscale: bool


class AdapterSummary(BaseModel):
    domain: str
    version: int
    tier: str = Field(
        description="where this process holds it: device (engine slot), host (folded tables in "
        "memory) or registry (not loaded here; details appear once it is)"
    )
    pinned: bool = Field(False, description="loaded at start and never evicted")
    num_classes: int | None = None
    val_top1: float | None = None
    params: int | None = Field(None, description="parameters this domain owns (BatchNorms, adapters, head)")
    served: int = Field(0, description="images classified since it was loaded here")


class DeletedAdapter(BaseModel):
    domain: str
    version: int = Field(description="the version that was current; every version is dropped from the record")
    deleted: bool = Field(True, description="no longer served by any replica once they follow the record")


class AdapterInfo(AdapterSummary):
    labels: list[str]
    adapter: str
    metrics: dict
    preprocessing: Preprocessing
    backbone_fingerprint: str
    registered_at: float = Field(description="when this version was recorded (Unix time)")
    size_bytes: int
    sha256: str = Field(description="sha256 of the bundle file")
    load_ms: float
    record_version: int = Field(
        description="the current version in the registry of record; `version` is the one "
        "this process serves (they differ while it catches up, or when the "
        "record's current version failed validation here)"
    )
    golden_self_test: bool = Field(description="the bundle carried golden logits and they matched on load")


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")
    backbone_fingerprint: str


class Health(BaseModel):
    status: str


class RegistrySync(BaseModel):
    record: str = Field(description="where the registry of record lives")
    connected: bool = Field(description="the record answered the last call")
    synced: bool = Field(description="a full sync with the record has completed since start")
    lag_s: float | None = Field(
        description="seconds since this process was last in contact with the record (0 while connected; null if never)"
    )
    last_sync_at: float | None = Field(description="when the record last answered (Unix time)")
    domains_behind: list[str] = Field(description="domains served at another version than the record's (first 20)")
    errors: int
    last_error: str | None
    warming: bool = Field(description="the most used domains are still being loaded in the background")


class Device(BaseModel):
    backend: str = Field(description="the framework the engine runs on, with its version")
    devices: list[str] = Field(description="what the engine computes on, e.g. ['GPU:0 NVIDIA H200'] or ['CPU']")
    gpu: bool
    compute_dtype: str
    free_bytes: int | None = Field(
        None, description="the GPU's free memory at start, where the framework tells (JAX, PyTorch)"
    )


class Residency(BaseModel):
    budget_mb: float = Field(description="memory for the resident domains' tables")
    budget_source: str = Field(description="RA_DEVICE_MEMORY_MB, or how the default was found")
    bytes_per_domain: int = Field(description="one resident domain's table row")
    fits: int = Field(description="domains the budget holds (under RA_MAX_RESIDENT, when set)")
    resident: int = Field(description="domains resident now")
    host_cache_mb: float = Field(description="the host tier (none by default on a CPU host: one memory)")


class Ready(BaseModel):
    ready: bool
    pid: int = Field(description="the process that answered (one of `workers` front ends on the port)")
    workers: int
    engine_pid: int | None = Field(
        description="the engine process (the same as `pid` with one worker); null while it is not answering"
    )
    adapters: int = Field(description="domains cached by this process (device and host tiers)")
    backbone_fingerprint: str | None
    device: Device | None = Field(description="null until the engine has started")
    registry: RegistrySync | None
    residency: Residency | None = Field(None, description="null until the engine has started")


class Error(BaseModel):
    error: str = Field(description="machine-readable code")
    detail: str | list = Field(description="what went wrong and how to fix it")


# ----- Open Inference Protocol (service.frontend.oip) ------------------------------------------------------


class OipError(BaseModel):
    error: str = Field(description="what went wrong and how to fix it")


class OipServer(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipTensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipModel(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMeta]
    outputs: list[OipTensorMeta]


class OipTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None
    parameters: dict | None = None


class OipInferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OipTensor]


class TrainingRecipe(BaseModel):
    epochs: int
    batch_size: int
    lr: float = Field(description="peak learning rate (SGD, momentum 0.9, divided by 10 at 2/3 and 5/6 of the epochs)")
    val_share: float = Field(description="share of the images held out for validation (unless the archive has val/)")
    preset: str = Field(description="augmentation: natural (flip and crop) or digits (neither)")


class TrainingLinks(BaseModel):
    self: str
    events: str
    cancel: str
    bundle: str = Field(description="the trained bundle, once the job has succeeded")
    domain: str = Field(description="the served domain, once registered")


class TrainingJob(BaseModel):
    id: str
    state: str = Field(description="queued, running, registering, succeeded, failed or cancelled")
    domain: str
    tenant: str = Field(description="the key that submitted it")
    serve: bool = Field(description="register the bundle as a new version of the domain on success")
    recipe: TrainingRecipe
    classes: list[str]
    images: int
    upload_bytes: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    epochs_done: int
    attempts: int = Field(description="workers that claimed it: more than one means it was resumed")
    accuracy: float | None = Field(description="validation top-1 of the bundle it made")
    version: int | None = Field(description="the version it registered")
    reason: str | None = Field(description="why it failed or was cancelled")
    links: TrainingLinks


class TrainingJobList(BaseModel):
    jobs: list[TrainingJob]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")
