"""The Open Inference Protocol, driven by a client nobody here wrote: Triton's `tritonclient[http]`
against a real `python -m service` process. Answers must equal /predict's for the same image;
every refusal is a clear 4xx that changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from numeric import assert_logits_close
from service_helpers import ADMIN_TOKEN, AUTH, bundle_file, png_bytes, softmax
from service_process import ServiceProcess

from model.preprocessing import center_crop, open_image, square, to_rgb
from service.settings import Settings

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    store = tmp_path_factory.mktemp("oip-store")
    env = {
        "RA_STORE_DIR": str(store),
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_DEMO_ADAPTERS": "false",
        "RA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RA_MAX_WAIT_MS": "1",
        "RA_PREPROCESS_THREADS": "1",
        "RA_MAX_FILES": "4",
    }
    srv = ServiceProcess(env, store.parent / "oip.log").start().wait_ready()
    with srv.client() as client:
        for domain in ("alpha", "beta"):
            assert client.post("/adapters", headers=AUTH, files=bundle_file(assets.data(domain))).status_code == 201
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def image_input(images: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return tensor


def pixels_of(image: bytes, bundle) -> np.ndarray:
    """What a client sends as PIXELS: the image resized and cropped as the domain's preprocessing says."""
    prep = bundle.preprocessing
    return center_crop(square(to_rgb(open_image(image), prep.grayscale), prep.resize), prep.crop)


def rest_probs(server, domain: str, image: bytes) -> np.ndarray:
    with server.client() as client:
        body = client.post(f"/predict/{domain}", files={"file": ("x.png", image)}, data={"top_k": "1000"}).json()
    probs = np.zeros(len(body["predictions"]))
    for p in body["predictions"]:
        probs[p["index"]] = p["score"]
    return probs


def test_server_and_model_metadata(triton, assets):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_repository", "statistics"} <= set(meta["extensions"])
    model = triton.get_model_metadata("beta")
    s = assets.backbone.config.input_size
    assert model["name"] == "beta" and model["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]} == {
        "IMAGE": ("BYTES", [-1]),
        "PIXELS": ("UINT8", [-1, s, s, 3]),
    }
    assert {o["name"]: o["shape"] for o in model["outputs"]} == {"LOGITS": [-1, 3], "PROBABILITIES": [-1, 3]}
    assert triton.is_model_ready("beta") and triton.is_model_ready("beta", "1")
    assert not triton.is_model_ready("beta", "7") and not triton.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="unknown_domain"):
        triton.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="version 1"):
        triton.get_model_metadata("beta", "7")


def test_image_and_pixels_answer_like_predict(server, triton, assets):
    images = [png_bytes(900 + i) for i in range(3)]
    bundle = assets.bundles["beta"]
    result = triton.infer("beta", [image_input(images)])
    probs, logits = result.as_numpy("PROBABILITIES"), result.as_numpy("LOGITS")
    assert probs.shape == logits.shape == (3, 3) and probs.dtype == np.float32
    for i, image in enumerate(images):
        # /predict ran the image in a batch of its own, here it was one of 3: float32 rounding of the logits' scale
        assert_logits_close(rest_probs(server, "beta", image), probs[i], logits=logits[i], err_msg=f"image {i}")
        # the same logits, only the float32 rounding of each probability (2**-24 of it): 1e-6 relative
        np.testing.assert_allclose(probs[i], softmax(logits[i]), rtol=1e-6, atol=0)
    assert result.get_response()["model_version"] == "1"

    pixels = np.stack([pixels_of(image, bundle) for image in images])
    for binary in (True, False):
        tensor = httpclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        out = [httpclient.InferRequestedOutput("LOGITS", binary_data=binary)]
        got = triton.infer("beta", [tensor], outputs=out, model_version="1").as_numpy("LOGITS")
        assert_logits_close(got, logits, err_msg=f"PIXELS, binary={binary}")


def test_classification_extension(triton, assets):
    image = png_bytes(950)
    out = [httpclient.InferRequestedOutput("PROBABILITIES", binary_data=False, class_count=2)]
    result = triton.infer("beta", [image_input([image])], outputs=out)
    top = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("PROBABILITIES").reshape(-1)]
    full = triton.infer("beta", [image_input([image])])
    probs, logits = full.as_numpy("PROBABILITIES")[0], full.as_numpy("LOGITS")[0]
    order = np.argsort(-probs)[:2]
    assert [t.split(":", 2)[1:] for t in top] == [[str(i), assets.bundles["beta"].labels[i]] for i in order]
    # the score is printed with 6 decimals ("%f"): 5e-7 of rounding on top of the logits' float32 rounding
    assert_logits_close(float(top[0].split(":")[0]), probs[order[0]], logits=logits, atol_floor=5e-7)


