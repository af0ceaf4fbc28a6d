"""`python -m bench.harness.supervised N PORT`: the process split with N front ends, 1 included (where
`python -m service --workers 1` serves from a single process), for benches that measure the split."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from service.supervisor import Supervisor

    workers, port = int(argv[0]), int(argv[1])
    logging.basicConfig(level="WARNING")
    return Supervisor("127.0.0.1", port, workers, "warning").run()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
