"""`python -m model`: print the parameter table of ResNet-26 per adapter mode (shared vs per domain)."""

from __future__ import annotations

import argparse

from model.config import ADAPTER_MODES, ArchConfig
from model.weights import count_parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    parser.add_argument("--width", type=float, default=1.0, help="width factor (default 1)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the head (default 10)")
    args = parser.parse_args(argv)
    print(f"ResNet-26, width factor {args.width}, {args.classes} classes")
    print(f"{'adapter':<10}{'total':>12}{'shared 3x3':>14}{'per domain':>14}{'domain share':>14}")
    for mode in ADAPTER_MODES:
        config = ArchConfig(width_factor=args.width, adapter=mode, num_classes=args.classes)
        total, shared, domain = (count_parameters(config, part) for part in (None, "shared", "domain"))
        print(f"{mode:<10}{total:>12,}{shared:>14,}{domain:>14,}{domain / total:>14.1%}")


if __name__ == "__main__":
    main()
