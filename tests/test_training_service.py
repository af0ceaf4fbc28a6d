"""Training through the service end to end: `python -m service` on the shipped demo backbone, with its
training worker process (RA_TRAINERS=1), takes an upload of scikit-learn's digits, follows the job's
events to `succeeded`, serves the new domain, and reaches the validation accuracy that `python -m
training adapt` reaches on the same images with the same recipe (within 2 points)."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from service_process import REPO, ServiceProcess

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIGITS = (0, 1, 7)
RECIPE = {"epochs": "4", "batch_size": "32", "lr": "0.1", "preset": "digits"}


def digits_folder(root: pathlib.Path, train: int = 40, val: int = 20) -> pathlib.Path:
    """train/ and val/ folders of class folders (both paths read the same split) of 32x32 PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in DIGITS:
        images = digits.images[digits.target == label][: train + val]
        for i, image in enumerate(images):
            split = "train" if i < train else "val"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 16).astype(np.uint8)).resize((32, 32)).save(folder / f"{i:03d}.png")
    return root


def zip_folder(root: pathlib.Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(root.rglob("*.png")):
            archive.write(path, f"digits/{path.relative_to(root)}")
    return out.getvalue()


def follow(client, path: str) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", path, headers=AUTH, timeout=600) as response:
        assert response.status_code == 200
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


@pytest.mark.slow
def test_a_domain_trained_through_the_api_serves_and_matches_the_cli(tmp_path):
    folder = digits_folder(tmp_path / "digits")
    # the CLI's run, beside the service's (each is mostly one core's work for its first seconds)
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training",
            "adapt",
            "--data",
            str(folder),
            "--domain",
            "digits-017",
            "--out",
            str(tmp_path / "cli"),
            "--backbone",
            str(REPO / "service" / "demo" / "backbone.safetensors"),
            *(f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()),
            "--no-progress",
            "--json",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    )
    server = ServiceProcess(
        {"RA_STORE_DIR": str(tmp_path / "store"), "RA_ADMIN_TOKEN": TOKEN, "RA_TRAINERS": "1"},
        tmp_path / "server.log",
    ).start()
    try:
        server.wait_ready(120)
        with server.client() as client:
            submitted = client.post(
                "/training/jobs",
                files={"archive": ("digits.zip", zip_folder(folder))},
                data={"domain": "digits-017", **RECIPE},
                headers=AUTH,
            )
            assert submitted.status_code == 202, submitted.text
            job = submitted.json()
            events = follow(client, job["links"]["events"])
            done = events[-1][1]
            assert events[-1][0] == "end" and done["state"] == "succeeded", (done, server.log_tail())
            assert done["version"] == 1 and done["epochs_done"] == 4
            assert [e["epoch"] for kind, e in events if kind == "epoch"] == [1, 2, 3, 4]
            with open(folder / "val" / "7" / "045.png", "rb") as image:
                predicted = client.post("/predict/digits-017", files={"file": ("7.png", image.read())})
            assert predicted.status_code == 200, predicted.text
            assert {p["label"] for p in predicted.json()["predictions"]} == {"0", "1", "7"}
            assert predicted.json()["version"] == 1
            assert not (tmp_path / "store" / ".jobs" / job["id"] / "upload.bin").exists()
    except BaseException:
        cli.kill()
        raise
    finally:
        server.stop()

    stdout, stderr = cli.communicate(timeout=600)
    assert cli.returncode == 0, stderr[-3000:]
    reached = json.loads(stdout.strip().splitlines()[-1])["val_top1"]
    print(json.dumps({"api_val_top1": done["accuracy"], "cli_val_top1": reached}))
    assert done["accuracy"] >= reached - 0.02, (done["accuracy"], reached)
