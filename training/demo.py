"""Reproduce the shipped demo artifacts (the service's embedded default) from real data on this machine.

    python -m training.demo [--out service/demo] [--epochs 15] [--skip-pretrain]

1. pretrain a width-0.5, input-32, series-adapter backbone on Fashion-MNIST
   (`apt-get install dataset-fashion-mnist`), seed 0;
2. adapt it to scikit-learn's 8x8 digits (an 80/20 split made with seed 0; random crops but no
   flips, which beat the reference's center-only digits preset on this tiny set) and to the 200
   cat/dog photos in ../shared/data/catsdogs (their train/val/test folders);
3. evaluate each bundle on its held-out test split and write `demo_metrics.json`.

The same seed on the same software gives the same artifacts (CPU float math may differ in the
last bits on another processor).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

FASHION = "/usr/share/datasets/fashion-mnist"
CATSDOGS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "catsdogs"


def digits_npz(folder: pathlib.Path, seed: int = 0) -> tuple[str, str]:
    """scikit-learn's digits as uint8 images, split 80/20 per class with `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(images), bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == c))
        test[members[: round(len(members) * 0.2)]] = True
    labels = np.asarray([str(i) for i in range(10)])
    paths = []
    for name, mask in (("train", ~test), ("test", test)):
        path = folder / f"digits_{name}.npz"
        np.savez(path, x=images[mask], y=digits.target[mask], labels=labels)
        paths.append(str(path))
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    from training.__main__ import main as cli

    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("service/demo"))
    parser.add_argument("--epochs", type=int, default=15, help="pretraining epochs (default 15)")
    parser.add_argument("--adapt-epochs", type=int, default=30, help="adaptation epochs (default 30)")
    parser.add_argument("--skip-pretrain", action="store_true", help="reuse the backbone already in --out")
    args = parser.parse_args(argv)
    out = args.out
    backbone, fashion = out / "backbone.safetensors", out / "fashion.safetensors"

    def run(*words: str) -> None:
        code = cli([str(w) for w in words])
        if code:
            raise SystemExit(code)

    if not args.skip_pretrain:
        run(
            "pretrain",
            "--data",
            FASHION,
            "--domain",
            "fashion",
            "--width",
            "0.5",
            "--input-size",
            "32",
            "--adapter",
            "series",
            "--epochs",
            args.epochs,
            "--seed",
            "0",
            "--out",
            out,
        )
    with tempfile.TemporaryDirectory() as tmp:
        train_npz, test_npz = digits_npz(pathlib.Path(tmp))
        run(
            "adapt",
            "--backbone",
            backbone,
            "--source",
            fashion,
            "--data",
            train_npz,
            "--domain",
            "digits",
            "--no-flip",
            "--epochs",
            args.adapt_epochs,
            "--seed",
            "0",
            "--out",
            out,
        )
        run(
            "adapt",
            "--backbone",
            backbone,
            "--source",
            fashion,
            "--data",
            f"{CATSDOGS}:train",
            "--val",
            f"{CATSDOGS}:val",
            "--domain",
            "catsdogs",
            "--epochs",
            args.adapt_epochs,
            "--seed",
            "0",
            "--out",
            out,
        )
        from training.evaluate import evaluate

        results = {
            "fashion": evaluate(backbone, fashion, f"{FASHION}:test"),
            "digits": evaluate(backbone, out / "digits.safetensors", test_npz),
            "catsdogs": evaluate(backbone, out / "catsdogs.safetensors", f"{CATSDOGS}:test"),
        }
    summary = {
        name: {
            "test_top1": round(r["test_top1"], 4),
            "test_images": r["images"],
            **{
                k: json.loads((out / f"{name}_metrics.json").read_text())[k]
                for k in ("val_top1", "train_images", "epochs", "params_domain", "params_total", "seconds")
            },
        }
        for name, r in results.items()
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
