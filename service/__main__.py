"""`python -m service [--host H] [--port P] [--workers N|auto]`: serve with settings from `RA_*` environment
variables (`RA_HOST`, `RA_PORT`, `RA_WORKERS` give the defaults of the three options).

One worker serves from one process (HTTP and the engine together). Several run the process split
(`service.supervisor`): one engine process that owns the device, and N front ends on the port. `auto`,
the default, fits the host: one process where there is no accelerator and fewer than
`SPLIT_MIN_CORES` cores (there the split's messages cost more than its parallel front ends give:
`bench.split`'s `workers2_over_single` is under 1 on 2 cores), else the split with a front end per core
but one, which the engine process keeps. It logs what it chose and why. Either way `RA_TRAINERS`
training workers run beside it (`service.trainers`).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


SPLIT_MIN_CORES = 4


def accelerator(dev: pathlib.Path = pathlib.Path("/dev")) -> str | None:
    """The accelerator this host shows without importing a framework (the supervisor never does), or None."""
    if os.environ.get("RA_SIMULATED_DEVICE_IMG_S"):
        return "a simulated device (RA_SIMULATED_DEVICE_IMG_S)"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    gpus = sorted(dev.glob("nvidia[0-9]*"))
    if gpus and not hidden:
        return f"an NVIDIA GPU ({gpus[0]})"
    return None


def auto_workers(dev: pathlib.Path = pathlib.Path("/dev")) -> tuple[int, str]:
    """`--workers auto`: (front ends, why); 1 is the single process."""
    cores = len(os.sched_getaffinity(0))
    found = accelerator(dev)
    if found is None and cores < SPLIT_MIN_CORES:
        return (
            1,
            f"one process: {cores} cores and no accelerator (the split pays off from {SPLIT_MIN_CORES} cores or a device)",
        )
    count = max(2, min(64, cores - 1))
    return count, f"{count} front ends and an engine process: {found or 'no accelerator'}, {cores} cores"


def workers_count(value: str) -> int | str:
    if value == "auto":
        return value  # resolved after parsing, so that the choice is logged once
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes a number or 'auto', not {value!r}") from None
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"--workers must be between 1 and 64, not {count}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("RA_HOST", "127.0.0.1"),
        help="bind address (default RA_HOST or 127.0.0.1; 0.0.0.0 in the container image)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("RA_PORT", "8000")), help="port (default RA_PORT or 8000)"
    )
    parser.add_argument(
        "--workers",
        type=workers_count,
        default=os.environ.get("RA_WORKERS", "auto"),
        help="front-end processes on this port, fed by one engine process; 1 serves from a single "
        "process; 'auto' fits the host (one process without an accelerator on few cores, else a front end "
        "per core but one) (default RA_WORKERS or auto)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if os.environ.get("RA_API_KEYS_FILE"):  # refuse a bad keys file before any process starts
        from service.frontend.access import KeysFileError, load_keys

        try:
            load_keys(pathlib.Path(os.environ["RA_API_KEYS_FILE"]))
        except KeysFileError as exc:
            parser.exit(2, f"python -m service: {exc}\n")
    from service.logs import configure

    configure("service", args.log_level)
    if args.workers == "auto":
        args.workers, why = auto_workers()
        logging.getLogger("service").info("--workers auto: %s", why)
    # every process reads its settings from the environment
    os.environ.update(RA_WORKERS=str(args.workers), RA_HOST=args.host, RA_PORT=str(args.port))
    from pydantic import ValidationError

    from service.settings import one_setting

    try:
        trainers = one_setting("trainers")
    except ValidationError as exc:
        parser.exit(2, f"python -m service: RA_TRAINERS: {exc.errors()[0]['msg']}\n")
    if args.workers > 1:
        from service.supervisor import Supervisor

        return Supervisor(args.host, args.port, args.workers, args.log_level, trainers).run()
    import uvicorn

    from service import tracing
    from service.trainers import Trainers

    tracing.configure("service")  # this process is front end and engine
    pool = Trainers(trainers, args.log_level)
    pool.start()
    try:
        uvicorn.run(
            "service.boot:single_process_app",
            factory=True,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            log_config=None,  # uvicorn's lines in this process's format (service.logs)
            access_log=False,
        )
    finally:
        pool.stop()
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
