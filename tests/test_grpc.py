"""The Open Inference Protocol over gRPC, driven by Triton's own `tritonclient.grpc` against a real
`python -m service --workers 2` (two front ends on one gRPC port) with a keys file: every call answers
as the REST protocol does for the same key, and every refusal has its status code, REST's message,
and changes nothing."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest
from numeric import assert_logits_close
from service_helpers import png_bytes
from service_process import ServiceProcess, free_port

from service.frontend.access import hash_key
from service.settings import DEMO_DIR

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ADMIN, CATS, SLOW = "admin-secret", "cats-secret", "slow-secret"
KEYS = {
    "keys": [
        {"name": "ops", "key_sha256": hash_key(ADMIN), "domains": ["*"], "admin": True},
        {"name": "cats", "key_sha256": hash_key(CATS), "domains": ["catsdogs"]},
        {"name": "slow", "key_sha256": hash_key(SLOW), "domains": ["*"], "rate_per_s": 0.2, "burst": 1},
    ]
}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc")
    (tmp / "keys.json").write_text(json.dumps(KEYS))
    env = {
        "RA_STORE_DIR": str(tmp / "store"),
        "RA_API_KEYS_FILE": str(tmp / "keys.json"),
        "RA_MAX_FILES": "4",
        "RA_GRPC_PORT": str(free_port()),
        "RA_MAX_WAIT_MS": "1",
        "RA_PREPROCESS_THREADS": "1",
    }
    srv = ServiceProcess(env, tmp / "service.log", workers=2).start().wait_ready(180)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def clients(server):
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    h = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield g, h
    g.close()
    h.close()


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def images_input(module, images: list[bytes]):
    tensor = module.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def pixels_input(module, pixels: np.ndarray):
    tensor = module.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def test_health_and_metadata_answer_as_over_rest(clients):
    g, h = clients
    assert g.is_server_live() and g.is_server_ready()
    server = g.get_server_metadata(as_json=True)
    assert server == {k: v for k, v in h.get_server_metadata().items() if k in server}
    assert set(server["extensions"]) >= {"classification", "model_repository", "statistics"}
    meta = g.get_model_metadata("digits", headers=auth(ADMIN), as_json=True)
    rest = h.get_model_metadata("digits", headers=auth(ADMIN))
    assert (
        meta["name"] == rest["name"] and meta["versions"] == rest["versions"] and meta["platform"] == rest["platform"]
    )
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[side]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[side]
        ]
    assert g.is_model_ready("catsdogs", headers=auth(CATS))


def test_infer_answers_equal_rest_for_images_pixels_and_classification(clients):
    g, h = clients
    images = [png_bytes(1, (40, 30)), png_bytes(2, (28, 28))]
    outputs_g = [
        grpcclient.InferRequestedOutput("LOGITS"),
        grpcclient.InferRequestedOutput("PROBABILITIES", class_count=2),
    ]
    outputs_h = [
        httpclient.InferRequestedOutput("LOGITS", binary_data=True),
        httpclient.InferRequestedOutput("PROBABILITIES", binary_data=True, class_count=2),
    ]
    over_grpc = g.infer(
        "catsdogs", [images_input(grpcclient, images)], outputs=outputs_g, headers=auth(CATS), request_id="r1"
    )
    over_rest = h.infer("catsdogs", [images_input(httpclient, images)], outputs=outputs_h, headers=auth(CATS))
    logits = over_grpc.as_numpy("LOGITS")
    assert logits.shape == (2, 2) and logits.dtype == np.float32
    assert_logits_close(logits, over_rest.as_numpy("LOGITS"))
    assert over_grpc.as_numpy("PROBABILITIES").tolist() == over_rest.as_numpy("PROBABILITIES").tolist()
    response = over_grpc.get_response(as_json=True)
    assert response["id"] == "r1" and response["model_name"] == "catsdogs" and response["model_version"] == "1"
    size = int(g.get_model_metadata("digits", headers=auth(ADMIN), as_json=True)["inputs"][1]["shape"][1])
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    out = [grpcclient.InferRequestedOutput("PROBABILITIES")]
    by_grpc = g.infer("digits", [pixels_input(grpcclient, pixels)], outputs=out, headers=auth(ADMIN))
    by_rest = h.infer(
        "digits",
        [pixels_input(httpclient, pixels)],
        headers=auth(ADMIN),
        outputs=[httpclient.InferRequestedOutput("PROBABILITIES", binary_data=True)],
    )
    np.testing.assert_allclose(by_grpc.as_numpy("PROBABILITIES"), by_rest.as_numpy("PROBABILITIES"), atol=1e-6)
    np.testing.assert_allclose(by_grpc.as_numpy("PROBABILITIES").sum(axis=1), 1.0, atol=1e-5)
    stats = g.get_inference_statistics("catsdogs", headers=auth(CATS), as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 4 and int(stats["execution_count"]) >= 2  # both protocols counted


def index(g) -> list[dict]:
    return g.get_model_repository_index(headers=auth(ADMIN), as_json=True)["models"]


def test_the_repository_loads_a_bundle_unloads_and_loads_again(clients):
    g, h = clients
    bundle = (DEMO_DIR / "fashion.safetensors").read_bytes()
    g.load_model("shoes", headers=auth(ADMIN), files={"file:shoes.safetensors": bundle})
    assert {"name": "shoes", "version": "1", "state": "READY"} in index(g)
    assert h.is_model_ready("shoes", headers=auth(ADMIN))  # the other protocol (and front end) serves it
    g.unload_model("shoes", headers=auth(ADMIN))
    assert not g.is_model_ready("shoes", headers=auth(ADMIN))
    assert next(m for m in index(g) if m["name"] == "shoes")["state"] == "UNAVAILABLE"
    g.load_model("shoes", headers=auth(ADMIN))
    assert g.is_model_ready("shoes", headers=auth(ADMIN))


def test_every_refusal_has_its_status_code_and_changes_nothing(server, clients):
    g, h = clients
    before = index(g)
    image = [images_input(grpcclient, [png_bytes(3)])]
    cases = [
        (lambda: g.get_model_metadata("catsdogs"), "StatusCode.UNAUTHENTICATED", "unauthorized"),
        (lambda: g.infer("catsdogs", image, headers=auth("wrong")), "StatusCode.UNAUTHENTICATED", "not known"),
        (lambda: g.infer("nowhere", image, headers=auth(ADMIN)), "StatusCode.NOT_FOUND", "unknown_domain"),
        (lambda: g.get_model_repository_index(headers=auth(CATS)), "StatusCode.PERMISSION_DENIED", "forbidden"),
        (
            lambda: g.load_model("evil", headers=auth(CATS), files={"file:e.safetensors": b"x"}),
            "StatusCode.PERMISSION_DENIED",
            "forbidden",
        ),
        (
            lambda: g.load_model("broken", headers=auth(ADMIN), files={"file:b.safetensors": b"not a bundle"}),
            "StatusCode.INVALID_ARGUMENT",
            "invalid_bundle",
        ),
        (
            lambda: g.infer("catsdogs", [images_input(grpcclient, [png_bytes(4)] * 5)], headers=auth(CATS)),
            "StatusCode.INVALID_ARGUMENT",
            "too_many_files",
        ),
        (
            lambda: g.infer("catsdogs", [images_input(grpcclient, [b"not an image"])], headers=auth(CATS)),
            "StatusCode.INVALID_ARGUMENT",
            "not_image",
        ),
        (
            lambda: g.infer(
                "catsdogs", [pixels_input(grpcclient, np.zeros((1, 3, 3, 3), np.uint8))], headers=auth(CATS)
            ),
            "StatusCode.INVALID_ARGUMENT",
            "PIXELS must be UINT8 with shape",
        ),
    ]
    for call, status, words in cases:
        error = refusal(call)
        assert error.status() == status and words in error.message(), (status, error)
    # a key outside its scope sees another domain exactly as a domain that does not exist
    hidden = refusal(lambda: g.get_model_metadata("digits", headers=auth(CATS)))
    missing = refusal(lambda: g.get_model_metadata("no-such-domain", headers=auth(CATS)))
    assert hidden.status() == missing.status() == "StatusCode.NOT_FOUND"
    assert hidden.message().replace("digits", "X") == missing.message().replace("no-such-domain", "X")
    rest = refusal(lambda: h.get_model_metadata("digits", headers=auth(CATS)))
    assert rest.message() == hidden.message()  # REST's message, word for word
    assert index(g) == before
    metrics = httpx.get(server.url + "/metrics", headers=auth(ADMIN), timeout=10).text  # counted by code
    for code in ("too_many_files", "not_image"):  # only gRPC calls of this module make these
        assert re.search(rf'^ra_errors_total\{{code="{code}"\}} [1-9]', metrics, re.M), code


def test_a_key_over_its_rate_is_told_when_to_retry(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = grpcclient.service_pb2.ModelReadyRequest(name="catsdogs")
    metadata = (("authorization", f"Bearer {SLOW}"),)
    try:
        stub.ModelReady(request, metadata=metadata)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelReady(request, metadata=metadata)
    finally:
        channel.close()
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("rate_limited: ")
    assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
