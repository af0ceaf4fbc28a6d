"""Engine throughput on this machine: plain ResNet-26 vs one domain vs 1000 mixed domains.

    python -m bench.engine            # width 1, input 64, batch 32, 1000 domains
    python -m bench.engine --quick    # a smaller run

The variants run interleaved (plain, single, mixed, plain, ...) for several rounds; figures are
medians and every ratio is taken pair by pair inside a round, because these shared machines are
noisy. The JSON object printed last holds the results and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bench.common import median, random_backbone, random_bundle, time_call
from model.config import ArchConfig, conv_units
from model.engine import InferenceEngine


def matmul_gflops(sizes: tuple[int, ...], seconds: float) -> float:
    """The machine's practical float32 peak: the best TF matmul GFLOP/s over several sizes."""
    best = 0.0
    for n in sizes:
        a = tf.random.normal((n, n))
        b = tf.random.normal((n, n))
        mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
        mm()
        best = max(best, 2 * n**3 / time_call(lambda: mm().numpy(), seconds) / 1e9)
    return best


def model_flops(config: ArchConfig) -> float:
    """FLOPs per image of the series-adapter ResNet-26: 3x3 convs, 1x1 adapters, head."""
    size, macs = config.input_size, 0
    for unit in conv_units(config):
        size //= unit.stride
        macs += size * size * (9 * unit.in_channels * unit.out_channels + unit.out_channels**2)
    macs += config.feature_width * config.num_classes
    return 2.0 * macs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    parser.add_argument("--xla", action="store_true", help="compile the engine with XLA")
    parser.add_argument("--quick", action="store_true", help="width 0.5, 100 domains, 3 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.domains, args.rounds, args.seconds = 0.5, 100, 3, 1.0

    series = ArchConfig(args.width, args.input_size, "series", args.classes)
    plain_engine = InferenceEngine(random_backbone(series.replace(adapter="none")), capacity=1, jit_compile=args.xla)
    plain = plain_engine.load(random_bundle(plain_engine.backbone, "plain", args.classes, 1))
    backbone = random_backbone(series)
    engine = InferenceEngine(backbone, capacity=args.domains, class_capacity=args.classes, jit_compile=args.xla)
    distinct = [random_bundle(backbone, f"d{i}", args.classes, 100 + i) for i in range(8)]
    start, slots = time.perf_counter(), []
    for i in range(args.domains):
        slots.append(engine.load(distinct[i % len(distinct)].renamed(f"domain{i}")))
    register_s = (time.perf_counter() - start) / args.domains

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.input_size, args.input_size, 3)).astype(np.float32)
    mixed_slots = [slots[i] for i in rng.integers(0, args.domains, args.batch)]
    variants = {
        "plain": lambda: plain_engine.predict(images, plain),
        "single": lambda: engine.predict(images, slots[0]),
        "mixed": lambda: engine.predict(images, mixed_slots),
    }
    for fn in variants.values():
        fn()
    traces_before = engine.tracing_count()
    peak = matmul_gflops((1024, 2048, 4096), args.seconds)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({k: args.batch / time_call(fn, args.seconds) for k, fn in variants.items()})
    flops = model_flops(series)
    single = median([r["single"] for r in rounds])
    engine_gflops = single * flops / 1e9
    result = {
        "matmul_gflops": round(peak, 1),
        "plain_img_s": round(median([r["plain"] for r in rounds]), 1),
        "single_img_s": round(single, 1),
        "mixed_img_s": round(median([r["mixed"] for r in rounds]), 1),
        "adapter_overhead": round(median([r["plain"] / r["single"] for r in rounds]), 3),
        "mixed_over_single": round(median([r["mixed"] / r["single"] for r in rounds]), 3),
        "engine_gflops": round(engine_gflops, 1),
        "mfu": round(engine_gflops / peak, 3),
        "mixed_gflops": round(median([r["mixed"] for r in rounds]) * flops / 1e9, 1),
        "register_ms_per_domain": round(register_s * 1e3, 2),
        "retraces_during_run": engine.tracing_count() - traces_before,
        "settings": {"width": args.width, "input": args.input_size, "batch": args.batch, "domains": args.domains,
                     "classes": args.classes, "rounds": args.rounds, "xla": args.xla,
                     "gflop_per_image": round(flops / 1e9, 4), "tensorflow": tf.__version__,
                     "cpus": os.cpu_count()},
        "rounds": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
