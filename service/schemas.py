"""Request and response bodies (pydantic v2): what the OpenAPI docs at /docs show."""

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
    predictions: list[Prediction] = Field(description="top-k of the first image")
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
    num_classes: int
    val_top1: float | None
    params: int = Field(description="parameters this domain owns (BatchNorms, adapters, head)")
    served: int = Field(description="images classified since the service started")


class AdapterInfo(AdapterSummary):
    labels: list[str]
    adapter: str
    metrics: dict
    preprocessing: Preprocessing
    backbone_fingerprint: str
    registered_at: float
    size_bytes: int
    load_ms: float
    golden_self_test: bool = Field(description="the bundle carried golden logits and they matched on load")


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]
    backbone_fingerprint: str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    adapters: int
    backbone_fingerprint: str | None


class Error(BaseModel):
    error: str = Field(description="machine-readable code")
    detail: str | list = Field(description="what went wrong and how to fix it")
