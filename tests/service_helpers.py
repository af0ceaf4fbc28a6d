"""Shared helpers for the service tests: a tiny backbone, bundles, reference answers, test images.

Imported by tests/test_service_app.py and tests/test_service_http.py (not a conftest, so it stays
out of the way of the other test modules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import struct
import threading
import zlib

import numpy as np
from conftest import make_backbone, make_bundle
from numeric import assert_logits_close
from PIL import Image

from model.backbone import Backbone, save_backbone
from model.bundle import AdapterBundle, bundle_to_bytes, save_bundle
from model.config import ArchConfig
from model.keras_weights import to_keras_model
from model.preprocessing import open_image, preprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ArchConfig(width_factor=0.125, input_size=16, adapter="series")
CLASSES = {"alpha": 2, "beta": 3, "gamma": 5}
ADMIN_TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclasses.dataclass
class Assets:
    """Everything written once per test session under `root`."""

    root: pathlib.Path
    backbone_path: pathlib.Path
    backbone: Backbone
    bundles: dict[str, AdapterBundle]  # alpha (with golden tensors), beta, gamma
    alt: dict[str, AdapterBundle]  # a second version of each domain (same class count, other weights)
    foreign: AdapterBundle  # made for another backbone of the same architecture
    paths: dict[str, pathlib.Path]  # bundle files: the domains, "alt-<domain>" and "foreign"

    def data(self, name: str) -> bytes:
        return self.paths[name].read_bytes()


def golden(backbone: Backbone, bundle: AdapterBundle, n: int = 2, seed: int = 0) -> AdapterBundle:
    inputs = np.random.default_rng(seed).normal(size=(n, TINY.input_size, TINY.input_size, 3)).astype(np.float32)
    logits = np.asarray(to_keras_model(backbone, bundle)(inputs, training=False))
    return bundle.with_golden(inputs, logits)


def calibrated(engine, bundle: AdapterBundle) -> AdapterBundle:
    """Rescale the head so that logits on test images are centred with unit spread.

    Random weights give logits in the thousands with the same winner for every image (a saturated
    softmax); calibrated ones make scores and top-1 differ from image to image, so a mix-up shows.
    """
    x = np.stack([preprocess(open_image(png_bytes(seed)), bundle.preprocessing) for seed in range(16)])
    slot = engine.load(bundle, verify_golden=False)
    logits = np.stack(engine.predict(x, slot)).astype(np.float64)
    engine.release(slot)
    scale = 1.0 / max(float(logits.std(axis=0).mean()), 1e-6)
    weights = dict(bundle.weights)
    weights["classifier.kernel"] = (weights["classifier.kernel"] * scale).astype(np.float32)
    weights["classifier.bias"] = ((weights["classifier.bias"] - logits.mean(axis=0)) * scale).astype(np.float32)
    return dataclasses.replace(bundle, weights=weights)


def build_assets(root: pathlib.Path) -> Assets:
    from model.engine import InferenceEngine

    root.mkdir(parents=True, exist_ok=True)
    backbone = make_backbone(TINY, seed=3)
    backbone_path = root / "backbone.safetensors"
    save_backbone(backbone, backbone_path)
    engine = InferenceEngine(backbone, capacity=2, class_capacity=8)

    def bundle(domain: str, seed: int) -> AdapterBundle:
        return calibrated(engine, make_bundle(backbone, domain, CLASSES[domain], seed))

    bundles = {d: bundle(d, 10 + i) for i, d in enumerate(CLASSES)}
    bundles["alpha"] = golden(backbone, bundles["alpha"])
    alt = {d: bundle(d, 20 + i) for i, d in enumerate(CLASSES)}
    foreign = make_bundle(make_backbone(TINY, seed=99), "foreign", 3, seed=5)
    paths = {}
    for name, bundle in [*bundles.items(), *((f"alt-{d}", b) for d, b in alt.items()), ("foreign", foreign)]:
        paths[name] = root / f"{name}.safetensors"
        save_bundle(bundle, paths[name])
    return Assets(root, backbone_path, backbone, bundles, alt, foreign, paths)


_ASSETS: dict[str, Assets] = {}


def get_assets(tmp_path_factory) -> Assets:
    """Build the assets once per session (both test modules share them)."""
    if "assets" not in _ASSETS:
        _ASSETS["assets"] = build_assets(tmp_path_factory.mktemp("service-assets"))
    return _ASSETS["assets"]


class NamedEngine:
    """A reference engine with its slots by name (in the service, the registry owns this mapping)."""

    def __init__(self, backbone: Backbone, bundles: dict[str, AdapterBundle]):
        from model.engine import InferenceEngine

        self.engine = InferenceEngine(backbone, capacity=len(bundles), class_capacity=8)
        self.slots = {name: self.engine.load(bundle) for name, bundle in bundles.items()}

    def predict(self, images: np.ndarray, domains: str | list[str]) -> list[np.ndarray]:
        return self.engine.predict(
            images, self.slots[domains] if isinstance(domains, str) else [self.slots[d] for d in domains]
        )


def reference_engine(assets: Assets) -> NamedEngine:
    """An in-process engine with every bundle; alternative versions are named 'alt-<domain>'."""
    return NamedEngine(assets.backbone, {**assets.bundles, **{f"alt-{d}": b for d, b in assets.alt.items()}})


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()


def reference_logits(engine, image: bytes, bundle: AdapterBundle, engine_domain: str) -> np.ndarray:
    """What the service computes: decode + preprocess exactly as the service does, then the engine (alone)."""
    x = preprocess(open_image(image), bundle.preprocessing)
    return engine.predict(x[None], engine_domain)[0]


def reference_probs(engine, image: bytes, bundle: AdapterBundle, engine_domain: str) -> np.ndarray:
    """What the service should answer: the softmax of `reference_logits`."""
    return softmax(reference_logits(engine, image, bundle, engine_domain))


def _check_top_k(predictions: list[dict], probs: np.ndarray, labels) -> list[float]:
    """The top-k list's shape: sorted scores that sum to at most 1, the right top-1 index, the right labels."""
    assert predictions, "no predictions"
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) <= 1 + 1e-6
    assert predictions[0]["index"] == int(np.argmax(probs))
    for p in predictions:
        assert p["label"] == labels[p["index"]]
    return scores


