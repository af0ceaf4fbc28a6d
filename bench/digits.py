"""The paper's claim on real data here: adapters vs full fine-tuning on scikit-learn's digits.

    python -m bench.digits [--backbone service/demo/backbone.safetensors] [--epochs 30]

Trains `adapt` (frozen 3x3, per-domain BatchNorms + adapters + head) and `finetune` (every weight,
a full network per domain) from the same backbone and source bundle on the same 80/20 split
(seed 0, as the demo), with the same augmentation (random crops, no flips: mirrored digits are other
symbols), evaluates both on the held-out 20%, and prints one JSON object last with
both test accuracies, the gap in points and the parameters each stores per domain.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEMO = pathlib.Path(__file__).resolve().parents[1] / "service" / "demo"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=pathlib.Path, default=DEMO / "backbone.safetensors")
    parser.add_argument("--source", type=pathlib.Path, default=DEMO / "fashion.safetensors")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    # imported after the arguments, so that --help answers without loading TensorFlow
    from training.__main__ import main as cli
    from training.demo import digits_npz
    from training.evaluate import evaluate

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        train, test = digits_npz(tmp)
        for mode in ("adapt", "finetune"):
            out = tmp / mode
            code = cli(
                [
                    mode,
                    "--backbone",
                    str(args.backbone),
                    "--source",
                    str(args.source),
                    "--data",
                    train,
                    "--domain",
                    "digits",
                    "--no-flip",
                    "--epochs",
                    str(args.epochs),
                    "--seed",
                    "0",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            if code:
                raise SystemExit(code)
            metrics = json.loads((out / "digits_metrics.json").read_text())
            backbone = out / "backbone.safetensors" if mode == "finetune" else args.backbone
            results[mode] = {
                "test_top1": evaluate(backbone, out / "digits.safetensors", test)["test_top1"],
                "val_top1": metrics["val_top1"],
                "params_domain": metrics["params_domain"],
                "params_total": metrics["params_total"],
                "seconds": metrics["seconds"],
            }
    adapt, finetune = results["adapt"], results["finetune"]
    print(
        json.dumps(
            {
                "adapt_test_top1": round(adapt["test_top1"], 4),
                "finetune_test_top1": round(finetune["test_top1"], 4),
                "gap_points": round(100 * (finetune["test_top1"] - adapt["test_top1"]), 2),
                "adapt_params_domain": adapt["params_domain"],
                "finetune_params_domain": finetune["params_domain"],
                "adapt_storage_share": round(adapt["params_domain"] / adapt["params_total"], 4),
                "epochs": args.epochs,
                "details": results,
            }
        )
    )


if __name__ == "__main__":
    main()
