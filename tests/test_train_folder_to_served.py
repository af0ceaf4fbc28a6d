"""README's tour, "Train a domain": the block between the `train-for-demo` markers, run as it is (docs pages
that show it must show the same block).

The README's commands (train from an image folder on the demo backbone, register with curl, predict
with curl) run in a shell, in a folder that has what a user's repository root has for them
(`service/` and an image folder `my-images/` with one sub-folder per class, plus `photo.jpg`),
against a real `python -m service` on the demo backbone with `RA_ADMIN_TOKEN` set. The only change
made to the commands is the server's address (a free port instead of 8000). The same registration
command with a bundle made for another backbone must be refused, so a README that trained on the
wrong backbone would fail here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from service_process import REPO, ServiceProcess

README = REPO / "README.md"
BEGIN, END = "<!-- train-for-demo:begin -->", "<!-- train-for-demo:end -->"
README_URL = "http://127.0.0.1:8000"
TOKEN = "s3cret"  # the token the README's curl sends
DOMAIN = "pets"
BUNDLE = f"out/{DOMAIN}/{DOMAIN}.safetensors"
CLASSES = ("checks", "horizontal", "vertical")  # stripes and checks: textures the demo backbone tells apart
PER_CLASS = 12
DEMO_BACKBONE = REPO / "service" / "demo" / "backbone.safetensors"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands use curl")


def marked_block(page: pathlib.Path) -> str:
    text = page.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{page.name} must hold {BEGIN} ... {END} once"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def test_every_page_that_shows_the_block_shows_the_readmes():
    block = marked_block(README)
    for page in (REPO / "docs").glob("*.md"):
        if BEGIN in page.read_text():
            assert marked_block(page) == block, f"docs/{page.name}'s train-for-demo block differs from the README's"


def readme_commands() -> list[str]:
    """The shell commands of the README's marked block, continuation lines joined, comments dropped."""
    block = marked_block(README)
    match = re.fullmatch(r"\s*```bash\n(.*?)```\s*", block, re.S)
    assert match, "the marked README block must be one ```bash code block"
    joined = re.sub(r"\\\n\s*", " ", match.group(1))
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def image(kind: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy picture of stripes (or checks) with a random period, phase and contrast."""
    y, x = np.mgrid[0:size, 0:size]
    period, phase = int(rng.integers(5, 9)), int(rng.integers(0, 9))
    rows, cols = (y + phase) // (period // 2 + 1), (x + phase) // (period // 2 + 1)
    mask = {"horizontal": rows, "vertical": cols, "checks": rows + cols}[kind] % 2
    gray = mask * rng.uniform(150, 230) + (1 - mask) * rng.uniform(20, 90) + rng.normal(0, 15, mask.shape)
    return Image.fromarray(np.repeat(np.clip(gray, 0, 255)[..., None], 3, axis=2).astype(np.uint8))


def make_workdir(root: pathlib.Path) -> None:
    """What the README's commands expect in the current folder: `service/`, `my-images/`, `photo.jpg`."""
    (root / "service").symlink_to(REPO / "service", target_is_directory=True)
    rng = np.random.default_rng(0)
    for name in CLASSES:
        folder = root / "my-images" / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):  # PNG and JPEG, as users' folders mix them
            image(name, rng).save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    (root / "my-images" / "notes.txt").write_text("not a class folder: ignored")
    image("horizontal", np.random.default_rng(99)).save(root / "photo.jpg", quality=95)


def foreign_bundle(path: pathlib.Path) -> None:
    """A `pets` bundle of the demo's architecture, made for another backbone (random shared weights)."""
    from conftest import make_backbone, make_bundle

    from model.backbone import load_backbone
    from model.bundle import save_bundle

    config = load_backbone(DEMO_BACKBONE).config
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(make_bundle(make_backbone(config, seed=7), DOMAIN, len(CLASSES), seed=1), path)


def shell_env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def shell(command: str, cwd: pathlib.Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=shell_env(), capture_output=True, text=True, timeout=timeout
    )


def json_answer(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"{done.args[-1]!r} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{done.args[-1]!r} did not answer JSON:\n{done.stdout[-2000:]}") from None


def test_readme_block_is_train_register_predict():
    train, register, predict = readme_commands()
    assert train.startswith("python -m training adapt ")
    for flag in (
        "--data my-images",
        f"--domain {DOMAIN}",
        "--backbone service/demo/backbone.safetensors",
        "--source service/demo/fashion.safetensors",
        f"--out out/{DOMAIN}",
    ):
        assert flag in train, flag
    assert register.startswith("curl ") and f"-F bundle=@{BUNDLE}" in register
    assert f"Authorization: Bearer {TOKEN}" in register and register.endswith(f"{README_URL}/adapters")
    assert predict.startswith("curl ") and f"{README_URL}/predict/{DOMAIN}" in predict and "photo.jpg" in predict


def test_image_folder_to_served_domain(tmp_path):
    train, register, predict = readme_commands()
    work = tmp_path / "repo"
    work.mkdir()
    make_workdir(work)
    store = tmp_path / "store"
    # training and the server's start-up side by side; the refused registration runs from another
    # folder that holds the same relative path, so it never races the training's write
    t0 = time.perf_counter()
    training = subprocess.Popen(
        ["bash", "-c", train], cwd=work, env=shell_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # the demo server as the README starts it (python -m service, demo backbone and bundles), with a token
    server = ServiceProcess({"RA_STORE_DIR": str(store), "RA_ADMIN_TOKEN": TOKEN}, tmp_path / "server.log").start()
    try:
        foreign = tmp_path / "foreign"
        foreign_bundle(foreign / BUNDLE)
        server.wait_ready(120)
        at = lambda command: command.replace(README_URL, server.url)  # noqa: E731 - the one change made

        refused = json_answer(shell(at(register), foreign, 60))
        assert refused["error"] == "invalid_bundle:fingerprint", refused
        assert httpx.get(f"{server.url}/adapters/{DOMAIN}").status_code == 404

        stdout, stderr = training.communicate(timeout=600)
        train_s = time.perf_counter() - t0
        assert training.returncode == 0, f"training failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        last = stdout.strip().splitlines()[-1]
        assert last.startswith(f"wrote {BUNDLE} (domain {DOMAIN}, {len(CLASSES)} classes"), last
        print(f"training took {train_s:.1f}s")

        registered = json_answer(shell(at(register), work, 60))
        assert registered.get("domain") == DOMAIN and registered.get("version") == 1, registered
        assert registered["labels"] == list(CLASSES) and registered["golden_self_test"] is True
        from service_helpers import NamedEngine, check_scores, reference_logits

        from model.backbone import load_backbone
        from model.bundle import load_bundle

        backbone = load_backbone(DEMO_BACKBONE)
        assert registered["backbone_fingerprint"] == backbone.fingerprint

        answer = json_answer(shell(at(predict), work, 60))
        assert answer["domain"] == DOMAIN and answer["version"] == 1, answer
        predictions = answer["predictions"]
        assert len(predictions) == 2, predictions
        bundle = load_bundle(work / BUNDLE, backbone)  # the served answer is the trained bundle's, exactly
        logits = reference_logits(
            NamedEngine(backbone, {DOMAIN: bundle}), (work / "photo.jpg").read_bytes(), bundle, DOMAIN
        )
        check_scores(predictions, logits, bundle.labels)
        assert predictions[0]["label"] == "horizontal", predictions  # and it learned: photo.jpg has such stripes
        listed = httpx.get(f"{server.url}/adapters").json()
        assert DOMAIN in json.dumps(listed)
    finally:
        training.kill()  # a no-op once it has finished
        server.stop()