def check_scores(predictions: list[dict], logits: np.ndarray, labels) -> None:
    """The service's top-k list against the softmax of the reference `logits` (see `reference_logits`).

    The service batches the image with others, so its logits differ from the reference's (a batch of one)
    by float32 rounding: the scores are compared within `assert_logits_close`'s bound for probabilities,
    relative to the logits' scale."""
    probs = softmax(logits)
    scores = _check_top_k(predictions, probs, labels)
    indices = [p["index"] for p in predictions]
    assert_logits_close(scores, probs[indices], logits=logits, err_msg=f"scores of classes {indices}")


# ----- an app in this process ---------------------------------------------------------------------


def make_settings(assets: Assets, store: pathlib.Path, **changes):
    """Settings of an in-process test app on the tiny assets and a store directory."""
    from service.settings import Settings

    values = {
        "backbone": assets.backbone_path,
        "store_dir": store,
        "demo_adapters": False,
        "admin_token": ADMIN_TOKEN,
        "max_wait_ms": 1,
        "max_batch_size": 4,
        "device_memory_mb": 64,
        "preprocess_threads": 2,
    }
    return Settings(**{**values, **changes})


@contextlib.contextmanager
def running(settings):
    """A TestClient over the app (lifespan included)."""
    from fastapi.testclient import TestClient

    from service.boot import single_process_app

    with TestClient(single_process_app(settings), raise_server_exceptions=False) as client:
        yield client


# ----- images ----------------------------------------------------------------------------------


def noise(seed: int, size: tuple[int, int] = (24, 20), channels: int = 3) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    return encode(Image.fromarray(noise(seed, size)), "PNG")


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    return encode(Image.fromarray(noise(seed, size)), "JPEG", quality=95)


