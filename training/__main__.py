"""`python -m training <command>`: pretrain, adapt, finetune, scratch, evaluate, decathlon-score, worker.

Examples:
    python -m training adapt --data my-images --domain pets --backbone service/demo/backbone.safetensors \\
        --source service/demo/fashion.safetensors --out out/pets      # a domain for the demo server
    python -m training pretrain --data /usr/share/datasets/fashion-mnist --domain fashion \\
        --width 0.5 --input-size 32 --epochs 12 --out demo
    python -m training adapt --backbone demo/backbone.safetensors --source demo/fashion.safetensors \\
        --data ../shared/data/catsdogs:train --val ../shared/data/catsdogs:val --domain catsdogs --out demo
    python -m training evaluate --backbone demo/backbone.safetensors --bundle demo/catsdogs.safetensors \\
        --data ../shared/data/catsdogs:test
    python -m training decathlon-score --acc imnet=57.74 --acc aircraft=64.12 ...
    python -m training worker --store ~/.local/share/residual-adapters/store \
        --backbone service/demo/backbone.safetensors          # run the training jobs queued in a store
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RECIPE_FLAGS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "wd": "wd",
    "wd_3x3": "wd_3x3",
    "wd_adapter": "wd_adapter",
    "wd_bn": "wd_bn",
}


def _decay(value: str) -> float | str:
    return value if value == "auto" else float(value)


def _add_training_options(p: argparse.ArgumentParser, full: bool) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="training data: PATH[:SPLIT] (image folder, Decathlon devkit, IDX folder or .npz; SPLIT train/val/test)",
    )
    p.add_argument("--val", help="validation data, PATH[:SPLIT] (default: --val-split of the training data)")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    p.add_argument("--domain", required=True, help="domain name of the bundle ([a-z0-9][a-z0-9_-]*)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    p.add_argument("--epochs", type=int, help="epochs (default 30); the lr drops x0.1 at 2/3 and 5/6")
    p.add_argument("--batch-size", type=int, help="batch size (default 128)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 0.1)")
    p.add_argument("--wd", type=float, help="weight decay of the head (default 0.0005)")
    p.add_argument("--wd-3x3", type=float, help="weight decay of the 3x3 convolutions (default 0.0005)")
    p.add_argument(
        "--wd-adapter",
        type=_decay,
        help="weight decay of the 1x1 adapters, or 'auto' by training-set "
        "size: <=5k images 0.005, <=50k 0.002, else 0.0005 (default: auto for adapt, else 0.0005)",
    )
    p.add_argument("--wd-bn", type=float, help="weight decay of the BatchNorms (default 0)")
    p.add_argument(
        "--preset",
        choices=["natural", "digits"],
        default="natural",
        help="augmentation: natural = random crop + flip; digits = center, no flip (digits, signs, text)",
    )
    p.add_argument("--no-flip", action="store_true", help="never flip horizontally")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--mixed-precision", action="store_true", help="bfloat16 compute (GPUs with bf16 support)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument(
        "--json", action="store_true", help="print the final metrics (and the bundle's path) as one JSON line last"
    )
    if full:
        p.add_argument("--width", type=float, default=0.5, help="width factor (default 0.5)")
        p.add_argument("--input-size", type=int, default=64, help="input side, a multiple of 8 (default 64)")
        p.add_argument("--adapter", choices=["series", "parallel", "none"], default="series")
    else:
        p.add_argument("--backbone", required=True, type=pathlib.Path, help="backbone .safetensors")
        p.add_argument(
            "--source",
            type=pathlib.Path,
            help="the source domain's bundle: BatchNorms and adapters "
            "start from it, as in the reference (default: identity init)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "pretrain": "learn all weights on a source domain -> backbone + its bundle",
        "scratch": "learn all weights from random init (baseline) -> backbone + bundle",
        "adapt": "train one domain's BatchNorms, adapters and head on a frozen backbone -> bundle",
        "finetune": "learn all weights starting from a backbone (baseline) -> backbone + bundle",
    }
    for name, text in helps.items():
        _add_training_options(sub.add_parser(name, help=text, description=text), full=name in ("pretrain", "scratch"))
    ev = sub.add_parser("evaluate", help="top-1, per-class accuracy and confusion matrix of a bundle on test data")
    ev.add_argument("--backbone", required=True, type=pathlib.Path)
    ev.add_argument("--bundle", required=True, type=pathlib.Path)
    ev.add_argument("--data", required=True, help="test data, PATH[:SPLIT]")
    ev.add_argument("--out", type=pathlib.Path, help="folder for the confusion-matrix PNG")
    ev.add_argument("--json", action="store_true")
    ds = sub.add_parser("decathlon-score", help="Visual Decathlon S-score from per-domain accuracies")
    ds.add_argument("--accuracies", type=pathlib.Path, help='JSON file {"domain": accuracy, ...}')
    ds.add_argument(
        "--acc",
        action="append",
        default=[],
        metavar="DOMAIN=ACCURACY",
        help="one domain's top-1 accuracy in percent (repeatable)",
    )
    ds.add_argument("--json", action="store_true")
    wk = sub.add_parser("worker", help="run the training jobs queued in a store, one at a time (training.jobs)")
    wk.add_argument(
        "--store", required=True, help="the store directory (RA_STORE_DIR), or a postgresql:// URL (RA_REGISTRY_URL)"
    )
    wk.add_argument("--backbone", required=True, type=pathlib.Path, help="the backbone the jobs adapt")
    wk.add_argument("--once", action="store_true", help="stop when no job is queued")
    wk.add_argument("--nice", type=int, default=10, help="lower this process's priority by N (default 10)")
    wk.add_argument(
        "--gpu-memory-mb",
        type=int,
        default=None,
        help="hold TensorFlow to this much memory per GPU (RA_TRAINER_GPU_MEMORY_MB; default: no limit)",
    )
    wk.add_argument("--lease-s", type=float, default=30.0, help="a claim's heartbeat lease (default 30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "decathlon-score":
            return _decathlon(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "worker":
            return _worker(args)
        return _train(args)
    except (ValueError, OSError) as exc:  # our errors say what to fix; no traceback for them
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from training.commands import TrainSpec, run_training

    if args.mixed_precision:
        import keras

        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    overrides = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_flip:
        overrides["flip"] = False
    full = args.command in ("pretrain", "scratch")
    spec = TrainSpec(
        mode=args.command,
        data=args.data,
        domain=args.domain,
        out=args.out,
        val=args.val,
        val_split=args.val_split,
        seed=args.seed,
        backbone=None if full else args.backbone,
        source=None if full else args.source,
        width_factor=args.width if full else 0.5,
        input_size=args.input_size if full else 64,
        adapter=args.adapter if full else "series",
        preset=args.preset,
        overrides=overrides,
        resume=args.resume,
        progress=not args.no_progress,
    )
    metrics = run_training(spec)
    if args.json:
        print(json.dumps(metrics))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    metrics = evaluate(args.backbone, args.bundle, args.data, args.out)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{metrics['domain']}: top-1 {metrics['test_top1']:.4f} on {metrics['images']} images")
        for name, acc in metrics["per_class_top1"].items():
            print(f"  {name:<24} {'-' if acc is None else f'{acc:.4f}'}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import logging

    from training.jobs import DirectoryJobs
    from training.jobs_postgres import PostgresJobs
    from training.worker import Worker

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s trainer %(name)s: %(message)s")
    os.nice(args.nice)  # inference before training on a shared CPU
    if args.store.startswith(("postgresql://", "postgres://")):
        store = PostgresJobs(args.store, lease_s=args.lease_s)
    else:
        store = DirectoryJobs(pathlib.Path(args.store).expanduser(), lease_s=args.lease_s)
    Worker(store, args.backbone, gpu_memory_mb=args.gpu_memory_mb).run(once=args.once)
    return 0


def _decathlon(args: argparse.Namespace) -> int:
    from training.decathlon import decathlon_score

    accuracies = json.loads(args.accuracies.read_text()) if args.accuracies else {}
    for item in args.acc:
        name, _, value = item.partition("=")
        accuracies[name] = float(value)
    scores = decathlon_score(accuracies)
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in scores.items()}))
    else:
        for name, points in scores.items():
            print(f"{name:<16} {points:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
