"""Engine throughput on this machine: plain ResNet-26 vs one domain vs 1000 mixed domains.

    python -m bench.engine                               # width 1, input 64, batch 32, 1000 domains
    python -m bench.engine --quick                       # a smaller run
    python -m bench.engine --backend jax --batch 32,128,512 --dtype float32,bfloat16
    python -m bench.engine --compare tensorflow,jax,torch --quick   # each backend in its own process

The variants run interleaved (plain, single, mixed, plain, ...) for several rounds; figures are
medians and every ratio is taken pair by pair inside a round, because these shared machines are
noisy. MFU is against the best matmul this process measures in the dtype (`matmul_gflops`, the
practical peak), and also against `--peak-tflops` (a GPU's datasheet figures) when given. The JSON object printed
last holds the results and the settings: one entry per (dtype, batch) under `runs`; with
`--compare`, one object per backend and each other backend's img/s over TensorFlow's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.harness.synthetic import median, random_backbone, random_bundle, time_call
from model.config import ArchConfig, conv_units


def matmul_gflops(sizes: tuple[int, ...], seconds: float, dtype: str) -> float:
    """The practical peak of this device in `dtype`: the best matmul GFLOP/s over several sizes."""
    import keras

    best = 0.0
    for n in sizes:
        a = keras.random.normal((n, n), dtype=dtype)
        b = keras.random.normal((n, n), dtype=dtype)
        keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.matmul(a, b)))
        best = max(
            best,
            2
            * n**3
            / time_call(lambda a=a, b=b: keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.matmul(a, b))), seconds)
            / 1e9,
        )
    return best


def model_flops(config: ArchConfig) -> float:
    """FLOPs per image of the series-adapter ResNet-26: 3x3 convs, 1x1 adapters, head."""
    size, macs = config.input_size, 0
    for unit in conv_units(config):
        size //= unit.stride
        macs += size * size * (9 * unit.in_channels * unit.out_channels + unit.out_channels**2)
    macs += config.feature_width * config.num_classes
    return 2.0 * macs


def measure(args: argparse.Namespace, dtype: str, batch: int) -> dict:
    from model.engine import InferenceEngine

    series = ArchConfig(args.width, args.input_size, "series", args.classes)
    plain_engine = InferenceEngine(
        random_backbone(series.replace(adapter="none")), capacity=1, compute_dtype=dtype, jit_compile=args.xla
    )
    plain = plain_engine.load(random_bundle(plain_engine.backbone, "plain", args.classes, 1), verify_golden=False)
    backbone = random_backbone(series)
    engine = InferenceEngine(
        backbone, capacity=args.domains, class_capacity=args.classes, compute_dtype=dtype, jit_compile=args.xla
    )
    distinct = [random_bundle(backbone, f"d{i}", args.classes, 100 + i) for i in range(8)]
    rows = [engine.fold(bundle) for bundle in distinct]
    start, slots = time.perf_counter(), []
    for i in range(args.domains):
        slots.append(engine.load_row(rows[i % len(rows)]))
    load_s = (time.perf_counter() - start) / args.domains

    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, args.input_size, args.input_size, 3)).astype(np.float32)
    mixed_slots = [slots[i] for i in rng.integers(0, args.domains, batch)]
    variants = {
        "plain": lambda: plain_engine.predict(images, plain),
        "single": lambda: engine.predict(images, slots[0]),
        "mixed": lambda: engine.predict(images, mixed_slots),
    }
    for fn in variants.values():
        fn()
    traces_before = engine.tracing_count()
    peak = matmul_gflops((1024, 2048, 4096), args.seconds, dtype)
    datasheet = peak_tflops(args.peak_tflops).get(dtype)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({k: batch / time_call(fn, args.seconds) for k, fn in variants.items()})
    flops = model_flops(series)
    single, mixed = median([r["single"] for r in rounds]), median([r["mixed"] for r in rounds])
    return {
        "dtype": dtype,
        "batch": batch,
        "matmul_gflops": round(peak, 1),
        "plain_img_s": round(median([r["plain"] for r in rounds]), 1),
        "single_img_s": round(single, 1),
        "mixed_img_s": round(mixed, 1),
        "adapter_overhead": round(median([r["plain"] / r["single"] for r in rounds]), 3),
        "mixed_over_single": round(median([r["mixed"] / r["single"] for r in rounds]), 3),
        "single_mfu": round(single * flops / 1e9 / peak, 3),
        "mixed_mfu": round(mixed * flops / 1e9 / peak, 3),
        **(
            {
                "datasheet_tflops": datasheet,
                "single_mfu_datasheet": round(single * flops / 1e12 / datasheet, 4),
                "mixed_mfu_datasheet": round(mixed * flops / 1e12 / datasheet, 4),
            }
            if datasheet
            else {}
        ),
        "load_row_ms": round(load_s * 1e3, 3),
        "retraces_during_run": engine.tracing_count() - traces_before,
        "rounds": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
    }


def peak_tflops(text: str | None) -> dict[str, float]:
    """`--peak-tflops float32=67,bfloat16=989` (a device's datasheet peaks) as a dict."""
    peaks = {}
    for item in (text or "").split(","):
        if item.strip():
            dtype, _, value = item.partition("=")
            peaks[dtype.strip()] = float(value)
    return peaks


def compare(args: argparse.Namespace, argv: list[str]) -> dict:
    """Each backend in a process of its own (Keras runs one per process), one after another."""
    i = argv.index("--compare") if "--compare" in argv else None
    passed = argv[:i] + argv[i + 2 :] if i is not None else [a for a in argv if not a.startswith("--compare=")]
    results = {}
    for backend in args.compare.split(","):
        run = subprocess.run(
            [sys.executable, "-m", "bench.engine", "--backend", backend, *passed], capture_output=True, text=True
        )
        if run.returncode != 0:
            results[backend] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
            continue
        results[backend] = json.loads(run.stdout.strip().splitlines()[-1])
    over = {}
    base = results.get("tensorflow", {}).get("runs")
    for backend, result in results.items():
        if backend == "tensorflow" or base is None or "runs" not in result:
            continue
        over[backend] = [
            {
                "dtype": r["dtype"],
                "batch": r["batch"],
                "single": round(r["single_img_s"] / b["single_img_s"], 3),
                "mixed": round(r["mixed_img_s"] / b["mixed_img_s"], 3),
            }
            for r, b in zip(result["runs"], base)
        ]
    return {"backends": results, "over_tensorflow": over}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", default=None, help="tensorflow, jax or torch (default: KERAS_BACKEND or tensorflow)"
    )
    parser.add_argument("--compare", default=None, help="comma-separated backends, each run in its own process")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch", default="32", help="batch sizes, comma-separated")
    parser.add_argument("--dtype", default="float32", help="compute dtypes, comma-separated (bfloat16: on a GPU)")
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    parser.add_argument(
        "--peak-tflops",
        default=None,
        help="datasheet peaks for a second MFU, e.g. float32=67,bfloat16=989 (an H200's dense figures)",
    )
    parser.add_argument("--xla", action="store_true", help="compile the TensorFlow engine with XLA")
    parser.add_argument("--quick", action="store_true", help="width 0.5, 100 domains, 3 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.domains, args.rounds, args.seconds = 0.5, 100, 3, 1.0
    if args.compare:
        print(json.dumps(compare(args, argv)))
        return
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported (by model.engine)
    from model import backends

    backend = backends.current()
    runs = [measure(args, dtype, int(batch)) for dtype in args.dtype.split(",") for batch in args.batch.split(",")]
    devices = backend.devices()
    print(
        json.dumps(
            {
                "backend": backend.version(),
                "devices": list(devices.names),
                "runs": runs,
                "settings": {
                    "width": args.width,
                    "input": args.input_size,
                    "domains": args.domains,
                    "classes": args.classes,
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                    "xla": args.xla,
                    "gflop_per_image": round(
                        model_flops(ArchConfig(args.width, args.input_size, "series", args.classes)) / 1e9, 4
                    ),
                    "cpus": os.cpu_count(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