def image_variants() -> dict[str, bytes]:
    """Formats and modes the service must accept."""
    rgb = Image.fromarray(noise(7, (30, 22)))
    frames = [Image.fromarray(noise(8 + i, (18, 18))).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(2)]
    sixteen = Image.fromarray((np.random.default_rng(9).integers(0, 65536, (20, 26))).astype(np.uint16))
    assert sixteen.mode in ("I;16", "I;16L", "I")
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": encode(sixteen, "PNG"),
        "rgba.png": encode(Image.fromarray(noise(10, (20, 20), 4), "RGBA"), "PNG"),
        "anim.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "gray.png": encode(Image.fromarray(noise(11, (20, 20), 1), "L"), "PNG"),
        "gray.jpg": encode(Image.fromarray(noise(12, (20, 20), 1), "L"), "JPEG"),
        "image.bmp": encode(rgb, "BMP"),
        "image.webp": encode(rgb, "WEBP"),
        "wide.png": encode(Image.fromarray(noise(13, (200, 9))), "PNG"),
    }


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height pixels (valid CRC): a decompression bomb for free."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def corrupt_png_header_crc(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[29] ^= 0xFF  # the IHDR CRC
    return bytes(broken)


def corrupt_png_body(data: bytes) -> bytes:
    """Scramble the compressed pixel data of the first IDAT chunk (CRC left as it was)."""
    start = data.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", data[start - 8 : start - 4])
    broken = bytearray(data)
    for i in range(start + 2, start + length):
        broken[i] ^= 0x55
    return bytes(broken)


# ----- bundles that must be refused --------------------------------------------------------------


def bad_bundles(assets: Assets) -> dict[str, bytes]:
    import pickle

    beta = assets.bundles["beta"]
    weights = dict(beta.weights)
    name = sorted(weights)[0]
    nan = {**weights, name: np.full_like(weights[name], np.nan)}
    head = "classifier.kernel"
    wrong = {**weights, head: np.zeros((weights[head].shape[0] + 1, weights[head].shape[1]), np.float32)}
    extra = {**weights, "extra.kernel": np.zeros((2, 2), np.float32)}
    return {
        "random": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "pickle": pickle.dumps({"weights": dict(list(weights.items())[:3]), "domain": "beta"}),
        "empty": b"",
        "foreign": assets.data("foreign"),
        "nan": bundle_to_bytes(dataclasses.replace(beta, weights=nan)),
        "wrong_shape": bundle_to_bytes(dataclasses.replace(beta, weights=wrong)),
        "extra_tensor": bundle_to_bytes(dataclasses.replace(beta, weights=extra)),
        "too_many_labels": bundle_to_bytes(dataclasses.replace(beta, labels=(*beta.labels, "surplus"))),
        "too_few_labels": bundle_to_bytes(dataclasses.replace(beta, labels=beta.labels[:-1])),
        "bad_golden": bundle_to_bytes(
            dataclasses.replace(assets.bundles["alpha"], golden_logits=assets.bundles["alpha"].golden_logits + 5.0)
        ),
        "truncated": assets.data("beta")[:-100],
    }


def bundle_file(data: bytes, name: str = "bundle.safetensors") -> dict:
    return {"bundle": (name, data, "application/octet-stream")}


def live_versions(store: pathlib.Path, domain: str) -> list[int]:
    """The domain's live versions in a directory registry of record."""
    from service.record.directory import DirectoryRecord

    return [v.version for v in DirectoryRecord(store).live_versions(domain)]


def store_snapshot(store: pathlib.Path) -> set[str]:
    """Every path under the store (hidden ones included), but the usage counts that serving updates."""
    if not store.exists():
        return set()
    return {
        str(p.relative_to(store)) for p in store.rglob("*") if not p.name.startswith((".usage.json", "..usage.json"))
    }


def temp_files(store: pathlib.Path) -> list[str]:
    return sorted(
        str(p.relative_to(store)) for p in store.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".trash-")
    )


@contextlib.contextmanager
def stalled_upload(url: str, bundle: bytes, domain: str):
    """POST /adapters whose body stops after its first 8 KiB until the block ends (e.g. while the test
    kills the server). Yields a list that holds the upload's status code or error afterwards."""
    import httpx

    boundary = "ra-test-boundary-7f3a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="domain"\r\n\r\n{domain}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="b.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + bundle + f"\r\n--{boundary}--\r\n".encode()
    first_sent, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def chunks():
        yield body[:8192]
        first_sent.set()
        release.wait(30)
        yield body[8192:]

    def upload():
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                outcome.append(
                    client.post(
                        "/adapters",
                        content=chunks(),
                        headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
                    ).status_code
                )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        assert first_sent.wait(30), "the upload never started"
        yield outcome
    finally:
        release.set()
        uploader.join(60)