def test_refusals_are_clear_and_change_nothing(server, triton, assets):
    s = assets.backbone.config.input_size
    cases = {
        "unknown_domain": lambda: triton.infer("nope", [image_input([png_bytes(1)])]),
        "PIXELS must be UINT8": lambda: triton.infer("beta", [_pixels(np.zeros((1, s, s, 3), np.float32), "FP32")]),
        "backbone's input size": lambda: triton.infer("beta", [_pixels(np.zeros((1, s + 8, s, 3), np.uint8))]),
        "too_many_files": lambda: triton.infer("beta", [image_input([png_bytes(i) for i in range(5)])]),
        "not_image": lambda: triton.infer("beta", [image_input([b"not an image at all"])]),
        "Unknown input": lambda: triton.infer("beta", [_named("COLOURS", np.zeros((1, s, s, 3), np.uint8))]),
        "unauthorized": lambda: triton.unload_model("beta"),
        "unauthorized ": lambda: triton.get_model_repository_index(headers={"Authorization": "Bearer wrong"}),
    }
    for expected, call in cases.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert expected.strip() in str(info.value), (expected, str(info.value))
        assert str(info.value.status()).startswith("4"), (expected, info.value.status())
    assert triton.is_model_ready("beta")
    with server.client() as client:
        big = client.post("/v2/models/beta/infer", content=b"x" * (Settings(max_files=4).max_request_bytes + 1))
        assert big.status_code == 413 and set(big.json()) == {"error"}
        listing = {a["domain"]: a["version"] for a in client.get("/adapters").json()["adapters"]}
    assert listing == {"alpha": 1, "beta": 1}


def _named(name: str, array: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def _pixels(array: np.ndarray, datatype: str = "UINT8") -> httpclient.InferInput:
    tensor = httpclient.InferInput("PIXELS", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def test_repository_and_statistics(server, triton, assets):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    index = {m["name"]: m for m in triton.get_model_repository_index(headers=admin)}
    assert {n: m["state"] for n, m in index.items()} == {"alpha": "READY", "beta": "READY"}

    triton.load_model("gamma", headers=admin, config="{}", files={"file:gamma.safetensors": assets.data("gamma")})
    assert triton.get_model_metadata("gamma")["outputs"][0]["shape"] == [-1, 5]
    assert triton.infer("gamma", [image_input([png_bytes(3)])]).as_numpy("LOGITS").shape == (1, 5)

    triton.unload_model("gamma", headers=admin)
    assert not triton.is_model_ready("gamma")
    with pytest.raises(InferenceServerException, match="unloaded"):
        triton.infer("gamma", [image_input([png_bytes(3)])])
    states = {m["name"]: m["state"] for m in triton.get_model_repository_index(headers=admin)}
    assert states["gamma"] == "UNAVAILABLE"
    triton.load_model("gamma", headers=admin)  # no file: serve it again
    assert triton.is_model_ready("gamma")

    with pytest.raises(InferenceServerException, match="invalid_bundle"):
        triton.load_model("delta", headers=admin, config="{}", files={"file:delta.safetensors": b"not a bundle"})
    assert not triton.is_model_ready("delta")

    stats = triton.get_inference_statistics("beta")["model_stats"][0]
    assert stats["name"] == "beta" and stats["inference_count"] >= 4 and stats["execution_count"] >= 2
    inference = stats["inference_stats"]
    assert inference["success"]["count"] >= 2 and inference["fail"]["count"] >= 4
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[part]["count"] >= 2 and inference[part]["ns"] > 0, part


def test_an_unloaded_domain_can_still_be_deleted(server, triton, assets):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    triton.load_model("omega", headers=admin, files={"file:omega.safetensors": assets.data("alpha")})
    triton.unload_model("omega", headers=admin)
    with server.client() as client:
        gone = client.delete("/adapters/omega", headers=AUTH)
        assert gone.status_code == 200 and gone.json()["domain"] == "omega", gone.text
        assert client.post("/predict/omega", files={"file": ("x.png", png_bytes(1))}).status_code == 404
    assert "omega" not in {m["name"] for m in triton.get_model_repository_index(headers=admin)}
